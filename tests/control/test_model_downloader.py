"""Model repository + downloader over real HTTP (uvicorn on 127.0.0.1, no mocks of the wire).

The repository serves a copy of the tiny Llama whose manifest is rewritten with 4 KiB chunks, so
every block has dozens of chunks. A small ASGI wrapper in front of the repository records what
was requested and served, and can corrupt one byte or ignore ``Range`` headers on demand.
"""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers.http_server import serve
from tiktrue.control import model_downloader
from tiktrue.control.model_downloader import DownloadError, DownloadProgress, download_model_blocks
from tiktrue.control.model_repository import repository_app
from tiktrue.model.errors import StoreError
from tiktrue.model.store import MANIFEST, BlockStore, hash_chunks

CHUNK = 4096


# --- helpers --------------------------------------------------------------------------------


def rechunk(store_dir: Path, chunk_size: int) -> None:
    """Rewrite a store's manifest with ``chunk_size`` chunks (recomputed chunk hashes)."""
    data = json.loads((store_dir / MANIFEST).read_text("utf-8"))
    for entry in data["blocks"].values():
        whole, chunks = hash_chunks(store_dir / entry["file"], chunk_size)
        assert whole == entry["sha256"]
        entry["chunk_size"], entry["chunks"] = chunk_size, chunks
    (store_dir / MANIFEST).write_text(json.dumps(data, indent=2), "utf-8")


@dataclass
class Served:
    path: str
    range: str | None
    status: int = 0
    start: int = 0
    nbytes: int = 0


class Recorder:
    """ASGI wrapper: logs each request and the body bytes it got; optional faults."""

    def __init__(self, app) -> None:
        self.app = app
        self.reset()

    def reset(self) -> None:
        self.log: list[Served] = []
        self.ignore_range = False
        self.corrupt: dict[str, list[int]] = {}  # path -> [absolute byte offset, times left]
        self.drop: dict[str, list[int]] = {}  # path -> [cut the connection at this byte, times]

    def served(self, path: str) -> list[Served]:
        return [r for r in self.log if r.path == path]

    def bytes_served(self, path: str) -> int:
        return sum(r.nbytes for r in self.served(path))

    def times_sent(self, path: str, offset: int) -> int:
        return sum(1 for r in self.served(path) if r.start <= offset < r.start + r.nbytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        wanted = next((v.decode() for k, v in scope["headers"] if k == b"range"), None)
        if self.ignore_range:
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
        record = Served(path, wanted)
        self.log.append(record)

        async def recording_send(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                content_range = dict(message.get("headers", [])).get(b"content-range")
                if content_range:
                    record.start = int(content_range.split()[1].split(b"-")[0])
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                at = record.start + record.nbytes
                fault = self.corrupt.get(path)
                if fault and fault[1] > 0 and at <= fault[0] < at + len(body):
                    damaged = bytearray(body)
                    damaged[fault[0] - at] ^= 0xFF
                    fault[1] -= 1
                    message = {**message, "body": bytes(damaged)}
                cut = self.drop.get(path)
                if cut and cut[1] > 0 and at <= cut[0] < at + len(body):
                    cut[1] -= 1
                    await send({**message, "body": body[: cut[0] - at], "more_body": True})
                    record.nbytes += cut[0] - at
                    raise ConnectionAbortedError("test: connection dropped mid-body")
                record.nbytes += len(body)
            await send(message)

        await self.app(scope, receive, recording_send)


@dataclass
class Repo:
    url: str
    root: Path
    recorder: Recorder
    source: BlockStore

    @property
    def model_id(self) -> str:
        return self.source.model_id

    def block_path(self, block: str) -> str:
        return f"/{self.model_id}/{self.source.manifest.blocks[block].file}"

    def download(self, dest_root: Path, **kwargs) -> BlockStore:
        return download_model_blocks(self.model_id, self.url, dest_root=dest_root, **kwargs)


class Stop(Exception):
    pass


def stop_after(block: str, chunks: int, events: list[DownloadProgress]):
    """A progress callback that records events and 'kills' the download inside ``block``."""

    def callback(event: DownloadProgress) -> None:
        events.append(event)
        if event.file == block and event.file_done_bytes >= chunks * CHUNK:
            raise Stop

    return callback


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def partial_of(store_dir: Path, block: str) -> Path:
    return store_dir / "blocks" / f"{block}.safetensors.partial"


@pytest.fixture(scope="module")
def repository(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(tiny_llama.root, root / tiny_llama.model_id)
    rechunk(root / tiny_llama.model_id, CHUNK)
    (root / "broken").mkdir()
    (root / "broken" / MANIFEST).write_text('{"model_id": "broken"}', "utf-8")
    recorder = Recorder(repository_app(root))
    with serve(recorder) as url:
        yield Repo(url, root, recorder, BlockStore(root / tiny_llama.model_id))


@pytest.fixture
def repo(repository) -> Repo:
    repository.recorder.reset()
    return repository


# --- the repository -------------------------------------------------------------------------


def test_repository_lists_models_and_serves_ranges(repo):
    with httpx.Client(base_url=repo.url) as client:
        assert client.get("/").json() == {"models": ["broken", repo.model_id]}
        path = repo.block_path("layer_0")
        answer = client.get(path, headers={"Range": "bytes=100-199"})
        assert answer.status_code == 206 and len(answer.content) == 100
        assert answer.headers["content-range"].startswith("bytes 100-199/")
        assert answer.content == (repo.source.root / path.split("/", 2)[2]).read_bytes()[100:200]
        for hidden in (
            f"{path}.partial",
            f"/{repo.model_id}/blocks/%2e%2e/config.json",
            "/nothing/config.json",
            f"/{repo.model_id}/blocks",
        ):
            assert client.get(hidden).status_code == 404, hidden


def test_a_single_store_is_served_under_its_model_id(repo):
    from starlette.testclient import TestClient

    with TestClient(repository_app(repo.source.root)) as client:
        assert client.get("/").json() == {"models": [repo.model_id]}
        assert client.get(f"/{repo.model_id}/config.json").status_code == 200
        assert client.get("/other/config.json").status_code == 404


def test_models_serve_command_prints_the_address(repo, monkeypatch):
    from typer.testing import CliRunner

    from tiktrue.cli import app
    from tiktrue.control import model_repository

    calls = []
    monkeypatch.setattr(model_repository, "serve_repository", lambda *a: calls.append(a))
    result = CliRunner().invoke(app, ["models", "serve", str(repo.root), "--port", "9999"])
    assert result.exit_code == 0, result.output
    assert f"model repository: http://127.0.0.1:9999/ (models: broken, {repo.model_id})" in (
        result.output
    )
    assert calls == [(repo.root, "127.0.0.1", 9999)]


# --- downloads ------------------------------------------------------------------------------


def test_full_download_verifies_and_equals_the_source(repo, tmp_path):
    events: list[DownloadProgress] = []
    store = repo.download(tmp_path, progress_callback=events.append)
    assert store.root == tmp_path / repo.model_id
    assert store.verify() == []
    source = repo.source.manifest
    assert (store.root / MANIFEST).read_bytes() == (repo.source.root / MANIFEST).read_bytes()
    for entry in source.blocks.values():
        assert (store.root / entry.file).read_bytes() == (
            repo.source.root / entry.file
        ).read_bytes()
    for name in source.files:
        assert (store.root / name).read_bytes() == (repo.source.root / name).read_bytes()
    assert not list(store.root.rglob("*.partial"))
    # progress: at least one event per chunk, totals consistent, each file finished once
    total = source.total_bytes + sum(f.bytes for f in source.files.values())
    assert all(e.total_bytes == total for e in events)
    assert events[-1].done_bytes == total
    chunk_events = [e for e in events if e.file == "layer_0" and not e.finished]
    assert len(chunk_events) >= source.blocks["layer_0"].chunk_count()
    finished = [e.file for e in events if e.finished]
    assert sorted(finished) == sorted([*source.model_chain_order, *source.files])
    assert not any(e.skipped for e in events)
    done = [e.done_bytes for e in events]
    assert done == sorted(done)
    # the manifest is the last thing fetched; each block with one request
    assert repo.recorder.log[0].path == f"/{repo.model_id}/{MANIFEST}"
    assert all(len(repo.recorder.served(repo.block_path(b))) == 1 for b in source.blocks)


def test_only_the_requested_blocks_are_downloaded(repo, tmp_path):
    store = repo.download(tmp_path, blocks=["layer_2", "layer_3"])
    assert store.verify(["layer_2", "layer_3"]) == []
    held = sorted(p.name for p in (store.root / "blocks").iterdir())
    assert held == ["layer_2.safetensors", "layer_3.safetensors"]
    assert (store.root / "config.json").is_file() and (store.root / "tokenizer.json").is_file()
    assert store.load_block("layer_2")
    fetched = {r.path for r in repo.recorder.log if "/blocks/" in r.path}
    assert fetched == {repo.block_path("layer_2"), repo.block_path("layer_3")}
    with pytest.raises(DownloadError, match="no block.*layer_99"):
        repo.download(tmp_path, blocks=["layer_99"])


def test_an_interrupted_download_resumes_with_a_range_request(repo, tmp_path):
    events: list[DownloadProgress] = []
    with pytest.raises(Stop):
        repo.download(tmp_path, progress_callback=stop_after("layer_1", 5, events))
    dest = tmp_path / repo.model_id
    partial = partial_of(dest, "layer_1")
    kept = partial.stat().st_size
    assert kept == 5 * CHUNK
    assert not (dest / "blocks" / "layer_1.safetensors").exists()
    assert not (dest / MANIFEST).exists()  # incomplete: no manifest
    with pytest.raises(StoreError):
        BlockStore(dest)

    repo.recorder.reset()
    events.clear()
    store = repo.download(tmp_path, progress_callback=events.append)
    assert store.verify() == []
    path = repo.block_path("layer_1")
    (request,) = repo.recorder.served(path)
    assert request.range == f"bytes={kept}-" and request.status == 206
    assert repo.recorder.bytes_served(path) == repo.source.manifest.blocks["layer_1"].bytes - kept
    skipped = {e.file for e in events if e.skipped}
    assert {"embed", "layer_0", "config.json"} <= skipped
    assert not repo.recorder.served(repo.block_path("layer_0"))


def test_a_bad_chunk_in_the_partial_file_cuts_the_resume_back(repo, tmp_path):
    with pytest.raises(Stop):
        repo.download(tmp_path, progress_callback=stop_after("layer_2", 6, []))
    partial = partial_of(tmp_path / repo.model_id, "layer_2")
    flip_byte(partial, 2 * CHUNK + 7)  # chunk 2 damaged on disk: keep chunks 0 and 1 only
    repo.recorder.reset()
    store = repo.download(tmp_path, blocks=["layer_2"])
    assert store.verify(["layer_2"]) == []
    (request,) = repo.recorder.served(repo.block_path("layer_2"))
    assert request.range == f"bytes={2 * CHUNK}-"


def test_a_corrupted_chunk_is_fetched_again(repo, tmp_path):
    path = repo.block_path("layer_3")
    bad = 3 * CHUNK + 10
    repo.recorder.corrupt[path] = [bad, 1]  # the first copy of chunk 3 is damaged in transit
    store = repo.download(tmp_path, blocks=["layer_3"])
    assert store.verify(["layer_3"]) == []
    assert repo.recorder.times_sent(path, bad) == 2
    ranges = [r.range for r in repo.recorder.served(path)]
    assert ranges[:2] == [None, f"bytes={3 * CHUNK}-{4 * CHUNK - 1}"]  # exactly that chunk


def test_a_chunk_that_is_always_corrupt_is_a_download_error(repo, tmp_path):
    path = repo.block_path("layer_4")
    repo.recorder.corrupt[path] = [3 * CHUNK, 1000]
    with pytest.raises(DownloadError, match=r"block 'layer_4'.*chunk 3"):
        repo.download(tmp_path, blocks=["layer_4"], retries=2)
    dest = tmp_path / repo.model_id
    assert repo.recorder.times_sent(path, 3 * CHUNK) == 3  # first copy + 2 retries
    assert not (dest / "blocks" / "layer_4.safetensors").exists()
    assert not (dest / MANIFEST).exists()
    assert partial_of(dest, "layer_4").stat().st_size == 3 * CHUNK  # the good chunks stay


def test_blocks_already_held_are_not_downloaded_again(repo, tmp_path):
    repo.download(tmp_path)
    repo.recorder.reset()
    events: list[DownloadProgress] = []
    store = repo.download(tmp_path, progress_callback=events.append)
    assert store.verify() == []
    assert [r.path for r in repo.recorder.log] == [f"/{repo.model_id}/{MANIFEST}"]
    assert all(e.skipped and e.finished for e in events)
    assert len(events) == len(repo.source.manifest.blocks) + len(repo.source.manifest.files)

    # a held block damaged on disk: only the chunks from the damage on are fetched again
    final = store.root / repo.source.manifest.blocks["layer_5"].file
    flip_byte(final, 7 * CHUNK + 1)
    repo.recorder.reset()
    store = repo.download(tmp_path)
    assert store.verify() == []
    (request,) = repo.recorder.served(repo.block_path("layer_5"))
    assert request.range == f"bytes={7 * CHUNK}-"
    assert len(repo.recorder.log) == 2


def test_a_server_that_ignores_range_still_works(repo, tmp_path):
    with pytest.raises(Stop):
        repo.download(tmp_path, progress_callback=stop_after("layer_1", 4, []))
    repo.recorder.reset()
    repo.recorder.ignore_range = True
    path = repo.block_path("layer_5")
    repo.recorder.corrupt[path] = [CHUNK + 3, 1]
    store = repo.download(tmp_path)
    assert store.verify() == []
    (request,) = repo.recorder.served(repo.block_path("layer_1"))
    assert request.range == f"bytes={4 * CHUNK}-" and request.status == 200
    statuses = [(r.range, r.status) for r in repo.recorder.served(path)]
    assert statuses == [(None, 200), (f"bytes={CHUNK}-{2 * CHUNK - 1}", 200)]


def test_a_dropped_connection_resumes_from_the_last_good_chunk(repo, tmp_path):
    path = repo.block_path("layer_0")
    repo.recorder.drop[path] = [5 * CHUNK + 100, 2]  # twice in a row, mid-chunk
    store = repo.download(tmp_path, blocks=["layer_0"])
    assert store.verify(["layer_0"]) == []
    ranges = [r.range for r in repo.recorder.served(path)]
    assert ranges == [None, f"bytes={5 * CHUNK}-", f"bytes={5 * CHUNK}-"]


def test_unknown_model_unreachable_server_and_bad_manifest(repo, tmp_path):
    with pytest.raises(DownloadError, match="'nope' not found"):
        download_model_blocks("nope", repo.url, dest_root=tmp_path)
    with pytest.raises(DownloadError, match="invalid manifest"):
        download_model_blocks("broken", repo.url, dest_root=tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(DownloadError, match="cannot reach"):
        download_model_blocks(repo.model_id, f"http://127.0.0.1:{closed}", dest_root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_full_disk_is_a_download_error(repo, tmp_path, monkeypatch):
    dest = tmp_path / repo.model_id
    if Path("/dev/full").exists():  # a real ENOSPC from the kernel
        dest.mkdir()
        (dest / "config.json.partial").symlink_to("/dev/full")
        with pytest.raises(DownloadError, match="disk full"):
            repo.download(tmp_path)
        assert not (dest / "config.json").exists() and not (dest / MANIFEST).exists()
    monkeypatch.setattr(model_downloader, "_free_bytes", lambda path: 1000)
    with pytest.raises(DownloadError, match="not enough disk space"):
        repo.download(tmp_path)
