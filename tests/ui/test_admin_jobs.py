"""The dashboard's long jobs on real files and a real HTTP repository: import a model folder,
verify it (a flipped byte is named), download it on another PC's data dir with progress; and
accounts and keys (shown once, revoked, refusals with codes)."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.http_server import serve
from tests.helpers.tiny_models import make_tiny_model
from tiktrue.control.model_repository import repository_app
from tiktrue.security.users import UserStore
from tiktrue.ui.admin.errors import AdminError
from tiktrue.ui.admin.operations import AdminOperations


def run_job(ops: AdminOperations, start) -> dict:
    """Start a job on a loop and wait for its end; returns its final view and every
    fraction seen while it ran."""

    async def go():
        job = start()
        seen = []
        while job.state == "running":
            seen.append(job.fraction)
            await asyncio.sleep(0.01)
        await ops.jobs.wait(job.id)
        return {**job.as_dict(), "seen": seen}

    return asyncio.run(go())


def test_import_verify_and_download_models_as_jobs(tmp_path):
    source = make_tiny_model(tmp_path / "folder", "llama")
    admin = AdminOperations(tmp_path / "admin")

    imported = run_job(admin, lambda: admin.import_model(str(source), "tiny"))
    assert imported["state"] == "done", imported
    assert imported["result"]["model_id"] == "tiny"
    [listed] = admin.models()
    assert listed["model_id"] == "tiny" and listed["layers"] > 0 and listed["networks"] == []
    with pytest.raises(AdminError) as twice:
        admin.import_model(str(source), "tiny")
    assert twice.value.code == "conflict"
    with pytest.raises(AdminError) as nowhere:
        admin.import_model(str(tmp_path / "nothing"), "other")
    assert nowhere.value.code == "not_found"

    verified = run_job(admin, lambda: admin.verify_model("tiny"))
    assert verified["state"] == "done" and verified["fraction"] == 1.0

    # another PC downloads it from this one's repository, with progress
    other = AdminOperations(tmp_path / "other")
    with serve(repository_app(admin.models_root)) as url:
        got = run_job(other, lambda: other.download_model("tiny", url))
    assert got["state"] == "done", got
    assert got["total"] == got["done"] >= got["result"]["bytes"] > 0  # blocks + tokenizer
    assert [m["model_id"] for m in other.models()] == ["tiny"]

    # a flipped byte in one block: the verify job fails and names it
    block = other.models_root / "tiny" / "blocks" / "layer_0.safetensors"
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF
    block.write_bytes(bytes(data))
    broken = run_job(other, lambda: other.verify_model("tiny"))
    assert broken["state"] == "failed"
    assert broken["error"]["code"] == "corrupt_block" and "layer_0" in broken["error"]["message"]


def test_accounts_and_keys(tmp_path):
    ops = AdminOperations(tmp_path, users=UserStore(tmp_path, rounds=4))

    async def go():
        first = await ops.add_user("ada", "a long password")
        assert first["role"] == "admin"  # the first account
        bob = await ops.add_user("bob", "another password", rpm=5)
        assert (bob["role"], bob["rpm"]) == ("user", 5)
        with pytest.raises(AdminError) as short:
            await ops.add_user("eve", "short")
        assert short.value.code == "user_error" and short.value.status == 400
        with pytest.raises(AdminError) as again:
            await ops.add_user("bob", "another password")
        assert again.value.status == 409

        made = await ops.create_key("bob", name="laptop", days=30, rpd=100)
        assert made["key"].startswith("tt-") and made["record"]["state"] == "active"
        listed = await ops.list_keys("bob")
        assert [k["id"] for k in listed] == [made["record"]["id"]]
        assert made["key"] not in repr(listed)
        assert (await ops.revoke_key(made["record"]["id"]))["state"] == "revoked"
        with pytest.raises(AdminError) as gone:
            await ops.revoke_key(999)
        assert gone.value.status == 404

        limited = await ops.set_user_limits("bob", rpm=None, rpd=50)
        assert (limited["rpm"], limited["rpd"]) == (None, 50)
        await ops.remove_user("bob")
        assert [u["name"] for u in await ops.list_users()] == ["ada"]

    asyncio.run(go())
    assert ops.set_anonymous_access(True) and ops.anonymous_access()
    assert not ops.set_anonymous_access(False)
