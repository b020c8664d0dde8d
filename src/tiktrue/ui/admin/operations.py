"""What the admin dashboard does, as one object the pages and ``/api/admin`` both call.

Every operation is the CLI's own function (``network_admin``, ``plans``, ``join``, the block
store, ``model_downloader``, ``UserStore``), so the web and the terminal cannot drift apart.
What the dashboard adds is what a person needs to decide before acting:

- a **plan preview**: the nodes are measured once (``network_status(probe=True)``), then each
  move of a cap slider re-runs the planner on that measurement with the caps tried
  (``with_caps`` + ``plan_from_status``): the block map and the verdict ("fits" or "the model
  needs 1.2 GB more RAM: ...") come back in milliseconds, and nothing changes on any node until
  "Apply";
- **live health** from the admin's own health monitor (the node service passes it in), read
  without a network round trip; outside the node process (scripts, tests) the same view comes
  over the control channel, as ``tiktrue network status`` gets it;
- **jobs** with progress for everything long (apply, download, import, verify).

Results are plain JSON-able dicts: the API returns them as they are, the pages render them.
Refusals are ``AdminError`` (a code and a message for people). The texts made here (job
titles and steps, verdicts, summaries, refusals) are ``Message`` strings: English in the JSON,
in the viewer's language on the dashboard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tiktrue.control import join, plans
from tiktrue.control import network_admin as na
from tiktrue.control import network_manager as nm
from tiktrue.control import resource_optimizer as ro
from tiktrue.control.config_writer import ConfigWriter
from tiktrue.control.discovery import NetworkBrowser
from tiktrue.control.distributor import PushProgress
from tiktrue.control.local_service import local_control_address
from tiktrue.control.model_downloader import DownloadProgress, download_model_blocks
from tiktrue.control.planner import Plan, PlanError
from tiktrue.control.resource_optimizer import Rebalance
from tiktrue.gateway.auth import allow_anonymous, set_allow_anonymous
from tiktrue.limits import ContextTokens
from tiktrue.model.errors import StoreError
from tiktrue.model.importer import import_model
from tiktrue.model.store import BlockStore, list_stores
from tiktrue.monitoring.monitoring_system import events_path, recent_events
from tiktrue.node.resources import NodeCaps
from tiktrue.protocol.network_config import config_path, list_configs, read_config
from tiktrue.security.node_tls import node_identity
from tiktrue.security.users import UserStore
from tiktrue.ui.admin.errors import AdminError, as_admin_error
from tiktrue.ui.admin.jobs import Job, JobBoard
from tiktrue.ui.i18n import N_, Bytes, Message, Nn_

log = logging.getLogger("tiktrue.admin")
MEASURE_TTL_S = 120.0  # a plan preview reuses one measurement of the nodes this long
REBALANCE_TTL_S = 600.0  # "Apply" applies the rebalancing shown this long ago at most
ALERT_LEVELS = ("warning", "error", "critical")


# ``plans.apply_network``'s steps (its English templates), marked here for the catalog: a
# job shows them translated (``Message``)
PLAN_STEPS = (
    N_("setting the caps of node {node}"),
    N_("measuring the nodes"),
    N_("sending each node its blocks"),
    N_(
        "the network moved to config v{current} while this plan (made against v{planned}) "
        "pushed its blocks: planning again"
    ),
)


class PlanRequest(BaseModel):
    """Caps to try (node id -> RAM, threads, disk; unset: the node's own), manual block counts
    per node, and the KV context every node reserves (the network's context length)."""

    caps: dict[str, NodeCaps] = Field(default_factory=dict)
    overrides: dict[str, int] | None = None
    context_tokens: ContextTokens | None = None  # None: the network's own


class AdminOperations:
    """The admin's operations on this node's data dir. ``health``: the node service's live
    health monitors (network id -> ``HealthMonitor``), ``gateways``: its gateways (for
    whether a network is healthy), ``browser``: a running ``NetworkBrowser`` (LAN discovery),
    or ``discover_on``: the interfaces to start one on when the dashboard first asks; each may
    be left out (then: over the control channel, unknown, nothing discovered). ``writer``:
    the node service's one writer of its networks' configs (left out: reached over its
    control channel, or direct when no service runs)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        health: Mapping[str, Any] | None = None,
        gateways: Mapping[str, Any] | None = None,
        browser: Any | None = None,
        discover_on: list[str] | None = None,
        users: UserStore | None = None,
        jobs: JobBoard | None = None,
        writer: ConfigWriter | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.health = health if health is not None else {}
        self.gateways = gateways if gateways is not None else {}
        self.browser = browser
        self._discover_on = discover_on  # interfaces to browse the LAN on, once asked
        self._own_browser = False
        self._users = users
        self.writer = writer  # None: the node service's over its control channel (writer_for)
        self.jobs = jobs or JobBoard()
        self._measured: dict[str, tuple[float, dict]] = {}  # network -> (when, probe status)
        self._measuring: dict[str, asyncio.Lock] = {}
        self._rebalances: dict[str, tuple[float, Rebalance]] = {}  # network -> the one shown

    @property
    def users(self) -> UserStore:
        if self._users is None:
            self._users = UserStore(self.data_dir)
        return self._users

    @property
    def models_root(self) -> Path:
        return self.data_dir / "models"

    async def close(self) -> None:
        await self.jobs.close()
        if self._own_browser and self.browser is not None:
            await asyncio.to_thread(self.browser.stop)
            self.browser = None

    async def _browse(self) -> None:
        """Start watching the LAN (zeroconf) the first time the dashboard asks, when the
        node service said where; a LAN without multicast leaves the list empty."""
        if self.browser is not None or self._discover_on is None:
            return
        interfaces, self._discover_on = self._discover_on, None
        try:
            browser = NetworkBrowser(interfaces=interfaces)
            self.browser = await asyncio.to_thread(browser.start)
            self._own_browser = True
        except Exception as exc:  # nothing discovered; invitations by token still work
            log.warning("cannot watch the LAN for other PCs: %s", exc)

    # --- networks and nodes ------------------------------------------------------------------

    def networks(self) -> list[dict]:
        """The networks this node administers."""
        me = node_identity(self.data_dir).node_id
        out = []
        for config in nm.list_joined_networks(self.data_dir):
            if config.node(me).role != "admin":
                continue
            gateway = self.gateways.get(config.network_id)
            out.append(
                {
                    "network_id": config.network_id,
                    "name": config.name,
                    "model_id": config.model_id,
                    "version": config.version,
                    "nodes": len(config.nodes),
                    "auto_plan": config.auto_plan,
                    "backup_nodes": config.backup_nodes,
                    "healthy": None if gateway is None else bool(gateway.healthy),
                }
            )
        return out

    def _config(self, network_id: str):
        """The config of a network this node administers (else a refusal)."""
        if not any(n["network_id"] == network_id for n in self.networks()):
            raise AdminError(
                "not_found",
                N_("this node administers no network {network}", network=network_id),
                404,
            )
        return read_config(config_path(self.data_dir, network_id))

    async def status(self, network_id: str) -> dict:
        """Every node with its resources, caps, span and health (``tiktrue network status``),
        the join requests waiting, and the PCs seen on the LAN that are not members."""
        self._config(network_id)
        await self._browse()
        status = await self._call(na.network_status(self.data_dir, network_id))
        status["pending"] = self.pending(network_id)
        status["discovered"] = self.discovered(network_id)
        status["block_map"] = self.current_map(network_id)
        return status

    async def live(self, network_id: str) -> dict:
        """Per node: health state, last beat, heartbeat RTT, CPU, RAM, disk and RSS, as the
        admin's monitor saw them last. Cheap: call it every second or two."""
        self._config(network_id)
        monitor = self.health.get(network_id)
        if monitor is not None:
            snapshot = monitor.snapshot(history=0)
        else:
            config, credentials = na.load(self.data_dir, network_id)
            snapshot = await na.admin_health(self.data_dir, config, credentials) or {"nodes": {}}
        nodes = {}
        for node_id, seen in snapshot.get("nodes", {}).items():
            stats = seen.get("stats") or {}
            nodes[node_id] = {
                "state": seen.get("state"),
                "last_beat_s": seen.get("last_beat_s"),
                "rtt_ms": seen.get("rtt_ms"),
                "cpu_percent": stats.get("cpu_percent"),
                "ram_free_bytes": stats.get("ram_free_bytes"),
                "ram_total_bytes": stats.get("ram_total_bytes"),
                "disk_free_bytes": stats.get("disk_free_bytes"),
                "disk_total_bytes": stats.get("disk_total_bytes"),
                "rss_bytes": stats.get("rss_bytes"),
                "serving": stats.get("serving"),
                "waiting": stats.get("waiting"),
            }
        gateway = self.gateways.get(network_id)
        return {
            "network_id": network_id,
            "monitored": bool(snapshot.get("nodes")),
            "healthy": None if gateway is None else bool(gateway.healthy),
            "nodes": nodes,
            "at": time.time(),
        }

    def pending(self, network_id: str) -> list[dict]:
        """Join requests waiting for the admin (``tiktrue network pending``)."""
        self._config(network_id)
        out = []
        for request_id, item in join.list_join_requests(self.data_dir, network_id).items():
            if item["state"] != "pending":
                continue
            request = item["request"]
            out.append(
                {
                    "request_id": request_id,
                    "node_id": item["node_id"],
                    "name": request.get("name") or "",
                    "host": request.get("host"),
                    "asked_at": item.get("asked_at"),
                }
            )
        return out

    async def decide(self, network_id: str, request_id: str, approve: bool) -> dict:
        """Approve or refuse a join request (``tiktrue network approve [--reject]``): the
        joining PC gets its certificate on its next poll."""
        self._config(network_id)
        state = await self._call(
            join.decide(self.data_dir, network_id, request_id, approve, writer=self.writer)
        )
        return {"request_id": request_id, "state": state}

    async def create_token(self, network_id: str, hours: float = 24.0) -> dict:
        """A one-time join token (``tiktrue network token``) and the command for the other PC."""
        self._config(network_id)
        if not 0 < hours <= 24 * 365:
            raise AdminError("bad_request", N_("a token is valid for 0 to 8760 hours"))
        token = await self._call(
            join.new_token(self.data_dir, network_id, hours * 3600, writer=self.writer)
        )
        control = local_control_address(self.data_dir) or "<this PC>:7470"
        return {
            "token": token,
            "expires_in_s": hours * 3600,
            "command": f"tiktrue network join {control} --token {token}",
        }

    def discovered(self, network_id: str) -> list[dict]:
        """PCs announcing themselves on the LAN that are not members of the network."""
        if self.browser is None:
            return []
        config = read_config(config_path(self.data_dir, network_id))
        members = {n.node_id for n in config.nodes}
        return [
            {
                "node_id": node.node_id,
                "name": node.name,
                "host": node.host,
                "control_port": node.control_port,
                "networks": {i: n.name for i, n in node.networks.items()},
            }
            for node in self.browser.nodes()
            if node.node_id not in members
        ]

    # --- plan preview and apply ------------------------------------------------------------

    def current_map(self, network_id: str) -> dict:
        """Which node holds which blocks now (the network's config)."""
        config = read_config(config_path(self.data_dir, network_id))
        names = {n.node_id: n.name or n.node_id for n in config.nodes}
        holds = {n.node_id: list(n.blocks) for n in config.nodes if n.role != "backup"}
        backups = {n.node_id: list(n.blocks) for n in config.nodes if n.role == "backup"}
        return block_map(config.model_chain_order, holds, backups, names)

    async def measure(self, network_id: str, *, fresh: bool = False) -> dict:
        """Every node's status with its speed probe and link latency, kept ``MEASURE_TTL_S``
        so that trying caps does not probe the nodes again."""
        self._config(network_id)
        lock = self._measuring.setdefault(network_id, asyncio.Lock())
        async with lock:
            taken = self._measured.get(network_id)
            if taken is None or fresh or time.monotonic() - taken[0] > MEASURE_TTL_S:
                status = await self._call(na.network_status(self.data_dir, network_id, probe=True))
                taken = self._measured[network_id] = (time.monotonic(), status)
        return taken[1]

    async def preview(self, network_id: str, request: PlanRequest) -> dict:
        """The plan the planner would make with ``request``'s caps: the block map and the
        verdict. Changes nothing."""
        status = await self.measure(network_id)
        tried = plans.with_caps(status, _caps_dicts(request.caps))
        config = self._config(network_id)
        names = {n.node_id: n.name or n.node_id for n in config.nodes}
        try:
            plan = await asyncio.to_thread(
                plans.plan_from_status,
                self.data_dir,
                network_id,
                tried,
                overrides=request.overrides,
                context_tokens=request.context_tokens,
            )
        except PlanError as exc:
            return {"fits": False, "verdict": str(exc), "plan": None, "nodes": _caps_view(tried)}
        except na.REFUSALS as exc:
            raise as_admin_error(exc) from exc
        return {
            "fits": True,
            "verdict": _verdict(plan),
            "plan": plan_view(plan, config.model_chain_order, names),
            "nodes": _caps_view(tried),
        }

    def apply(self, network_id: str, request: PlanRequest) -> Job:
        """Set the caps that changed, measure, plan, push every node its blocks and switch the
        chain (``tiktrue network caps`` + ``tiktrue network apply``), as a job."""
        self._config(network_id)
        title = N_("apply a new plan to {network}", network=network_id)
        if self.jobs.running("apply", title):
            raise AdminError(
                "busy", N_("a plan is being applied to {network} already", network=network_id), 409
            )
        return self.jobs.start("apply", title, lambda job: self._apply(job, network_id, request))

    async def _apply(self, job: Job, network_id: str, request: PlanRequest) -> dict:
        measured = await self.measure(network_id)
        self._measured.pop(network_id, None)

        def step(text: str, **params) -> None:
            job.step = Message(text, params)  # one of PLAN_STEPS: translated where shown

        chosen: list[Plan] = []
        config = await plans.apply_network(
            self.data_dir,
            network_id,
            caps=_caps_dicts(request.caps),
            overrides=request.overrides,
            context_tokens=request.context_tokens,
            measured=measured,
            progress=_job_progress(job),
            step=step,
            planned=chosen.append,
            writer=self.writer,
        )
        self._measured.pop(network_id, None)
        return {
            "version": config.version,
            "verdict": _verdict(chosen[-1]),
            "summary": N_("the network runs config v{version}", version=config.version),
        }

    # --- rebalancing ---------------------------------------------------------------------------

    async def rebalance(self, network_id: str, since_s: float = ro.DEFAULT_WINDOW_S) -> dict:
        """Which PC slows the chain and a faster plan from the measured speeds (``tiktrue
        network rebalance``); kept so that "Apply" applies exactly what was shown."""
        config = self._config(network_id)
        try:
            found = await self._call(
                ro.rebalance_report(self.data_dir, network_id, since=time.time() - since_s)
            )
        except ro.NotEnoughHistory as exc:
            return {"measured": False, "verdict": str(exc), "worth_it": False}
        self._rebalances[network_id] = (time.monotonic(), found)
        return rebalance_view(found, config)

    def apply_rebalance(self, network_id: str) -> Job:
        """The admin's OK to the plan ``rebalance`` showed (within ``REBALANCE_TTL_S``)."""
        self._config(network_id)
        shown = self._rebalances.get(network_id)
        if shown is None or time.monotonic() - shown[0] > REBALANCE_TTL_S:
            raise AdminError("stale", "analyse the network again before applying", 409)
        if not shown[1].worth_it:
            raise AdminError("nothing_to_apply", shown[1].verdict(), 409)
        title = f"apply a new plan to {network_id}"
        if self.jobs.running("apply", title):
            raise AdminError("busy", f"a plan is being applied to {network_id} already", 409)

        async def work(job: Job) -> dict:
            job.step = N_("sending each node its blocks")
            config = await ro.apply_rebalance(
                self.data_dir,
                network_id,
                shown[1],
                progress=_job_progress(job),
                writer=self.writer,
            )
            self._rebalances.pop(network_id, None)
            self._measured.pop(network_id, None)
            return {
                "version": config.version,
                "summary": N_("the network runs config v{version}", version=config.version),
            }

        return self.jobs.start("apply", title, work)

    # --- events and alerts -------------------------------------------------------------------

    def events(self, network_id: str | None = None, limit: int = 100) -> list[dict]:
        """The event log, newest first (``tiktrue network events``)."""
        found = recent_events(events_path(self.data_dir), max(1, min(limit, 1000)), network_id)
        return found[::-1]

    async def alerts(self, network_id: str | None = None) -> list[dict]:
        """What needs the admin now: networks healing, nodes not online, and the latest
        warnings of the event log (newest first)."""
        out: list[dict] = []
        for network in self.networks():
            nid = network["network_id"]
            if network_id not in (None, nid):
                continue
            if network["healthy"] is False:
                out.append(
                    _alert("error", nid, None, N_("a node was lost: the network is healing"))
                )
            live = await self.live(nid)
            for node_id, seen in live["nodes"].items():
                if seen["state"] not in ("online", None):
                    out.append(
                        _alert(
                            "warning",
                            nid,
                            node_id,
                            N_("node {node} is {state}", node=node_id, state=seen["state"]),
                        )
                    )
        recent = [e for e in self.events(network_id, 200) if e.get("level") in ALERT_LEVELS]
        return out + recent[:20]

    # --- models ------------------------------------------------------------------------------

    def models(self) -> list[dict]:
        """The block stores of this node (``tiktrue models list``) and the networks using each."""
        used: dict[str, list[str]] = {}
        for config in list_configs(self.data_dir):
            used.setdefault(config.model_id, []).append(config.network_id)
        out = []
        for item in list_stores(self.models_root):
            if isinstance(item, Exception):
                out.append({"model_id": None, "error": str(item)})
                continue
            m = item.manifest
            out.append(
                {
                    "model_id": m.model_id,
                    "architecture": m.architecture,
                    "layers": m.num_layers,
                    "blocks": len(m.blocks),
                    "format": item.weight_format,
                    "bytes": m.total_bytes,
                    "parameters": m.total_parameters,
                    "networks": used.get(m.model_id, []),
                }
            )
        return out

    def import_model(self, path: str, model_id: str, dtype: str | None = None) -> Job:
        """Import a Hugging Face folder or a GGUF file on this PC (``tiktrue models import``)."""
        source = Path(path).expanduser()
        if not source.exists():
            raise AdminError(
                "not_found", N_("{path} does not exist on this PC", path=str(source)), 404
            )
        if (self.models_root / model_id).exists():
            raise AdminError("conflict", N_("a model {model} exists already", model=model_id), 409)

        async def work(job: Job) -> dict:
            partial = self.models_root / f".{model_id}.partial" / "blocks"
            size = _tree_bytes(source)
            job.step = N_("splitting the model into blocks")
            task = asyncio.ensure_future(
                asyncio.to_thread(import_model, source, model_id, self.models_root, dtype=dtype)
            )
            while not task.done():  # progress: the bytes of blocks written so far
                written = _tree_bytes(partial)
                job.progress(written, max(size, written) if dtype is None else 0)
                job.step = N_(
                    "splitting the model into blocks: {size} written", size=Bytes(written)
                )
                await asyncio.wait({task}, timeout=0.5)
            store = task.result()
            return _model_done(store)

        return self.jobs.start("import", N_("import {model}", model=model_id), work)

    def download_model(self, model_id: str, source: str) -> Job:
        """Download a model from a model repository, resumable and verified (``tiktrue
        models download``)."""

        async def work(job: Job) -> dict:
            def progress(p: DownloadProgress) -> None:
                job.progress(p.done_bytes, p.total_bytes, N_("downloading {file}", file=p.file))

            store = await asyncio.to_thread(
                download_model_blocks,
                model_id,
                source,
                dest_root=self.models_root,
                progress_callback=progress,
            )
            return _model_done(store)

        title = N_("download {model}", model=model_id)
        if self.jobs.running("download", title):
            raise AdminError("busy", N_("{model} is being downloaded already", model=model_id), 409)
        return self.jobs.start("download", title, work)

    def verify_model(self, model_id: str) -> Job:
        """Re-hash every block against the manifest (``tiktrue models verify``); the job fails
        naming each corrupted block."""
        try:
            store = BlockStore(self.models_root / model_id)
        except StoreError as exc:
            raise AdminError("not_found", str(exc), 404) from exc

        async def work(job: Job) -> dict:
            order = store.manifest.model_chain_order
            bad: list[str] = []
            for i, name in enumerate(order):
                job.progress(i, len(order), N_("verifying {block}", block=name))
                bad += await asyncio.to_thread(store.verify, [name])
            job.progress(len(order), len(order))
            if bad:
                raise AdminError(
                    "corrupt_block",
                    Nn_(
                        "{n} corrupted block in {model}: {blocks}",
                        "{n} corrupted blocks in {model}: {blocks}",
                        len(bad),
                        model=model_id,
                        blocks=", ".join(bad),
                    ),
                    409,
                )
            return {
                "model_id": model_id,
                "verified": len(order),
                "summary": N_("all {n} blocks match the manifest", n=len(order)),
            }

        return self.jobs.start("verify", N_("verify {model}", model=model_id), work)

    # --- people ------------------------------------------------------------------------------

    async def list_users(self) -> list[dict]:
        return [dataclasses.asdict(u) for u in await self._people(self.users.list_users)]

    async def add_user(self, name: str, password: str, role: str | None = None, **limits) -> dict:
        """A new account (``UserStore.add_user``: the first one is the admin; ``rpm``,
        ``rpd``, ``tpd``, ``priority``)."""
        user = await self._people(self.users.add_user, name, password, role, **limits)
        return dataclasses.asdict(user)

    async def remove_user(self, name: str) -> dict:
        await self._people(self.users.remove_user, name)
        return {"removed": name}

    async def set_user_limits(
        self, name: str, *, rpm: int | None, rpd: int | None, **quota: int | None
    ) -> dict:
        """Rate limits, and the token quota when ``tpd`` is given."""
        user = await self._people(self.users.set_user_limits, name, rpm=rpm, rpd=rpd, **quota)
        return dataclasses.asdict(user)

    async def set_password(self, name: str, password: str) -> dict:
        await self._people(self.users.set_password, name, password)
        return {"name": name}

    async def list_keys(self, user: str | None = None) -> list[dict]:
        now = time.time()
        return [_key_view(k, now) for k in await self._people(self.users.list_keys, user)]

    async def create_key(
        self,
        user: str,
        *,
        name: str | None = None,
        networks: list[str] | None = None,
        days: float | None = None,
        rpm: int | None = None,
        rpd: int | None = None,
        tpd: int | None = None,
        priority: str | None = None,
    ) -> dict:
        """A new API key: the key itself is in the answer this once, never again."""
        record, key = await self._people(
            self.users.create_key,
            user,
            name=name or None,
            networks=networks or None,
            expires_in_s=None if days is None else days * 86400,
            rpm=rpm,
            rpd=rpd,
            tpd=tpd,
            priority=priority,
        )
        return {"key": key, "record": _key_view(record, time.time())}

    async def set_user_priority(self, name: str, priority: str | None) -> dict:
        """The default class of an account's requests (None: normal)."""
        return dataclasses.asdict(await self._people(self.users.set_user_priority, name, priority))

    async def set_key_priority(self, key_id: int, priority: str | None) -> dict:
        """The default class of a key's requests (None: its account's)."""
        key = await self._people(self.users.set_key_priority, key_id, priority)
        return _key_view(key, time.time())

    async def revoke_key(self, key_id: int) -> dict:
        return _key_view(await self._people(self.users.revoke_key, key_id), time.time())

    def anonymous_access(self) -> bool:
        return allow_anonymous(self.data_dir)

    def set_anonymous_access(self, allowed: bool) -> bool:
        set_allow_anonymous(self.data_dir, allowed)
        return allow_anonymous(self.data_dir)

    # --- helpers -------------------------------------------------------------------------------

    async def _call(self, awaitable):
        try:
            return await awaitable
        except na.REFUSALS as exc:
            raise as_admin_error(exc) from exc

    async def _people(self, method: Callable, *args, **kwargs):
        """A ``UserStore`` call (bcrypt is slow on purpose: off the event loop)."""
        try:
            return await asyncio.to_thread(method, *args, **kwargs)
        except Exception as exc:
            raise as_admin_error(exc) from exc


# --- views -----------------------------------------------------------------------------------


def block_map(
    chain: list[str],
    holds: Mapping[str, list[str]],
    backups: Mapping[str, list[str]],
    names: Mapping[str, str],
) -> dict:
    """Which node holds which blocks, in chain order, for the bars of the block map:
    per node its first block's index and how many blocks (a contiguous span)."""
    index = {b: i for i, b in enumerate(chain)}
    rows = []
    for kind, spans in (("serving", holds), ("backup", backups)):
        for node_id, blocks in spans.items():
            first = index[blocks[0]] if blocks else None
            rows.append(
                {
                    "node_id": node_id,
                    "name": names.get(node_id, ""),
                    "kind": kind,
                    "blocks": list(blocks),
                    "first": first,
                    "count": len(blocks),
                    "span": f"{blocks[0]}..{blocks[-1]}" if len(blocks) > 1 else "".join(blocks),
                }
            )
    rows.sort(key=lambda r: (r["kind"] != "serving", r["first"] is None, r["first"] or 0))
    return {"chain": list(chain), "nodes": rows}


def plan_view(plan: Plan, chain: list[str], names: Mapping[str, str]) -> dict:
    view = block_map(chain, plan.assignments, plan.backups, names)
    by_id = {n.node_id: n for n in plan.nodes}
    for row in view["nodes"]:
        node = by_id.get(row["node_id"])
        if node is not None:
            row.update(
                weight_bytes=node.weight_bytes,
                kv_bytes=node.kv_bytes,
                ram_needed=node.ram_needed,
                compute_ms=round(node.compute_ms, 2),
            )
    view.update(
        est_ms_per_token=round(plan.est_ms_per_token, 2),
        context_tokens=plan.context_tokens,
        notes=list(plan.notes),
    )
    return view


def rebalance_view(found: Rebalance, config) -> dict:
    """What the dashboard shows of a rebalancing: the hops, the verdict, the new plan."""
    names = {n.node_id: n.name or n.node_id for n in config.nodes}
    slowest = found.analysis.slowest
    return {
        "measured": True,
        "summary": found.analysis.describe().splitlines()[0],
        "hops": [
            {
                "node_id": h.node_id,
                "name": names.get(h.node_id, h.node_id),
                "span": h.span,
                "steps": h.steps,
                "compute_ms": round(h.compute_ms, 2),
                "wait_ms": round(h.wait_ms, 2),
                "link_ms": None if h.link_ms is None else round(h.link_ms, 2),
                "cpu_percent": None if h.cpu_percent is None else round(h.cpu_percent),
                "share": round(h.share, 3),
                "slowest": slowest is not None and h.node_id == slowest.node_id,
            }
            for h in found.analysis.hops
        ],
        "verdict": found.verdict(),
        "worth_it": found.worth_it,
        "current_ms": round(found.current_ms, 2),
        "planned_ms": round(found.planned_ms, 2),
        "gain_ms": round(found.gain_ms, 2),
        "gain_ratio": round(found.gain_ratio, 3),
        "changes": {n: list(c) for n, c in found.changes.items()},
        "plan": plan_view(found.plan, config.model_chain_order, names),
    }


def _job_progress(job: Job) -> Callable[[PushProgress], None]:
    """A block push's progress as the job's parts (one per node) and its fraction."""

    def progress(p: PushProgress) -> None:
        job.part(p.node_id, p.sent_bytes, p.total_bytes, p.block)
        parts = job.parts.values()
        job.progress(sum(x["done"] for x in parts), sum(x["total"] for x in parts))

    return progress


def _verdict(plan: Plan) -> str:
    return Nn_(
        "fits: {model} on {n} node, ~{ms:.1f} ms per token",
        "fits: {model} on {n} nodes, ~{ms:.1f} ms per token",
        len(plan.assignments),
        model=plan.model_id,
        ms=plan.est_ms_per_token,
    )


def _caps_dicts(caps: Mapping[str, NodeCaps]) -> dict[str, dict]:
    return {node_id: c.model_dump() for node_id, c in caps.items()}


def _caps_view(status: dict) -> list[dict]:
    """The caps the preview used, per node, with what the node has (for the sliders)."""
    return [
        {"node_id": n["node_id"], "caps": n.get("caps") or {}, "resources": n.get("resources")}
        for n in status["nodes"]
    ]


def _key_view(key, now: float) -> dict:
    view = dataclasses.asdict(key)
    view["networks"] = list(key.networks) if key.networks else None
    view["state"] = key.state(now)
    return view


def _alert(level: str, network_id: str, node_id: str | None, message: str) -> dict:
    return {
        "time": time.time(),
        "event": "alert",
        "level": level,
        "network_id": network_id,
        "node_id": node_id,
        "message": message,
    }


def _model_done(store: BlockStore) -> dict:
    m = store.manifest
    return {
        "model_id": m.model_id,
        "bytes": m.total_bytes,
        "blocks": len(m.blocks),
        "summary": N_(
            "{model}: {n} blocks, {size}, verified",
            model=m.model_id,
            n=len(m.blocks),
            size=Bytes(m.total_bytes),
        ),
    }


def _tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when it is not there yet)."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:  # a file renamed away while we counted
        return 0
