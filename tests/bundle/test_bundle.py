"""The PyInstaller bundle's own executables do the journey's first steps: import the demo
model, run a node (``service_runner``), create a network, answer a chat. Run by ``make
bundle-test`` after ``make bundle`` (TIKTRUE_BUNDLE=dist/tiktrue); skipped in ``make test``,
which builds no bundle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tiktrue.model.demo_model import GGUF_NAME
from tiktrue.paths import run_file

pytestmark = pytest.mark.integration
BUNDLE = os.environ.get("TIKTRUE_BUNDLE")
START_TIMEOUT_S = 180.0


@pytest.fixture
def bundle() -> Path:
    if not BUNDLE:
        pytest.skip("no bundle given: `make bundle-test` builds one and runs this")
    path = Path(BUNDLE).resolve()
    assert (path / "tiktrue").is_file(), f"{path} holds no bundle: make bundle"
    return path


@pytest.fixture
def demo_gguf(demo_store) -> Path:
    """The demo's GGUF file, as `make demo` fetches it (cached beside the demo_store)."""
    cache = Path(os.environ.get("TIKTRUE_TEST_CACHE", Path.home() / ".cache" / "tiktrue-tests"))
    path = cache / "cache" / "demo" / GGUF_NAME
    assert path.is_file()
    return path


def test_bundle_imports_the_demo_model_runs_a_node_and_answers(bundle, demo_gguf, tmp_path):
    env = {**os.environ, "TIKTRUE_HOME": str(tmp_path / "home")}
    env.pop("PYTHONPATH", None)

    def tiktrue(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(bundle / "tiktrue"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
            **kwargs,
        )

    assert tiktrue("--version").stdout.strip() == "0.1.0"
    imported = tiktrue("models", "import", str(demo_gguf), "--id", "smollm2").stdout
    assert "imported smollm2: llama, 30 layers" in imported

    log = (tmp_path / "node.log").open("wb")
    node = subprocess.Popen(
        [str(bundle / "service_runner"), "--control-port", "0", "--api-port", "0"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        home = tmp_path / "home"
        while not run_file(home).is_file():
            assert node.poll() is None, (tmp_path / "node.log").read_text()
            assert time.monotonic() < deadline, "the bundle's node did not start"
            time.sleep(0.2)
        api = json.loads(run_file(home).read_text())["api"]
        assert tiktrue("network", "create", "Office", "--model", "smollm2").returncode == 0
        # the network is served once its block server runs
        while not all(httpx.get(api.removesuffix("/v1") + "/health").json()["healthy"].values()):
            assert time.monotonic() < deadline, "the network did not come up"
            time.sleep(0.5)
        answered = tiktrue(
            "chat",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            input="What is the capital of France?\n/exit\n",
        )
        answer = answered.stdout.split("model> ", 1)[1].split("\nyou> ", 1)[0].strip()
        assert len(answer.split()) >= 3, answered.stdout  # words from the model
        models = httpx.get(f"{api}/models").json()["data"]
        assert [m["id"] for m in models] and "error" not in answered.stdout
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(60) == 0  # the node service stops cleanly
        log.close()
