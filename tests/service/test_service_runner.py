"""The node service in this process: answers that must stay cheap (they run on its event
loop), and what goes on while it reloads."""

from __future__ import annotations

import asyncio
import logging
import threading
from types import SimpleNamespace

import psutil

from tiktrue.control.discovery import NodeAnnouncement, NodeAnnouncer
from tiktrue.gateway import api_client
from tiktrue.model.engine import Span
from tiktrue.model.errors import StoreError
from tiktrue.model.store import MANIFEST, BlockStore
from tiktrue.node.control_link import ControlLink
from tiktrue.protocol.network_config import config_path
from tiktrue.service.local_network import prepare_local_network
from tiktrue.service.service_runner import NodeService


def test_node_info_and_heartbeat_never_wait_for_a_cpu_sample(tmp_path, monkeypatch):
    """``cpu_percent(interval=0.1)`` blocked the control channel for 100 ms per call."""
    service = NodeService(tmp_path / "home", host="127.0.0.1", announce=False)  # primes the counter
    intervals = []
    real = psutil.cpu_percent

    def recording(interval=None, percpu=False):
        intervals.append(interval)
        return real(interval=None, percpu=percpu)

    monkeypatch.setattr(psutil, "cpu_percent", recording)
    info = service.node_info()
    beat = service.heartbeat("no-such-network")
    assert intervals and all(i is None for i in intervals), intervals
    assert info["resources"]["cpu_cores_logical"] >= 1
    assert beat["serving"] is False and beat["rss_bytes"] > 0 and beat["version"] is None


CEILING_S = 60.0


class Hold:
    """Holds the first call of a function (run as it is after that) until ``release()`` or the
    ceiling, and notes in ``order`` when that call started and ended."""

    def __init__(self, monkeypatch, owner, name: str) -> None:
        self.order: list[str] = []
        self.started = threading.Event()
        self._release = threading.Event()
        real = getattr(owner, name)

        def held(*args, **kwargs):
            first = not self.started.is_set()
            if first:
                self.order.append(f"{name} started")
                self.started.set()
                self._release.wait(CEILING_S)
            result = real(*args, **kwargs)
            if first:
                self.order.append(f"{name} done")
            return result

        monkeypatch.setattr(owner, name, held)

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, CEILING_S), "the call never came"

    def release(self) -> None:
        self._release.set()


async def ping(service: NodeService, hold: Hold, reload: asyncio.Task) -> None:
    """While ``hold`` holds the reload: a ping round trip on the control channel."""
    async with ControlLink(
        f"127.0.0.1:{service.control.port}",
        expected_node_id=service.identity.node_id,
        owner=service.identity,  # a ping is for members and the node's owner
    ) as link:
        await hold.wait_started()
        await link.call("ping")
        hold.order.append("pong")
        hold.release()
        await reload


def _one_node(store, base):
    chain = store.manifest.model_chain_order
    [home], _ = prepare_local_network(
        base, store, spans=[Span.of(chain, chain[0], chain[-1])], network_id="solo"
    )
    return home, chain


def test_the_control_channel_answers_while_a_reload_loads_a_span(tiny_llama, tmp_path, monkeypatch):
    """A reload loads and hashes the span's blocks off the event loop: a ping sent while the
    first block is loading is answered before that load ends (the load is held until the
    answer is in, or the ceiling passes: the order is the proof)."""
    home, chain = _one_node(tiny_llama, tmp_path)

    async def go() -> Hold:
        service = NodeService(home, host="127.0.0.1", announce=False)
        await service.start()
        hold = Hold(monkeypatch, BlockStore, "load_block")
        try:
            await ping(service, hold, asyncio.create_task(service.reload(force=True)))
            assert service.servers["solo"].span.blocks == tuple(chain)
        finally:
            hold.release()
            await service.stop()
        return hold

    hold = asyncio.run(go())
    assert hold.order == ["load_block started", "pong", "load_block done"]


def test_the_control_channel_answers_while_a_gateway_loads_its_tokenizer(
    tiny_llama, tmp_path, monkeypatch
):
    """A network joined while the node runs: its gateway's tokenizer loads off the loop."""
    home, _ = _one_node(tiny_llama, tmp_path)
    path = config_path(home, "solo")
    away = path.with_name("away.json")
    path.rename(away)  # the node starts in no network

    async def go() -> Hold:
        service = NodeService(home, host="127.0.0.1", announce=False, api_port=0)
        await service.start()
        hold = Hold(monkeypatch, api_client, "load_tokenizer")
        try:
            assert not service.gateways
            away.rename(path)
            await ping(service, hold, asyncio.create_task(service.reload()))
            assert service.gateways["solo"].tokenizer is not None
        finally:
            hold.release()
            await service.stop()
        return hold

    hold = asyncio.run(go())
    assert hold.order == ["load_tokenizer started", "pong", "load_tokenizer done"]


def test_a_failed_replan_is_logged_with_its_traceback(tiny_llama, tmp_path, caplog):
    home, _ = _one_node(tiny_llama, tmp_path)
    (home / "models" / tiny_llama.model_id / MANIFEST).unlink()  # the admin lost its copy

    async def go() -> None:
        service = NodeService(home, host="127.0.0.1", announce=False)
        service.schedule_replan("solo", delay=0)
        await service._replans["solo"]

    with caplog.at_level(logging.ERROR, logger="tiktrue.node"):
        asyncio.run(go())
    [record] = [r for r in caplog.records if "re-plan after a join failed" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is StoreError


def test_a_failed_announcement_update_is_logged(tiny_llama, tmp_path, caplog):
    """The LAN announcement cannot be updated: a warning says why (it was swallowed)."""
    home, _ = _one_node(tiny_llama, tmp_path)
    other = NodeAnnouncement(node_id="0123456789abcdef", control_port=7481)

    async def go() -> None:
        service = NodeService(home, host="127.0.0.1", announce=False)
        service.control = SimpleNamespace(port=7481)
        service.announcer = NodeAnnouncer(other)  # speaks for another node: update refuses
        await service._announce_update()

    with caplog.at_level(logging.WARNING, logger="tiktrue.node"):
        asyncio.run(go())
    [record] = [r for r in caplog.records if "announcement" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "an announcer speaks for node 0123456789abcdef" in record.getMessage()


def test_node_info_does_not_sleep_to_sample_the_cpu(tiny_llama, tmp_path, monkeypatch):
    """node_info answers on the event loop: it reads the CPU load since the last reading
    instead of sampling it for a while (psutil sleeps for the interval it is given)."""
    home, _ = _one_node(tiny_llama, tmp_path)
    service = NodeService(home, host="127.0.0.1", announce=False)
    intervals = []
    real = psutil.cpu_percent

    def cpu_percent(interval=None, percpu=False):
        intervals.append(interval)
        return real(interval, percpu)

    monkeypatch.setattr(psutil, "cpu_percent", cpu_percent)
    info = service.node_info()
    assert 0.0 <= info["resources"]["cpu_load_percent"] <= 100.0
    assert intervals and not any(intervals), intervals
    service.set_caps({"threads": 1})
    assert not any(intervals), intervals
