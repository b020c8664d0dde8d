"""A node's control channel (one per node, every network): node info, join, config and block
pushes, caps, speed probe. See ``control_link`` for the client side.

Every connection starts as ``anyone``; the challenge (``hello``, ``auth``; see
``security.link_auth``) proves a network certificate (a member with its role) or this node's
own key (``owner``: the CLI of this PC; trust never comes from an address). Before every
operation ``security.access_control.check_control`` says whether the caller may do it: a
caller without a certificate reaches only who this node is and the join handshake, in
messages of at most ``limits.MAX_UNPROVED_MESSAGE_BYTES``. A certificate revoked by a
network's signed config (or expired) stops working at once, on open connections too."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import websockets
from cryptography import x509
from pydantic import ValidationError

from tiktrue import limits
from tiktrue.control import config_sync
from tiktrue.control import network_manager as nm
from tiktrue.control.config_signing import ConfigSignatureError, sign_config
from tiktrue.control.discovery import announcement_for
from tiktrue.control.planner import PlanError
from tiktrue.model.errors import StoreError
from tiktrue.model.importer import check_model_id
from tiktrue.model.store import MANIFEST, Manifest, chunk_aad
from tiktrue.monitoring.node_logging import tail_log
from tiktrue.node import block_receiver
from tiktrue.node.control_link import CONTROL_PURPOSE
from tiktrue.node.memory import release_free_memory
from tiktrue.node.node_tasks import TaskRefused
from tiktrue.node.peer_link import CLOSE_TIMEOUT, HARD_FRAME_LIMIT
from tiktrue.protocol.frames import decode_bytes_frame
from tiktrue.protocol.network_config import (
    ConfigError,
    NetworkConfig,
    config_path,
    list_configs,
    read_config,
    write_config,
)
from tiktrue.protocol.protocol_spec import ProtocolError
from tiktrue.security.access_control import (
    ANONYMOUS,
    ANYONE,
    OWNER,
    AccessDenied,
    Caller,
    check_control,
)
from tiktrue.security.auth_manager import IdentityError, certificate_info
from tiktrue.security.crypto_layer import BlockDecryptionError, decrypt_block_transfer
from tiktrue.security.link_auth import LinkChallenge, parse_nonce, parse_proof, session_binding
from tiktrue.security.node_tls import (
    block_keyring,
    control_certificate,
    control_server_context,
    pem_to_der,
)

if TYPE_CHECKING:
    from tiktrue.service.service_runner import NodeService

log = logging.getLogger("tiktrue.control")
_TEST_HOOKS = os.environ.get("TIKTRUE_TEST_HOOKS") == "1"
LOSE_REPLIES = "test_lose_replies.json"  # {op: how many replies to lose}, with the hooks on


class Refused(Exception):
    def __init__(self, code: str, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.close = close  # the connection ends after this answer


@dataclass
class Connection:
    """One client of the control channel: who it proved to be, and its challenge."""

    ws: Any
    source: str  # the client's address (join requests are capped per source)
    peer_cert: bytes | None  # DER of the certificate it showed in TLS, if any
    caller: Caller = ANONYMOUS
    challenge: LinkChallenge | None = None


def probe_speed(seconds: float = 0.3) -> float:
    """Weight bytes this node multiplies per millisecond, as a decode step does."""
    import torch

    weight = torch.randn(2048, 2048)
    x = torch.randn(1, 2048)
    torch.nn.functional.linear(x, weight)
    runs, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        torch.nn.functional.linear(x, weight)
        runs += 1
    elapsed_ms = (time.perf_counter() - began) * 1000
    return weight.numel() * 4 * runs / elapsed_ms


class ControlServer:
    def __init__(self, service: NodeService) -> None:
        self.service = service
        self.data_dir = service.data_dir
        self.identity = service.identity
        self.context = control_server_context(self.data_dir)
        self.cert_der = pem_to_der(control_certificate(self.data_dir).read_bytes())
        self._server = None
        self.port: int | None = None
        self.staged: dict[str, NetworkConfig] = {}  # network -> config prepared, not committed
        self.connections: dict[Any, Connection] = {}
        self.revoked: dict[str, frozenset[str]] = {}  # network -> node ids it removed
        self._closing: set[asyncio.Task] = set()
        self._read_revoked()

    async def start(self, host: str, port: int) -> None:
        self._server = await websockets.serve(
            self._handle,
            host,
            port,
            ssl=self.context,
            max_size=limits.MAX_UNPROVED_MESSAGE_BYTES,  # raised once a member proves
            compression=None,
            close_timeout=CLOSE_TIMEOUT,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def refresh_trust(self) -> None:
        """The configs changed: accept the certificates of networks joined since (on new
        connections), and drop at once the connections of nodes a network revoked."""
        cas = sorted((self.data_dir / "networks").glob("*/ca_cert.pem"))
        for ca in cas:
            self.context.load_verify_locations(ca)
        if cas:
            self.context.verify_mode = ssl.CERT_OPTIONAL
        self._read_revoked()
        for conn in list(self.connections.values()):
            if self._revoked(conn.caller):
                log.warning("closing the control connection of revoked %s", conn.caller.describe())
                self._close(conn.ws, "certificate revoked")

    def _read_revoked(self) -> None:
        try:
            configs = list_configs(self.data_dir)
        except ConfigError as exc:  # keep the lists we had; the reload reports the config
            log.warning("cannot read the revocation lists: %s", exc)
            return
        self.revoked = {c.network_id: c.revoked_ids for c in configs}

    def _revoked(self, caller: Caller) -> bool:
        return caller.is_member and caller.node_id in self.revoked.get(caller.network_id, ())

    def _close(self, ws, why: str) -> None:
        task = asyncio.get_running_loop().create_task(ws.close(1008, why))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _handle(self, ws) -> None:
        ssl_object = ws.transport.get_extra_info("ssl_object")
        conn = Connection(
            ws, str(ws.remote_address[0]), ssl_object.getpeercert(binary_form=True) or None
        )
        self.connections[ws] = conn
        try:
            async for raw in ws:
                reply, close = await self._answer(raw, conn)
                if _TEST_HOOKS and self._lose_reply(raw):
                    await ws.close()  # test hook: the work is done, its acknowledgement lost
                    return
                await ws.send(json.dumps(reply))
                if close:
                    await ws.close(1008, reply.get("code", "refused"))
                    return
        except websockets.ConnectionClosed:
            pass
        finally:
            self.connections.pop(ws, None)

    async def _answer(self, raw, conn: Connection) -> tuple[dict, bool]:
        """The reply to one request, and whether the connection ends after it."""
        request_id = None
        try:
            if isinstance(raw, bytes):
                header, payload = decode_bytes_frame(raw)
            else:
                header, payload = json.loads(raw), None
            if not isinstance(header, dict):
                raise Refused("bad_request", "a control request is a JSON object with an 'op'")
            request_id = header.get("id")
            op = header.get("op")
            self._still_valid(conn.caller)
            check_control(str(op), conn.caller, header.get("network_id"))
            result = await getattr(self, f"op_{op}")(header, payload, conn)
            return {"in_reply_to": request_id, "ok": True, **(result or {})}, False
        except Refused as exc:
            return _error(request_id, exc.code, str(exc)), exc.close
        except (
            AccessDenied,
            nm.JoinError,
            block_receiver.ReceiveError,
            StoreError,
            ProtocolError,
            ConfigSignatureError,
            config_sync.SyncRefused,
            config_sync.SyncError,
        ) as exc:
            return _error(request_id, exc.code, str(exc)), False
        except (ConfigError, PlanError) as exc:  # a config or plan that cannot be made
            return _error(request_id, "refused", str(exc)), False
        except (ValueError, ValidationError, KeyError, TypeError, RecursionError) as exc:
            return _error(request_id, "bad_request", str(exc)), False
        except Exception as exc:  # a bug: answer it and keep serving
            log.exception("control request failed")
            return _error(request_id, "internal_error", repr(exc)), False

    # --- who is calling ----------------------------------------------------------------------

    def _still_valid(self, caller: Caller) -> None:
        """A member's certificate, checked again at each request: revoked or expired since
        the connection proved it, or its node no longer in the network (it left: its
        certificate is not revoked, so it may join again), the connection ends."""
        if not caller.is_member:
            return
        if self._revoked(caller):
            raise Refused("revoked", f"{caller.describe()} was removed from it", close=True)
        if caller.not_after is not None and dt.datetime.now(dt.timezone.utc) > caller.not_after:
            raise Refused("expired", f"the certificate of {caller.describe()} expired", close=True)
        path = config_path(self.data_dir, caller.network_id)
        if path.is_file() and caller.node_id not in read_config(path).node_ids:
            raise Refused("not_a_member", f"{caller.describe()} left it", close=True)

    async def op_hello(self, header, payload, conn: Connection) -> dict:
        """The caller's challenge, answered with this node's identity key; ours for it."""
        if conn.challenge is not None:
            raise Refused("bad_request", "hello was said already on this connection")
        ssl_object = conn.ws.transport.get_extra_info("ssl_object")
        binding = session_binding(
            ssl_object, purpose=CONTROL_PURPOSE, own_cert=self.cert_der, server=True
        )
        challenge = LinkChallenge(binding, "server")
        try:
            challenge.peer_nonce = parse_nonce(header.get("nonce"))
        except IdentityError as exc:
            raise Refused("bad_request", str(exc)) from exc
        conn.challenge = challenge
        return {
            "node_id": self.identity.node_id,
            "client_cert": conn.peer_cert is not None,  # bound: the caller binds it alike
            "nonce": challenge.nonce.hex(),
            "proof": challenge.answer(self.identity).hex(),
        }

    async def op_auth(self, header, payload, conn: Connection) -> dict:
        """The caller's answer: by the key of the certificate it showed in TLS (a member of a
        network this node is in), or by this node's own key (``as: owner``). One try per
        connection: after a wrong answer it stays a connection without a certificate."""
        challenge = conn.challenge
        if challenge is None or conn.caller is not ANONYMOUS:
            raise Refused("auth_failed", "say hello first, and answer the challenge once")
        try:
            proof = parse_proof(header.get("proof"))
            if header.get("as") == OWNER:
                challenge.check_key(self.identity.public_key, proof)
                conn.caller = Caller(OWNER, node_id=self.identity.node_id)
            else:
                conn.caller = Caller.member(self._check_member(conn, challenge, proof))
                conn.ws.protocol.max_message_size = HARD_FRAME_LIMIT  # block pushes
        except IdentityError as exc:
            raise Refused("auth_failed", str(exc)) from exc
        return {"caller": conn.caller.kind, "node_id": conn.caller.node_id}

    def _check_member(self, conn: Connection, challenge: LinkChallenge, proof: bytes):
        """The certificate shown in TLS, verified against the CA of the network it names
        (never another network's: a node in several networks keeps them apart), not revoked,
        and the challenge answered with its key."""
        if conn.peer_cert is None:
            raise IdentityError("no certificate was shown in TLS: nothing to prove")
        cert = x509.load_der_x509_certificate(conn.peer_cert)
        network_id = certificate_info(cert).network_id
        ca = self.data_dir / "networks" / network_id / "ca_cert.pem"
        if not ca.is_file():
            raise IdentityError(f"this node is not in network {network_id}")
        revoked = self.revoked.get(network_id, ())
        return challenge.check_member(cert, ca.read_bytes(), proof, revoked=revoked)

    # --- operations --------------------------------------------------------------------------

    async def op_node_info(self, header, payload, conn: Connection) -> dict:
        """Who this node is: to anyone, what discovery shows anyway (id, name, networks and
        roles); to members and the owner, everything (pid, resources, API URL, ...)."""
        if conn.caller.kind == ANYONE:
            announced = announcement_for(self.data_dir, self.port or 1, host=self.service.host)
            return {"public": True, **announced.model_dump(mode="json")}
        return self.service.node_info()

    async def op_join(self, header, payload, conn: Connection) -> dict:
        request = nm.JoinRequest.model_validate(header["request"])
        if config_path(self.data_dir, request.network_id).is_file():
            # a token's grant writes the next config: not beside a failover's or a leave's
            async with self.service.config_locks[request.network_id]:
                outcome = nm.accept_join(self.data_dir, request, source=conn.source)
        else:  # no such network here: accept_join says so (no lock made for a made-up id)
            outcome = nm.accept_join(self.data_dir, request, source=conn.source)
        if isinstance(outcome, str):
            return {"state": "pending", "request_id": outcome}
        await self._joined(request.network_id)
        return {"state": "approved", "grant": outcome.model_dump()}

    async def _joined(self, network_id: str) -> None:
        await self.service.reload()
        self.service.schedule_replan(network_id)

    async def op_join_status(self, header, payload, conn: Connection) -> dict:
        request = nm.JoinRequest.model_validate(header["request"])
        state, grant = nm.join_status(self.data_dir, request, header["request_id"])
        if state == "approved":
            await self._joined(request.network_id)
        return {"state": state, "grant": grant.model_dump() if grant else None}

    async def op_manifest_push(self, header, payload, conn: Connection) -> dict:
        self._network_model(header)
        manifest = Manifest.model_validate(header["manifest"])
        root = self._model_root(header["model_id"], manifest)
        root.mkdir(parents=True, exist_ok=True)
        (root / MANIFEST).write_text(json.dumps(manifest.model_dump(), indent=2), "utf-8")
        return {}

    async def op_blocks_held(self, header, payload, conn: Connection) -> dict:
        network_id = header["network_id"]
        manifest, root = self._manifest(self._network_model(header))
        return await asyncio.to_thread(
            block_receiver.held, root, manifest, **self._at_rest(network_id)
        )

    def _at_rest(self, network_id: str) -> dict:
        """How this node keeps the network's blocks: sealed with its key, or in the clear."""
        path = config_path(self.data_dir, network_id)
        sealed = path.is_file() and read_config(path).encrypt_at_rest
        return {"keyring": block_keyring(self.data_dir), "seal_for": network_id if sealed else None}

    async def op_chunk(self, header, payload, conn: Connection) -> dict:
        network_id, model_id = header["network_id"], header["model_id"]
        manifest, root = self._manifest(self._network_model(header))
        path, index = header["path"], int(header["index"])
        key = nm.block_key(self.data_dir, network_id)  # its own error when there is none
        try:
            data = decrypt_block_transfer(payload, key, chunk_aad(model_id, path, index))
        except BlockDecryptionError as exc:
            raise Refused("bad_chunk", f"chunk {index} of {path} does not decrypt: {exc}") from exc
        complete = await asyncio.to_thread(
            block_receiver.receive_chunk,
            root,
            manifest,
            path,
            index,
            data,
            bool(header.get("last")),
            disk_cap=self.service.caps().disk_bytes,
            **self._at_rest(network_id),
        )
        if complete:
            release_free_memory()
            self.service.blocks_arrived(network_id)
        return {"complete": complete}

    async def op_block_key(self, header, payload, conn: Connection) -> dict:
        """The network's block key, for a member that just joined (the join handshake does
        not carry it: that TLS connection proves only this node)."""
        network_id = header["network_id"]
        nm.admin_ca(self.data_dir, network_id)  # only the admin hands it out
        return {"block_key": nm.block_key(self.data_dir, network_id).hex()}

    async def op_caps_set(self, header, payload, conn: Connection) -> dict:
        caps = self.service.set_caps(header["caps"])
        await self.service.reload(force=True)
        return {"caps": caps}

    async def op_ping(self, header, payload, conn: Connection) -> dict:
        return {}

    async def op_leave(self, header, payload, conn: Connection) -> dict:
        """A member leaves (it asks with its own certificate): admin re-plans without it."""
        from tiktrue.control.network_admin import remove_node

        network_id = header["network_id"]
        nm.admin_ca(self.data_dir, network_id)  # only the admin handles leaves
        async with self.service.config_locks[network_id]:
            config = read_config(config_path(self.data_dir, network_id))
            if conn.caller.node_id not in {n.node_id for n in config.nodes}:
                return {"version": config.version}  # asked again (its first answer was lost)
            new = await remove_node(self.data_dir, network_id, conn.caller.node_id, revoke=False)
        return {"version": new.version}  # remove_node's push reloaded this node's service

    async def op_chain_broken(self, header, payload, conn: Connection) -> dict:
        """A member's chain failed: the admin looks for lost nodes (in the background)."""
        network_id = header["network_id"]
        nm.admin_ca(self.data_dir, network_id)  # only the admin takes spans over
        self.service._in_background(
            self.service.chain_broken(network_id, str(header.get("why", ""))[:500])
        )
        return {}

    async def op_probe(self, header, payload, conn: Connection) -> dict:
        return {"bytes_per_ms": await asyncio.to_thread(probe_speed)}

    async def op_reload(self, header, payload, conn: Connection) -> dict:
        """The owner's CLI changed a config on disk (``network create``, ``join``, ...)."""
        await self.service.reload()
        return {}

    async def op_heartbeat(self, header, payload, conn: Connection) -> dict:
        """The admin's beat: this node's figures back, and the time noted, so a node can tell
        when its admin was away."""
        network_id = header["network_id"]
        self.service.admin_beats[network_id] = time.time()
        return self.service.heartbeat(network_id)

    async def op_health(self, header, payload, conn: Connection) -> dict:
        """The admin's view of the network's health (``tiktrue network status``)."""
        network_id = header["network_id"]
        return self._monitor(network_id).snapshot(int(header.get("history", 20)))

    async def op_health_suspect(self, header, payload, conn: Connection) -> dict:
        """A member lost its link to a node: the admin suspects it and probes it now."""
        network_id = header["network_id"]
        reporter = conn.caller
        monitor = self._monitor(network_id)
        node_id = header["node_id"]
        monitor.suspect_now(node_id, f"{reporter.node_id} lost its link: {header.get('why', '')}")
        return {"state": monitor.state(node_id) if node_id in monitor.nodes else None}

    def _monitor(self, network_id: str):
        monitor = self.service.health.get(network_id)
        if monitor is None:
            raise Refused(
                "not_monitoring", f"this node does not monitor network {network_id} (not its admin)"
            )
        return monitor

    def _network_model(self, header: dict) -> str:
        """The request's model: the admin of one network does not write the files of a model
        that another network of this node runs (unless its own network runs it too)."""
        network_id, model_id = header["network_id"], header["model_id"]
        configs = {c.network_id: c for c in list_configs(self.data_dir)}
        mine = configs.get(network_id)
        others = {c.network_id for c in configs.values() if c.model_id == model_id}
        if (mine is None or mine.model_id != model_id) and others - {network_id}:
            raise Refused(
                "wrong_model",
                f"{model_id} is the model of network {', '.join(sorted(others))}, "
                f"not of {network_id}: its admin writes its files",
            )
        return model_id

    def _model_root(self, model_id: str, manifest: Manifest | None = None) -> Path:
        if manifest is not None and manifest.model_id != model_id:
            raise Refused("bad_request", f"manifest is for {manifest.model_id}, not {model_id}")
        check_model_id(model_id)  # raises StoreError, answered with its message
        return self.data_dir / "models" / model_id

    def _manifest(self, model_id: str) -> tuple[Manifest, Path]:
        root = self._model_root(model_id)
        path = root / MANIFEST
        if not path.is_file():
            raise Refused("no_manifest", f"this node has no manifest of {model_id}; push it first")
        return Manifest.model_validate_json(path.read_text("utf-8")), root

    # --- config sync (two-phase switch, pull on return; see control.config_sync) -----------

    async def op_config_prepare(self, header, payload, conn: Connection) -> dict:
        config = NetworkConfig.model_validate(header["config"])
        if config.network_id != conn.caller.network_id:
            raise Refused("forbidden", f"a config of {config.network_id} from another network")
        node_id = self.service.identity.node_id
        try:
            fresh = await config_sync.check_prepare(
                self.data_dir, node_id, config, alert=self.service.config_alert(config.network_id)
            )
        except config_sync.SyncRefused as exc:
            raise Refused(exc.code, str(exc)) from exc
        if fresh:
            self.staged[config.network_id] = config
        return {"version": config.version, "staged": fresh}

    async def op_config_commit(self, header, payload, conn: Connection) -> dict:
        network_id, version = header["network_id"], int(header["version"])
        staged = self.staged.get(network_id)
        if staged is None or staged.version != version:
            held = config_sync.held_config(self.data_dir, network_id)
            if held is not None and held.version == version:
                return {"version": version, "already": True}  # a retry: its ack was lost
            raise Refused("not_prepared", f"config v{version} of {network_id} is not prepared")
        write_config(self.data_dir, staged)
        del self.staged[network_id]
        await self.service.reload()
        return {"version": version}

    async def op_config_abort(self, header, payload, conn: Connection) -> dict:
        network_id = header["network_id"]
        staged = self.staged.get(network_id)
        if staged is not None and staged.version == int(header["version"]):
            del self.staged[network_id]
        return {}

    async def op_config_pull(self, header, payload, conn: Connection) -> dict:
        """A member (back after being away) asks the admin for the current config; it tells
        where its control channel listens now, which the admin records as a new version."""
        network_id = header["network_id"]
        if not (self.data_dir / "networks" / network_id / "ca" / "ca_key.pem").is_file():
            raise Refused("not_admin", f"this node is not the admin of network {network_id}")
        config = await self.service.record_control_address(
            network_id, conn.caller.node_id, header.get("control")
        )
        signed = sign_config(config, nm.admin_ca(self.data_dir, network_id))
        return {"config": signed.model_dump(mode="json")}

    # --- whitelisted tasks and log lines (see node.node_tasks, monitoring.node_logging) ------

    async def op_task_start(self, header, payload, conn: Connection) -> dict:
        tasks = self.service.monitoring.tasks
        try:
            record = tasks.start(
                header.get("task"),
                header.get("args"),
                header.get("network_id"),
                by=conn.caller.describe(),
            )
        except TaskRefused as exc:
            raise Refused(exc.code, str(exc)) from exc
        return {"task": record.as_dict()}

    async def op_task_status(self, header, payload, conn: Connection) -> dict:
        try:
            record = self.service.monitoring.tasks.status(header.get("task_id"))
        except TaskRefused as exc:
            raise Refused(exc.code, str(exc)) from exc
        return {"task": record.as_dict()}

    async def op_logs(self, header, payload, conn: Connection) -> dict:
        lines = await asyncio.to_thread(
            tail_log, self.data_dir, int(header.get("lines", 200)), header.get("level")
        )
        return {"lines": lines}

    def _lose_reply(self, raw) -> bool:
        """Test hook (``TIKTRUE_TEST_HOOKS=1``): lose the next replies to an op, as a network
        that drops an acknowledgement would."""
        path = self.data_dir / LOSE_REPLIES
        if isinstance(raw, bytes) or not path.is_file():
            return False
        op = json.loads(raw).get("op")
        counts = json.loads(path.read_text("utf-8"))
        if counts.get(op, 0) <= 0:
            return False
        counts[op] -= 1
        path.write_text(json.dumps(counts), "utf-8")
        log.warning("test hook: the reply to %s is lost", op)
        return True


def _error(request_id, code: str, message: str) -> dict:
    """A control request's error reply."""
    return {"in_reply_to": request_id, "ok": False, "code": code, "message": message}
