"""The node service's monitoring: its metrics (read at scrape time from the parts the node
already has), the answer listener every gateway calls once per answer (metrics, history, token
quotas), and the background work that keeps history, alerts and Prometheus targets current.

The node service builds one ``NodeMonitoring`` and calls ``start``/``stop``; nothing here runs
on the per-token path: an answer's figures come from its ``GenerationResult`` when it ends,
and every database write goes to one worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import weakref
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from tiktrue.gateway.auth import current_caller
from tiktrue.monitoring.alerts import AlertTracker, thresholds_of
from tiktrue.monitoring.alerts import node_figures as alert_figures
from tiktrue.monitoring.history import AnswerFigures, HistoryStore
from tiktrue.monitoring.metrics import NodeMetrics
from tiktrue.monitoring.prometheus_config import read_settings, target_groups, write_targets
from tiktrue.node.metrics_server import MetricsServer
from tiktrue.node.node_tasks import TaskHooks, TaskRunner
from tiktrue.node.resources import heartbeat_stats
from tiktrue.protocol.network_config import list_configs
from tiktrue.security.node_tls import NetworkCredentials
from tiktrue.security.users import Principal, UserStore
from tiktrue.service.control_server import probe_speed

if TYPE_CHECKING:
    from tiktrue.gateway.api_client import Gateway
    from tiktrue.model.generation import GenerationResult

log = logging.getLogger("tiktrue.monitoring")
TICK_S = 2.0  # metrics ports and Prometheus targets follow the configs this often
SAMPLE_S = 60.0  # the admin's nodes' heartbeat figures into the history
COMPACT_S = 3600.0
TTFT_WINDOW_S = 300.0  # the TTFT alert reads the answers of the last five minutes
TTFT_MIN_ANSWERS = 5  # fewer than this: no p95 worth an alert
TTFT_KEPT = 2000
UNSPECIFIED = ("0.0.0.0", "::", "")


def answer_figures(
    network_id: str,
    model_id: str,
    result: GenerationResult,
    caller: Principal | None,
    version: int = 0,
) -> AnswerFigures:
    """What the history keeps of an answer: its sums, and per node its decode steps' compute,
    their wait there and its link's ping (the rebalancing reads them)."""
    compute: dict[str, list] = {}
    waits: dict[str, float] = {}
    links: dict[str, list] = {}
    transit = 0.0
    for timing in result.step_timings:
        transit += max(0.0, timing.transit_ms())
        for node in timing.nodes:
            if node.get("compute_ms") is None:
                continue
            name = str(node.get("node", "?"))
            held = compute.setdefault(name, [0, 0.0])
            held[0] += 1
            held[1] += node["compute_ms"]
            waited = (node.get("total_ms") or 0.0) - node["compute_ms"]
            waits[name] = waits.get(name, 0.0) + max(0.0, waited)
            if node.get("link_rtt_ms") is not None:
                ping = links.setdefault(name, [0, 0.0])
                ping[0] += 1
                ping[1] += node["link_rtt_ms"]
    return AnswerFigures(
        network_id,
        model_id,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=len(result.token_ids),
        decode_steps=result.decode_steps,
        decode_s=result.decode_seconds,
        ttft_s=result.time_to_first_token,
        user_id=caller.user_id if caller is not None else None,
        key_id=caller.key_id if caller is not None else None,
        node_compute_ms={k: (v[0], v[1]) for k, v in compute.items()},
        node_wait_ms=waits,
        node_link_ms={k: (v[0], v[1]) for k, v in links.items()},
        transit_ms=transit,
        config_version=version,
    )


def principal_of(owner: str | None) -> Principal | None:
    """The account an answer's owner names (``user:<id>``), when no request told its caller
    (the web chat)."""
    if owner and owner.startswith("user:") and owner[5:].isdigit():
        return Principal(user_id=int(owner[5:]))
    return None


class NodeMonitoring:
    def __init__(self, service) -> None:
        """``service``: the ``NodeService`` it serves (not imported: that module imports this
        one); it reads its events, gateways, health monitors, control channel and address."""
        self.service = service
        self.data_dir = service.data_dir
        self.node_id = service.identity.node_id
        self.metrics = NodeMetrics(self.node_id, figures=self.figures)
        service.events.add_listener(self.metrics.on_event)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="monitoring")
        self._users: UserStore | None = None
        self.metrics_servers: dict[str, MetricsServer] = {}  # network -> its metrics port
        self.history = HistoryStore(self.data_dir)
        self.tasks = TaskRunner(
            self.data_dir,
            TaskHooks(
                probe=probe_speed,
                restart=self._restart_soon,
                on_event=self._task_event,
            ),
        )
        self._sampled = self._compacted = 0.0  # monotonic time of the last sample, compaction
        self._thresholds = thresholds_of(read_settings(self.data_dir))
        self.alerts = AlertTracker(lambda: self._thresholds, self._alert_event)
        self._watched: weakref.WeakSet = weakref.WeakSet()  # health monitors heard
        self._ttfts: dict[str, deque] = defaultdict(lambda: deque(maxlen=TTFT_KEPT))
        self._loop: asyncio.Task | None = None

    # --- figures read at scrape time ---------------------------------------------------------

    def figures(self) -> dict:
        """What the metrics collector reads (see ``FiguresCollector``)."""
        service = self.service
        networks = {}
        for config in list_configs(self.data_dir):
            if self.node_id not in config.node_ids:
                continue
            server = service.servers.get(config.network_id)
            entry = {
                "version": config.version,
                "role": config.node(self.node_id).role,
                "serving": server is not None and server.engine is not None,
            }
            if server is not None:
                entry |= server.health_stats()
            networks[config.network_id] = entry
        gateways = {
            network_id: {
                "model": gateway.model_id,
                "running": gateway.sessions.running(),
                "healthy": gateway.healthy,
                "sessions": len(gateway.sessions),
            }
            for network_id, gateway in list(service.gateways.items())
        }
        health = {
            network_id: {
                node.node_id: {"state": node.state, "rtt_ms": node.rtt_ms}
                for node in list(monitor.nodes.values())
            }
            for network_id, monitor in list(service.health.items())
        }
        return {
            "node": heartbeat_stats(self.data_dir),
            "networks": networks,
            "gateways": gateways,
            "health": health,
        }

    # --- each answer -------------------------------------------------------------------------

    async def answered(
        self, gateway: Gateway, result: GenerationResult, owner: str | None, completed: bool
    ) -> None:
        """A gateway's answer ended (``Gateway.on_answer``): the counters here, the writes on
        the worker thread, awaited so that the caller's next request sees its tokens counted
        (a cancelled caller does not cancel the write)."""
        try:
            self.metrics.record_answer(gateway.network_id, gateway.model_id, result, not completed)
            if result.token_ids:
                self._ttfts[gateway.network_id].append(
                    (time.monotonic(), result.time_to_first_token)
                )
            caller = current_caller() or principal_of(owner)
            write = self._writer.submit(
                self._record,
                gateway.network_id,
                gateway.model_id,
                result,
                caller,
                gateway.config.version,
            )
        except Exception:  # the answer is given; its figures must not break it
            log.exception("network %s: cannot record an answer", gateway.network_id)
            return
        await asyncio.shield(asyncio.wrap_future(write))

    def _record(
        self,
        network_id: str,
        model_id: str,
        result: GenerationResult,
        caller: Principal | None,
        version: int = 0,
    ) -> None:
        """On the worker thread: the answer into the history, and its tokens against its
        caller's quotas."""
        try:
            tokens = result.prompt_tokens + len(result.token_ids)
            figures = answer_figures(network_id, model_id, result, caller, version)
            self.history.record_answer(figures)
            if caller is not None and not caller.anonymous:
                self._count_tokens(caller, tokens)
        except Exception:  # logged; the answer was given
            log.exception("network %s: cannot record an answer", network_id)

    def _count_tokens(self, caller: Principal, tokens: int) -> None:
        try:
            if self._users is None:
                self._users = UserStore(self.data_dir)
            self._users.count_tokens(caller, tokens)
        except Exception:
            log.exception("cannot count %d tokens of account %s", tokens, caller.user_id)

    def flush(self) -> None:
        """Wait for the writes handed to the worker so far (tests, stop)."""
        self._writer.submit(lambda: None).result()

    # --- the metrics port (no gateway here) and Prometheus's targets (admin) ------------------

    def metrics_address(self, network_id: str) -> dict | None:
        """Where this node's metrics of ``network_id`` are read: the gateway's port when one
        runs, else the network's metrics port (None: not yet)."""
        service = self.service
        if service.api_url is not None:
            port = int(service.api_url.rsplit(":", 1)[1].split("/")[0])
            host = service.api_host if service.api_host not in UNSPECIFIED else service.host
            return {"scheme": "http", "host": host, "port": port}
        server = self.metrics_servers.get(network_id)
        if server is None or server.port is None:
            return None
        return {"scheme": "https", "host": service.host, "port": server.port}

    async def _sync_metrics_servers(self) -> None:
        """One metrics port per network this node is in, while no gateway runs here."""
        wanted = set()
        if self.service.api_port is None:
            for config in list_configs(self.data_dir):
                if self.node_id in config.node_ids:
                    wanted.add(config.network_id)
        for network_id in set(self.metrics_servers) - wanted:
            await self.metrics_servers.pop(network_id).stop()
        for network_id in wanted - set(self.metrics_servers):
            try:
                credentials = NetworkCredentials.load(self.data_dir, network_id)
                server = MetricsServer(
                    network_id,
                    credentials,
                    self.metrics.render,
                    revoked=functools.partial(self._revoked, network_id),
                )
                await server.start(self.service.host)
            except Exception:  # tried again on the next round
                log.exception("network %s: cannot open the metrics port", network_id)
                continue
            self.metrics_servers[network_id] = server
            log.info(
                "network %s: metrics on https://%s:%d/metrics",
                network_id,
                self.service.host,
                server.port,
            )

    def _revoked(self, network_id: str) -> frozenset[str]:
        control = self.service.control
        return control.revoked.get(network_id, frozenset()) if control is not None else frozenset()

    def write_targets(self) -> None:
        """Admin: Prometheus's targets of each network it administers, from the configs and
        the metrics address each node's heartbeat tells (when ``ops prometheus`` set it up)."""
        folder = read_settings(self.data_dir).get("prometheus_dir")
        if not folder:
            return
        for network_id, monitor in list(self.service.health.items()):
            nodes = []
            for entry in monitor.config.nodes:
                if entry.node_id == self.node_id:
                    address = self.metrics_address(network_id)
                else:
                    health = monitor.nodes.get(entry.node_id)
                    address = health.stats.get("metrics") if health is not None else None
                nodes.append({"node_id": entry.node_id, "role": entry.role, "metrics": address})
            if write_targets(Path(folder), network_id, target_groups(network_id, nodes)):
                log.info("network %s: Prometheus targets written in %s", network_id, folder)

    # --- threshold alerts --------------------------------------------------------------------

    async def _check_alerts(self) -> None:
        """Hear every admin's heartbeats (RAM, disk, KV of each node), and check this
        gateway's queue and TTFT p95; thresholds re-read each round (``ops alerts``)."""
        self._thresholds = thresholds_of(await asyncio.to_thread(read_settings, self.data_dir))
        for network_id, monitor in list(self.service.health.items()):
            if monitor not in self._watched:
                self._watched.add(monitor)
                monitor.add_beat_listener(self._on_beat)
            self.alerts.forget(network_id, set(monitor.nodes))
        now = time.monotonic()
        for network_id, gateway in list(self.service.gateways.items()):
            figures = {"queue_length": gateway.sessions.running()}
            recent = sorted(t for at, t in self._ttfts[network_id] if now - at <= TTFT_WINDOW_S)
            if len(recent) >= TTFT_MIN_ANSWERS:
                figures["ttft_p95_s"] = recent[min(len(recent) - 1, int(0.95 * len(recent)))]
            self.alerts.observe(network_id, self.node_id, figures)

    def _on_beat(self, network_id: str, node_id: str, stats: dict) -> None:
        self.alerts.observe(network_id, node_id, alert_figures(stats))

    def _alert_event(self, event: str, **fields) -> None:
        self.service.events.log_system_events(event, **fields)
        labels = (fields["network_id"], fields["node_id"], fields["alert"])
        if event == "alert_raised":
            self.metrics.alerts.labels(*labels).set(1)
        else:
            with contextlib.suppress(KeyError):
                self.metrics.alerts.remove(*labels)

    def _restart_soon(self) -> None:
        """From the task's thread: the node stops (and starts again) on its own loop."""
        if not self.service.can_restart:
            raise RuntimeError("this node runs inside `tiktrue app`: restart the app instead")
        self._event_loop.call_soon_threadsafe(self.service.request_restart)

    def _task_event(self, event: str, **fields) -> None:
        self.service.events.log_system_events(event, node_id=self.node_id, **fields)
        if event == "task_finished":
            self.metrics.tasks.labels(fields.get("task"), fields.get("status")).inc()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        await self._sync_metrics_servers()
        self._loop = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            steps = (
                self._sync_metrics_servers,
                self._write_targets_in_thread,
                self._sample,
                self._check_alerts,
            )
            for step in steps:
                try:
                    await step()
                except Exception:  # the next tick tries again
                    log.exception("monitoring: %s failed", step.__name__)

    async def _sample(self) -> None:
        """Admin: each node's heartbeat figures into the history once a minute; the history
        compacted once an hour."""
        now = time.monotonic()
        if now - self._sampled >= SAMPLE_S:
            self._sampled = now
            for network_id, monitor in list(self.service.health.items()):
                nodes = {
                    node.node_id: {"state": node.state, **node.stats}
                    for node in list(monitor.nodes.values())
                }
                await self._in_writer(self.history.record_nodes, network_id, nodes)
        if now - self._compacted >= COMPACT_S:
            self._compacted = now
            await self._in_writer(self.history.compact)

    async def _in_writer(self, function, *args):
        return await asyncio.wrap_future(self._writer.submit(function, *args))

    async def _write_targets_in_thread(self) -> None:
        await asyncio.to_thread(self.write_targets)

    async def stop(self) -> None:
        await self.tasks.stop()
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        for server in self.metrics_servers.values():
            await server.stop()
        self.metrics_servers.clear()
        self._writer.shutdown(wait=True)
        self.history.close()
        if self._users is not None:
            self._users.close()
