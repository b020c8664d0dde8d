"""``tiktrue node``: the node service (seed ``service_runner``).

One process per PC. It runs the node's control channel (join, config and block pushes), one
block server per network in which it serves blocks (asyncio, side by side), and the gateway's
HTTP app (OpenAI API, ``/ws``) for its networks when asked to. Whenever a network config
changes (a join, a push from the admin, the CLI) ``reload`` brings the running servers in line:
only servers whose span or neighbours changed restart, and the gateway moves its sessions to
the new chain by replaying their history. ``<data>/run/node.json`` tells the CLI and the demo
where everything listens.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

import psutil

from tiktrue import __version__
from tiktrue.control import config_sync
from tiktrue.control.block_repair import BlockRepairs, corrupt_event, repaired_event
from tiktrue.control.cert_renewal import keep_renewed
from tiktrue.control.config_writer import ConfigWriter
from tiktrue.control.failover_manager import FailoverManager, find_lost
from tiktrue.control.health_monitor import HealthMonitor, event_logger, report_suspect
from tiktrue.control.planner import DEFAULT_RUNTIME_BYTES as RUNTIME_BYTES
from tiktrue.control.planner import ModelProfile
from tiktrue.control.plans import apply_network
from tiktrue.gateway.api_client import Gateway
from tiktrue.gateway.auth import GatewayAuth
from tiktrue.gateway.metrics_route import metrics_router
from tiktrue.gateway.openai_api import create_app
from tiktrue.gateway.session_store import SessionStore
from tiktrue.gateway.session_sweeper import IDLE_TIMEOUT_S
from tiktrue.gateway.ws_api import ClientProtocol
from tiktrue.limits import KV_PAGE_TOKENS
from tiktrue.model.store import MANIFEST, BlockStore
from tiktrue.monitoring.monitoring_system import EventLog
from tiktrue.node.control_link import ControlError
from tiktrue.node.lan_address import choose_host, reach_note
from tiktrue.node.memory import release_free_memory
from tiktrue.node.model_node import BlockServer
from tiktrue.paths import run_file, write_text_atomic
from tiktrue.protocol.network_config import NetworkConfig, config_path, list_configs, read_config
from tiktrue.security.node_tls import NetworkCredentials, node_identity, reload_certificate
from tiktrue.service.control_server import ControlServer
from tiktrue.service.http_serving import GatewayHttp, trust_router
from tiktrue.service.node_monitoring import NodeMonitoring
from tiktrue.service.process_restart import restart_process
from tiktrue.ui.admin.api import admin_router
from tiktrue.ui.admin.operations import AdminOperations

log = logging.getLogger("tiktrue.node")
PULL_TIMEOUT = 15.0  # at start: how long the admin may take before the node goes on without


def _span_signature(config: NetworkConfig, node_id: str) -> tuple:
    """What a block server's weights and socket depend on: its span and its address. (Its
    neighbours and role can change in place: ``BlockServer.update_config``.)"""
    entry = config.node(node_id)
    return (config.model_id, tuple(entry.blocks), entry.host, entry.port, config.context_tokens)


class NodeService:
    def __init__(
        self,
        data_dir: Path,
        *,
        host: str | None = None,
        control_port: int = 0,
        api_host: str | None = None,
        api_port: int | None = None,
        kv_budget_mb: int = 512,
        announce: bool = True,
        session_idle_s: float = IDLE_TIMEOUT_S,
        web_ui: bool = False,
        gateway_tls: bool | None = None,
    ) -> None:
        """``host``: where the node listens and announces (None: this PC's LAN address, see
        ``node.lan_address``); ``api_host``: the gateway's (None: ``host``). ``web_ui``:
        serve the web UI at ``/`` beside the API (with ``api_port``; NiceGUI allows one UI
        per process). ``gateway_tls``: see ``http_serving.GatewayHttp`` (None: HTTPS unless
        on loopback)."""
        self.data_dir = Path(data_dir)
        self.web_ui = web_ui
        self.ui_url: str | None = None
        self.announce = announce
        self.announcer = None
        self._replans: dict[str, asyncio.Task] = {}
        self.identity = node_identity(self.data_dir)
        psutil.cpu_percent(None)  # node_info's first CPU reading covers the time since now
        self.address = choose_host(host)
        self.host = self.address.host
        self.control_port = control_port
        self.api_host, self.api_port = api_host or self.host, api_port
        self.gateway_tls = gateway_tls
        self.http: GatewayHttp | None = None
        self._certificates_changed = asyncio.Event()  # wakes the renewals (cert_renewal)
        self.lan_api_url: str | None = None  # what other PCs use (https), None on loopback
        self.kv_budget_mb = kv_budget_mb
        self.servers: dict[str, BlockServer] = {}
        self.gateways: dict[str, Gateway] = {}
        self.protocol = ClientProtocol(self.gateways)  # sees gateways added later
        self.api_url: str | None = None
        self.control = None
        self._lock = asyncio.Lock()
        self.started = False
        self.waiting: dict[str, str] = {}  # network -> why its block server is not running
        self.missing_blocks: dict[str, list[str]] = {}  # network -> blocks of its span not here
        self._pulls: dict[str, asyncio.Task] = {}  # network -> pulling until the admin answers
        self._broadcasts: dict[str, asyncio.Task] = {}  # network -> admin's latest broadcast
        # admin: the one writer of the configs of the networks it administers (a queue per
        # network that alone numbers versions): every change goes through it
        self.writer = ConfigWriter(self.data_dir, on_written=self._config_written)
        self._background: set[asyncio.Task] = set()
        self.events = EventLog(self.data_dir)
        self.failover = FailoverManager(
            self.data_dir, self.writer, event=self.events.log_system_events
        )
        self.repairs = BlockRepairs(
            self.data_dir, self.identity.node_id, self.events.log_system_events
        )
        self.health: dict[str, HealthMonitor] = {}  # networks this node administers
        self.admin_beats: dict[str, float] = {}  # network -> wall time of the admin's last beat
        self._suspect_reports: set[asyncio.Task] = set()
        psutil.cpu_percent(None)  # primes the counter: later reads never wait for a sample
        self.session_idle_s = session_idle_s
        self._session_store: SessionStore | None = None  # <data>/tiktrue.db, once a gateway runs
        self.admin: AdminOperations | None = None  # the dashboard's operations, with the gateway
        # metrics, history, alerts, Prometheus targets, tasks (see service.node_monitoring)
        self.monitoring = NodeMonitoring(self)
        self.stop_requested = asyncio.Event()  # a task asked the node to stop (and restart)
        self.restart = False
        self.can_restart = False  # run_node starts the process again; `tiktrue app` does not

    # --- caps ----------------------------------------------------------------------------

    def caps(self):
        from tiktrue.node.resources import NodeCaps

        path = self.data_dir / "caps.json"
        return (
            NodeCaps.model_validate_json(path.read_text("utf-8")) if path.exists() else NodeCaps()
        )

    def set_caps(self, caps: dict) -> dict:
        from tiktrue.node.resources import NodeCaps, collect_resources

        checked = NodeCaps.model_validate(caps)
        # refuses caps above what we have (no CPU sampling: this runs on the event loop)
        checked.effective(collect_resources(self.data_dir, cpu_sample_s=0))
        (self.data_dir / "caps.json").write_text(checked.model_dump_json(), "utf-8")
        return checked.model_dump()

    def _kv_budget(self, store: BlockStore, config: NetworkConfig, blocks: list[str]) -> int:
        """The KV page pool of a span: always room for one conversation of the network's
        whole context (what the plan reserved, computed as the planner does); more, up to
        ``--kv-budget-mb``, where the node's RAM (the same cap the planner used) leaves room,
        so that more conversations stay in RAM before the least recent spill to disk."""
        from tiktrue.node.resources import ram_cap

        model_config = store.config()
        context = config.context_length(model_config)
        context = -(-context // KV_PAGE_TOKENS) * KV_PAGE_TOKENS  # whole pages
        need = ModelProfile.from_manifest(store.manifest, model_config).kv_bytes(blocks, context)
        weights = sum(store.manifest.blocks[b].bytes for b in blocks)
        ram = ram_cap(self.caps().ram_bytes, psutil.virtual_memory().total)
        return max(need, min(self.kv_budget_mb << 20, ram - weights - RUNTIME_BYTES))

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.control = ControlServer(self)
        await self.control.start(self.host, self.control_port)
        level = logging.WARNING if self.address.how == "no LAN address" else logging.INFO
        log.log(
            level, "listening on %s (%s): %s", self.host, self.address.how, reach_note(self.host)
        )
        await self._sync_on_start()
        await self.reload()
        if self.api_port is not None:
            await self._start_http()
        self.started = True
        await self.monitoring.start()
        self._write_run_file()
        self.in_background(
            keep_renewed(self.data_dir, self._certificate_renewed, self._certificates_changed)
        )
        if self.announce:
            asyncio.create_task(self._announce())

    async def _announce(self) -> None:
        """Tell the LAN this node is here (zeroconf, ``_tiktrue._tcp``); best effort."""
        from tiktrue.control.discovery import NodeAnnouncer, announcement_for

        try:
            announcement = announcement_for(self.data_dir, self.control.port, host=self.host)
            self.announcer = NodeAnnouncer(announcement, interfaces=[self.host])
            await asyncio.to_thread(self.announcer.start)
        except Exception as exc:  # a LAN without multicast still has manual addresses
            log.warning("cannot announce on the LAN: %s", exc)
            self.announcer = None

    async def _announce_update(self) -> None:
        from tiktrue.control.discovery import announcement_for

        if self.announcer is not None:
            announcement = announcement_for(self.data_dir, self.control.port, host=self.host)
            try:
                await asyncio.to_thread(self.announcer.update, announcement)
            except Exception as exc:  # the LAN sees the old announcement; nothing else breaks
                log.warning("cannot update the LAN announcement: %s", exc)

    def _certificate_renewed(self, network_id: str) -> None:
        """A new certificate of the network (block servers and links show it already): the
        gateway serves it too when it is the one it serves."""
        if self.http is not None:
            self.http.refresh_tls()
        self.events.log_system_events("certificate_renewed", network_id=network_id)

    def schedule_replan(self, network_id: str, delay: float = 1.0) -> None:
        """After a join (admin side): plan again and move blocks, if the network wants it."""

        if not read_config(config_path(self.data_dir, network_id)).auto_plan:
            return
        running = self._replans.get(network_id)
        if running is not None and not running.done():
            running.cancel()  # several joins in a row: one plan for all of them
        self._replans[network_id] = asyncio.create_task(self._replan(network_id, delay))

    async def _replan(self, network_id: str, delay: float) -> None:
        await asyncio.sleep(delay)

        def planned(plan) -> None:
            log.info("network %s: new plan after a join\n%s", network_id, plan.describe())

        try:
            config = await apply_network(
                self.data_dir, network_id, writer=self.writer, planned=planned
            )
            log.info("network %s: now on config v%d", network_id, config.version)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("network %s: re-plan after a join failed: %s", network_id, exc)

    def _web_ui(self):
        """The web UI, with the parts of this node it shows (see ``tiktrue.ui.context``)."""
        from tiktrue.ui.context import UiContext
        from tiktrue.ui.main_app import WebUi

        if self._session_store is None:
            self._session_store = SessionStore.open(self.data_dir)
        context = UiContext(
            self.data_dir,
            gateways=self.gateways,
            health=self.health,
            events=self.events,
            node_info=self.node_info,
            reload=self.reload,
            sessions=self._session_store,
            admin=self.admin,
        )
        return WebUi(context)

    async def _start_http(self) -> None:
        auth = GatewayAuth(self.data_dir)
        self.admin = AdminOperations(
            self.data_dir,
            health=self.health,
            gateways=self.gateways,
            users=auth.users,
            discover_on=[self.host] if self.announce else None,
            writer=self.writer,
        )
        ui = self._web_ui() if self.web_ui else None
        routers = [
            admin_router(self.admin),
            trust_router(lambda: self.http),
            metrics_router(self.monitoring.metrics),
        ]
        app = create_app(self.gateways, self.protocol, auth, ui=ui, routers=routers)
        self.http = GatewayHttp(
            app,
            self.data_dir,
            self.api_host,
            self.api_port,
            lifespan="on" if ui else "off",  # the UI starts and stops with the server
            tls=self.gateway_tls,
        )
        await self.http.start()
        local, lan = self.http.local_base, self.http.lan_base
        self.api_url = f"{local or lan}/v1"
        self.lan_api_url = f"{lan}/v1" if lan else None
        log.info("OpenAI API on %s", self.api_url)
        if ui is not None:
            self.ui_url = f"{local or lan}/"
            log.info("web UI on %s (other PCs: %s)", self.ui_url, f"{lan}/" if lan else "none")

    async def stop(self) -> None:
        began = time.monotonic()
        for task in [
            *self._pulls.values(),
            *self._broadcasts.values(),
            *self._replans.values(),
            *self._background,
        ]:
            task.cancel()
        if self.announcer is not None:
            try:
                await asyncio.to_thread(self.announcer.stop)
            except Exception as exc:  # others drop this node when its announcement expires
                log.warning("cannot withdraw the LAN announcement: %s", exc)
        if self.http is not None:
            await self.http.stop()
        if self.admin is not None:
            await self.admin.close()
        for monitor in self.health.values():
            await monitor.stop()
        await self.failover.stop()
        await self.repairs.stop()
        for gateway in self.gateways.values():
            await gateway.aclose()
        if self._session_store is not None:
            self._session_store.db.close()
        for server in self.servers.values():
            await server.stop()
        if self.control is not None:
            await self.control.stop()
        await self.monitoring.stop()
        run_file(self.data_dir).unlink(missing_ok=True)
        log.info("node stopped in %.2f s", time.monotonic() - began)
        self.events.close()

    async def reload(self, *, force: bool = False) -> None:
        """Bring block servers and gateways in line with the configs on disk."""
        async with self._lock:
            threads = self.caps().threads
            if threads:  # the admin's cap on this node's CPU threads
                import torch

                torch.set_num_threads(threads)
            configs = {
                c.network_id: c
                for c in list_configs(self.data_dir)
                if self.identity.node_id in {n.node_id for n in c.nodes}
            }
            node_id = self.identity.node_id
            for network_id, server in list(self.servers.items()):
                config = configs.get(network_id)
                same = config is not None and _span_signature(config, node_id) == _span_signature(
                    server.config, node_id
                )
                if force or not same:
                    await server.stop()
                    del self.servers[network_id]
                    gc.collect()  # the old span's weights go before the new span loads
                elif config is not None:
                    await server.update_config(config)
            self.waiting.clear()
            self.missing_blocks.clear()
            for network_id, config in configs.items():
                entry = config.node(node_id)
                if entry.blocks and network_id not in self.servers:
                    await self._start_block_server(config, entry.blocks)
                if self.api_port is not None:
                    await self._update_gateway(config)
            for network_id in set(self.gateways) - set(configs):
                await self.gateways.pop(network_id).aclose()
            for network_id, server in self.servers.items():
                server.on_message = self.protocol.handle if network_id in self.gateways else None
            release_free_memory()
            if self.control is not None:
                self.control.refresh_trust()
            for network_id in configs:  # certificates replaced on disk: in every live context
                reload_certificate(self.data_dir, network_id)
            self._certificates_changed.set()
            if self.http is not None:
                self.http.refresh_tls()  # a network created or joined: its CA's certificate
            if self.started:  # before that, start() writes it once everything listens
                self._write_run_file()
            await self._sync_health(configs)
        await self._announce_update()

    async def _start_block_server(self, config: NetworkConfig, blocks: list[str]) -> None:
        root = self.data_dir / "models" / config.model_id
        if not (root / MANIFEST).is_file():
            self.waiting[config.network_id] = f"no copy of {config.model_id} yet"
            return
        try:
            store = BlockStore(root)
            missing = [b for b in blocks if not store.has_block(b)]
            if missing:
                self.waiting[config.network_id] = f"waiting for blocks {', '.join(missing)}"
                self.missing_blocks[config.network_id] = missing  # the admin pushes them
                return
            credentials = NetworkCredentials.load(self.data_dir, config.network_id)
            # loading and hashing the span takes seconds: off the loop, so the control channel,
            # the gateway and other networks go on meanwhile (reload's lock still serializes).
            # A block that fails verification does not stop it: see BlockServer.fault
            server = await asyncio.to_thread(
                BlockServer,
                self.data_dir,
                config,
                credentials,
                kv_budget_bytes=self._kv_budget(store, config, blocks),
            )
            server.on_blocks_changed = self._blocks_changed
            await server.start()
        except Exception as exc:  # this network waits; the node and its other networks go on
            log.exception("network %s: the block server cannot start", config.network_id)
            self.waiting[config.network_id] = f"cannot serve: {exc}"
            self.events.log_system_events(
                "span_failed", level="error", network_id=config.network_id, message=str(exc)
            )
            return
        server.on_peer_lost = lambda node_id, why: self._peer_lost(config.network_id, node_id, why)
        self.servers[config.network_id] = server
        if server.engine is None and not server.block_faults:  # mended while it started
            self.in_background(self._restart_span(config.network_id, server))

    def _blocks_changed(self, network_id: str, faults: dict[str, str]) -> None:
        """A block server's guard: its block files fail verification (the event tells the
        node's log and webhook; the admin reads them in the heartbeat and pushes them again),
        or they verify again: a span that could not load starts now."""
        server = self.servers.get(network_id)
        loaded = server is not None and server.engine is not None
        name, fields = (
            corrupt_event(network_id, self.identity.node_id, faults, loaded)
            if faults
            else repaired_event(network_id, self.identity.node_id)
        )
        self.events.log_system_events(name, **fields)
        if not faults and server is not None and not loaded:
            self.in_background(self._restart_span(network_id, server))

    async def _restart_span(self, network_id: str, server: BlockServer) -> None:
        """Its blocks were repaired: the server that could not load them starts afresh."""
        async with self._lock:
            if self.servers.get(network_id) is not server:
                return  # a reload replaced it meanwhile
            await server.stop()
            del self.servers[network_id]
        await self.reload()

    def _waiting(self, network_id: str) -> str | None:
        """Why this node does not serve its span of the network, if it does not."""
        server = self.servers.get(network_id)
        if server is not None and server.engine is None:
            return f"block files damaged, being repaired: {', '.join(sorted(server.block_faults))}"
        return self.waiting.get(network_id)

    async def _sync_health(self, configs: dict[str, NetworkConfig]) -> None:
        """The admin monitors each network it administers; its changes go to the event log."""
        me = self.identity.node_id
        mine = {i: c for i, c in configs.items() if c.node(me).role == "admin"}
        for network_id in set(self.health) - set(mine):
            await self.health.pop(network_id).stop()
        for network_id, config in configs.items():
            self.events.set_webhook(network_id, config.webhook_url)
        for network_id, config in mine.items():
            if network_id in self.health:
                self.health[network_id].update_config(config)
                continue
            monitor = HealthMonitor(
                config,
                NetworkCredentials.load(self.data_dir, network_id),
                self_address=f"{self.host}:{self.control.port}" if self.control else None,
            )
            monitor.add_listener(event_logger(self.events))
            self.failover.watch(monitor)
            monitor.add_beat_listener(self.repairs.on_beat)
            self.health[network_id] = monitor
            monitor.start()

    def _peer_lost(self, network_id: str, node_id: str, why: str) -> None:
        """A link to a node dropped: the admin's monitor probes it now (here, or over the
        admin's control channel)."""
        monitor = self.health.get(network_id)
        if monitor is not None:
            monitor.suspect_now(node_id, why)
            return
        task = asyncio.create_task(report_suspect(self.data_dir, network_id, node_id, why))
        self._suspect_reports.add(task)
        task.add_done_callback(self._suspect_reports.discard)

    async def _update_gateway(self, config: NetworkConfig) -> None:
        gateway = self.gateways.get(config.network_id)
        if gateway is None:
            tokenizer = self.data_dir / "models" / config.model_id / "tokenizer_config.json"
            if not tokenizer.is_file() or not config.chain():
                return
            credentials = NetworkCredentials.load(self.data_dir, config.network_id)
            network_id = config.network_id
            if self._session_store is None:
                self._session_store = SessionStore.open(self.data_dir)
            gateway = self.gateways[network_id] = await asyncio.to_thread(  # loads the tokenizer
                functools.partial(
                    Gateway,
                    self.data_dir,
                    config,
                    credentials,
                    lambda: self.servers.get(network_id),
                    on_broken=lambda error: self.in_background(
                        self.chain_broken(network_id, str(error))
                    ),
                    session_store=self._session_store,
                    idle_timeout_s=self.session_idle_s,
                    on_answer=self.monitoring.answered,
                )
            )
            gateway.start()
        elif gateway.config.version != config.version:
            gateway.switch(config)

    # --- config sync: pull on return, re-announce (see control.config_sync) ---------------

    async def pull_config(
        self, network_id: str, *, admin_address: str | None = None
    ) -> NetworkConfig:
        """Ask the network's admin for the current config and run it if it wins over ours
        (call it when the admin's heartbeat shows a newer version). The request carries this
        node's control address, which the admin records. Raises ``PeerUnavailable`` (or
        ``ControlError``) when the admin cannot be reached or refuses."""
        config, changed = await config_sync.pull_config(
            self.data_dir,
            network_id,
            control_address=self._control_address(),
            admin_address=admin_address,
            alert=self.config_alert(network_id),
        )
        if changed:
            log.info("network %s: pulled config v%d from the admin", network_id, config.version)
            await self.reload()
        return config

    def config_alert(self, network_id: str):
        """Where a config conflict is reported: the node's event log (and its webhook)."""

        def alert(message: str) -> None:
            self.events.log_system_events(
                "config_conflict", level="warning", network_id=network_id, message=message
            )

        return alert

    def _control_address(self) -> str | None:
        return f"{self.host}:{self.control.port}" if self.control else None

    async def _sync_on_start(self) -> None:
        """Before the block servers start: catch up with every network's admin (so a span
        this node no longer has is never started), and as admin record where this node's
        control channel listens now. An admin that cannot be reached is asked again in the
        background until it answers."""
        me = self.identity.node_id
        for config in list_configs(self.data_dir):
            entry = next((n for n in config.nodes if n.node_id == me), None)
            if entry is None:
                continue
            if entry.role == "admin":
                if entry.control_port is not None:  # a network reached over control ports
                    await self._take_own_address(config.network_id)
                continue
            admin = next((n for n in config.nodes if n.role == "admin"), None)
            if admin is None or admin.control_address is None:
                continue  # a network made by hand (local_network): nobody to ask
            try:
                await asyncio.wait_for(
                    config_sync.pull_config(
                        self.data_dir, config.network_id, control_address=self._control_address()
                    ),
                    PULL_TIMEOUT,
                )
            except (*config_sync.UNREACHABLE, ControlError) as exc:
                log.warning("network %s: admin not reached (%s); retrying", config.network_id, exc)
                self._pulls[config.network_id] = asyncio.create_task(
                    self._pull_until_reached(config.network_id)
                )

    async def _pull_until_reached(self, network_id: str, most: float = 15.0) -> None:
        """Ask the admin again with backoff; after each miss, look for it on the LAN (it may
        have come back on another control port)."""
        delay, address = 1.0, None
        while True:
            await asyncio.sleep(delay)
            try:
                await self.pull_config(network_id, admin_address=address)
                return
            except (*config_sync.UNREACHABLE, ControlError) as exc:
                log.info("network %s: admin still not reached: %s", network_id, exc)
            except Exception:
                log.exception("network %s: pulling the config failed", network_id)
            address = await asyncio.to_thread(
                config_sync.find_admin, self.data_dir, network_id, interfaces=[self.host]
            )
            delay = min(delay * 2, most)

    async def _take_own_address(self, network_id: str) -> None:
        """Admin, at start: where its control channel (and, after a restore on another PC,
        its host) is now, as a new config version with a certificate for that address, sent to
        every node (``control.admin_address``)."""
        from tiktrue.control.admin_address import admin_move
        from tiktrue.control.cert_renewal import renew, standing

        me = self.identity.node_id
        change = await admin_move(self.data_dir, network_id, me, self.host, self.control.port)
        if change is None or await self.writer.commit(network_id, change, publish=False) is None:
            return
        if not standing(self.data_dir, network_id, me).covers_host:
            await renew(self.data_dir, network_id)  # its CA is here: at once
        self.schedule_broadcast(network_id)

    async def record_control_address(
        self, network_id: str, node_id: str, control: str | None
    ) -> NetworkConfig:
        """Admin: ``node_id``'s control channel listens at ``control`` now (it restarted on
        another port). A change is a new config version, so the admin's view (``network
        status``) and every node agree; the others get it by a broadcast in the background."""
        config = read_config(config_path(self.data_dir, network_id))
        port = int(control.rsplit(":", 1)[1]) if control else None
        if port is None or config_sync.with_control_port(config, node_id, port) is None:
            return config  # where it was: nothing to write (the usual pull)
        change = config_sync.ControlPort(node_id, port)
        new = await self.writer.commit(network_id, change, publish=False)
        if new is None:  # another change recorded it first
            return read_config(config_path(self.data_dir, network_id))
        self.schedule_broadcast(network_id)
        return new

    async def _config_written(self, network_id: str) -> None:
        """The writer put a new config of ``network_id`` in place: run it (once started:
        ``start`` reloads when everything listens)."""
        if self.started:
            await self.reload()

    def schedule_broadcast(self, network_id: str) -> None:
        """Admin: send the network's current config to every node, after any broadcast still
        running (one at a time, each with the newest config)."""
        before = self._broadcasts.get(network_id)
        self._broadcasts[network_id] = asyncio.create_task(self._broadcast(network_id, before))

    async def _broadcast(self, network_id: str, before: asyncio.Task | None) -> None:
        if before is not None:
            await asyncio.gather(before, return_exceptions=True)
        try:
            await self.writer.republish(network_id)  # in the network's queue
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("network %s: config broadcast failed", network_id)

    # --- faults ------------------------------------------------------------------------------

    def in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)

    async def chain_broken(self, network_id: str, why: str) -> None:
        """A chain of the network failed or stalls (a gateway's step, or a node that saw a
        link drop): the admin's health monitor probes every node of the chain, and a silent
        one is dead within a few beats (the failover manager takes its span over); other
        nodes tell the admin."""
        from tiktrue.control.network_admin import load
        from tiktrue.node.control_link import ControlLink

        try:
            config, credentials = load(self.data_dir, network_id)
            monitor = self.health.get(network_id)
            if monitor is not None:  # the admin: its heartbeats find the silent node at once
                for entry in config.chain():
                    monitor.report(entry.node_id, why)
                return
            if config.node(self.identity.node_id).role == "admin":
                for node_id in sorted(await find_lost(config, credentials)):
                    log.warning("network %s: node %s is lost (%s)", network_id, node_id, why)
                    done = await self.failover.node_lost(network_id, node_id, why)
                    log.warning("network %s: %s", network_id, done)
                return
            admin = next(n for n in config.nodes if n.role == "admin")
            async with ControlLink.to(admin, credentials) as link:
                await link.call("chain_broken", network_id=network_id, why=why)
        except Exception:
            log.exception("network %s: handling a broken chain failed", network_id)

    def request_restart(self) -> None:
        """The ``restart_node`` task: stop cleanly once its reply is out, then start the
        process again (``serve_node``)."""
        self.restart = True
        asyncio.get_running_loop().call_later(0.5, self.stop_requested.set)

    # --- what others ask -----------------------------------------------------------------

    def node_info(self) -> dict:
        from tiktrue.node.resources import collect_resources

        networks = {}
        for config in list_configs(self.data_dir):
            if self.identity.node_id not in {n.node_id for n in config.nodes}:
                continue
            entry = config.node(self.identity.node_id)
            server = self.servers.get(config.network_id)
            engine = server.engine if server is not None else None
            networks[config.network_id] = {
                "name": config.name,
                "model_id": config.model_id,
                "role": entry.role,
                "version": config.version,
                "blocks": entry.blocks,
                "serving": engine is not None,
                "waiting": self._waiting(config.network_id),
                "block_faults": server.block_faults if server else {},
                "sessions": server.health_stats().get("sessions", 0) if server else 0,
                "steps": server.worker.stats.as_dict() if server and server.worker else None,
                "weights_bytes": engine.weight_bytes if engine else 0,
                "kv_budget_bytes": engine.kv.num_pages * engine.kv.bytes_per_page if engine else 0,
                "last_admin_beat": self.admin_beats.get(config.network_id),
            }
        return {
            "node_id": self.identity.node_id,
            "version": __version__,
            "host": self.host,
            "control_port": self.control.port if self.control else None,
            "api": self.api_url,
            "reach": reach_note(self.host),
            "loopback_only": self.address.loopback,
            "gateway": self.http.describe() if self.http is not None else None,
            "pid": os.getpid(),
            "rss_bytes": _rss(),
            # the CPU load since the last reading: sampling would sleep on the event loop
            "resources": collect_resources(self.data_dir, cpu_sample_s=0).model_dump(),
            "caps": self.caps().model_dump(),
            "networks": networks,
        }

    def heartbeat(self, network_id: str) -> dict:
        """This node's answer to its admin's heartbeat: load, memory, and its span's figures."""
        from tiktrue.node.resources import heartbeat_stats

        server = self.servers.get(network_id)
        path = config_path(self.data_dir, network_id)
        missing = self.missing_blocks.get(network_id) if server is None else None
        return {
            **heartbeat_stats(self.data_dir),
            "version": read_config(path).version if path.is_file() else None,
            "serving": server is not None and server.engine is not None,
            "waiting": self._waiting(network_id),
            # block files of its span that are not here at all: repaired like damaged ones
            **(
                {"block_faults": dict.fromkeys(missing, "missing"), "loaded": False}
                if missing
                else {}
            ),
            **(server.health_stats() if server is not None else {}),
            "metrics": self.monitoring.metrics_address(network_id),  # where Prometheus reads
        }

    def blocks_arrived(self, network_id: str) -> None:
        """A block was received: a span that waited for missing blocks starts once they are
        all here (a repair push; a normal plan switch starts it with its config)."""
        missing = self.missing_blocks.get(network_id)
        if not missing:
            return
        path = config_path(self.data_dir, network_id)
        store = BlockStore(self.data_dir / "models" / read_config(path).model_id)
        if all(store.has_block(b) for b in missing):
            self.missing_blocks.pop(network_id, None)
            self.in_background(self.reload())

    def _write_run_file(self) -> None:
        path = run_file(self.data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "pid": os.getpid(),
            "node_id": self.identity.node_id,
            "control": f"{self.host}:{self.control.port}" if self.control else None,
            "networks": {
                s.network_id: {"port": s.entry.port, "span": str(s.span)}
                for s in self.servers.values()
            },
            "api": self.api_url,
            "ui": self.ui_url,
            "lan_api": self.lan_api_url,
        }
        write_text_atomic(path, json.dumps(info, indent=2))


def _rss() -> int:
    return psutil.Process().memory_info().rss


async def run_node(data_dir: Path, *, stop: asyncio.Event | None = None, **options) -> bool:
    """Serve until SIGINT/SIGTERM, until ``stop`` is set (the Windows service's stop), or a
    task's restart; returns whether to start again."""
    service = NodeService(data_dir, **options)
    service.can_restart = True
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Windows has no such API; nor has a thread other than the main one (a service's)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    await service.start()
    waits = [
        asyncio.ensure_future(stop.wait()),
        asyncio.ensure_future(service.stop_requested.wait()),
    ]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        await service.stop()
    return service.restart and not stop.is_set()


EXIT_JOIN_S = 2.0  # at exit: how long a thread still running may take to finish


def serve_node(data_dir: Path, **options) -> NoReturn:
    """``tiktrue node`` as a process's whole life: serve until SIGINT/SIGTERM, stop cleanly,
    then end the process at once.

    Once ``NodeService.stop`` has returned, every socket is closed and everything the node
    keeps is on disk. What is left is the interpreter's own teardown: a garbage collection over
    the object graphs of torch, transformers and NiceGUI, measured at 4-6 s of a 5-7 s exit on
    a busy 2-core PC. A service manager (systemd, the Windows service, the test launcher) would
    wait that long for nothing, then kill. So the exit handlers run (log files flushed,
    temporary files removed), threads still running get a moment to finish, and the process
    ends without the teardown, as NiceGUI's own ``stop_and_exit`` does."""
    restart = asyncio.run(run_node(data_dir, **options))
    deadline = time.monotonic() + EXIT_JOIN_S
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if restart:
        restart_process()
    os._exit(0)
