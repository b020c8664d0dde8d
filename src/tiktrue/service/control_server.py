"""A node's control channel (one per node, every network): node info, join, config and block
pushes, caps, speed probe. See ``control_link`` for the client side and the trust model."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

import websockets
from cryptography import x509
from pydantic import ValidationError

from tiktrue.control import config_sync
from tiktrue.control import network_manager as nm
from tiktrue.model.errors import StoreError
from tiktrue.model.importer import check_model_id
from tiktrue.model.store import MANIFEST, Manifest, chunk_aad
from tiktrue.node import block_receiver
from tiktrue.node.memory import release_free_memory
from tiktrue.node.peer_link import HARD_FRAME_LIMIT
from tiktrue.protocol.frames import decode_bytes_frame
from tiktrue.protocol.network_config import (
    NetworkConfig,
    config_path,
    read_config,
    write_config,
)
from tiktrue.protocol.protocol_spec import ProtocolError
from tiktrue.security.auth_manager import CertInfo, IdentityError, verify_certificate
from tiktrue.security.crypto_layer import BlockDecryptionError, decrypt_block_transfer
from tiktrue.security.node_tls import block_keyring, control_server_context

if TYPE_CHECKING:
    from tiktrue.service.service_runner import NodeService

log = logging.getLogger("tiktrue.control")
_TEST_HOOKS = os.environ.get("TIKTRUE_TEST_HOOKS") == "1"
LOSE_REPLIES = "test_lose_replies.json"  # {op: how many replies to lose}, with the hooks on


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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
        self.context = control_server_context(self.data_dir)
        self._server = None
        self.port: int | None = None
        self.staged: dict[str, NetworkConfig] = {}  # network -> config prepared, not committed

    async def start(self, host: str, port: int) -> None:
        self._server = await websockets.serve(
            self._handle, host, port, ssl=self.context, max_size=HARD_FRAME_LIMIT, compression=None
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def refresh_trust(self) -> None:
        """A network was joined: accept its certificates on new connections from now on."""
        cas = sorted((self.data_dir / "networks").glob("*/ca_cert.pem"))
        for ca in cas:
            self.context.load_verify_locations(ca)
        if cas:
            self.context.verify_mode = ssl.CERT_OPTIONAL

    async def _handle(self, ws) -> None:
        ssl_object = ws.transport.get_extra_info("ssl_object")
        peer = ssl_object.getpeercert(binary_form=True)  # checked per network, per request
        local = ws.remote_address[0] in ("127.0.0.1", "::1")
        try:
            async for raw in ws:
                reply = await self._answer(raw, peer, local)
                if _TEST_HOOKS and self._lose_reply(raw):
                    await ws.close()  # test hook: the work is done, its acknowledgement lost
                    return
                await ws.send(json.dumps(reply))
        except websockets.ConnectionClosed:
            pass

    async def _answer(self, raw, peer, local: bool) -> dict:
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
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                raise Refused("unknown_op", f"unknown control operation {op!r}")
            result = await handler(header, payload, peer, local)
            return {"in_reply_to": request_id, "ok": True, **(result or {})}
        except Refused as exc:
            return {"in_reply_to": request_id, "ok": False, "code": exc.code, "message": str(exc)}
        except (nm.JoinError, block_receiver.ReceiveError, StoreError, ProtocolError) as exc:
            return {"in_reply_to": request_id, "ok": False, "code": exc.code, "message": str(exc)}
        except (ValueError, ValidationError, KeyError, TypeError, RecursionError) as exc:
            return {
                "in_reply_to": request_id,
                "ok": False,
                "code": "bad_request",
                "message": str(exc),
            }
        except Exception as exc:  # a bug: answer it and keep serving
            log.exception("control request failed")
            return {
                "in_reply_to": request_id,
                "ok": False,
                "code": "internal_error",
                "message": repr(exc),
            }

    # --- who may do what -------------------------------------------------------------------

    def _member(self, peer: bytes | None, network_id: str) -> CertInfo:
        """The peer's certificate, verified against *this* network's CA: a node in several
        networks must not let one network's CA speak for another."""
        ca = self.data_dir / "networks" / str(network_id) / "ca_cert.pem"
        if not peer or not ca.is_file():
            raise Refused("forbidden", f"only members of network {network_id} may do this")
        try:
            return verify_certificate(x509.load_der_x509_certificate(peer), ca.read_bytes())
        except IdentityError as exc:
            raise Refused("forbidden", f"not a certificate of network {network_id}: {exc}") from exc

    def _require_admin(self, peer: bytes | None, network_id: str) -> CertInfo:
        info = self._member(peer, network_id)
        if info.role != "admin":
            raise Refused(
                "forbidden", f"only the admin of network {network_id} may do this (mutual TLS)"
            )
        return info

    # --- operations --------------------------------------------------------------------------

    async def op_node_info(self, header, payload, peer, local) -> dict:
        return self.service.node_info()

    async def op_join(self, header, payload, peer, local) -> dict:
        request = nm.JoinRequest.model_validate(header["request"])
        outcome = nm.accept_join(self.data_dir, request)
        if isinstance(outcome, str):
            return {"state": "pending", "request_id": outcome}
        await self._joined(request.network_id)
        return {"state": "approved", "grant": outcome.model_dump()}

    async def _joined(self, network_id: str) -> None:
        await self.service.reload()
        self.service.schedule_replan(network_id)

    async def op_join_status(self, header, payload, peer, local) -> dict:
        request = nm.JoinRequest.model_validate(header["request"])
        state, grant = nm.join_status(self.data_dir, request, header["request_id"])
        if state == "approved":
            await self._joined(request.network_id)
        return {"state": state, "grant": grant.model_dump() if grant else None}

    async def op_manifest_push(self, header, payload, peer, local) -> dict:
        self._require_admin(peer, header["network_id"])
        manifest = Manifest.model_validate(header["manifest"])
        root = self._model_root(header["model_id"], manifest)
        root.mkdir(parents=True, exist_ok=True)
        (root / MANIFEST).write_text(json.dumps(manifest.model_dump(), indent=2), "utf-8")
        return {}

    async def op_blocks_held(self, header, payload, peer, local) -> dict:
        network_id = header["network_id"]
        self._member(peer, network_id)
        manifest, root = self._manifest(header["model_id"])
        return await asyncio.to_thread(
            block_receiver.held, root, manifest, **self._at_rest(network_id)
        )

    def _at_rest(self, network_id: str) -> dict:
        """How this node keeps the network's blocks: sealed with its key, or in the clear."""
        path = config_path(self.data_dir, network_id)
        sealed = path.is_file() and read_config(path).encrypt_at_rest
        return {"keyring": block_keyring(self.data_dir), "seal_for": network_id if sealed else None}

    async def op_chunk(self, header, payload, peer, local) -> dict:
        network_id, model_id = header["network_id"], header["model_id"]
        self._require_admin(peer, network_id)
        manifest, root = self._manifest(model_id)
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
        return {"complete": complete}

    async def op_caps_set(self, header, payload, peer, local) -> dict:
        self._require_admin(peer, header["network_id"])
        caps = self.service.set_caps(header["caps"])
        await self.service.reload(force=True)
        return {"caps": caps}

    async def op_ping(self, header, payload, peer, local) -> dict:
        return {}

    async def op_leave(self, header, payload, peer, local) -> dict:
        """A member leaves (it asks with its own certificate): admin re-plans without it."""
        from tiktrue.control.network_admin import apply_plan, make_plan

        network_id = header["network_id"]
        peer = self._member(peer, network_id)
        nm.admin_ca(self.data_dir, network_id)  # only the admin handles leaves
        config = read_config(config_path(self.data_dir, network_id))
        leaving = config.node(peer.node_id)
        if leaving.blocks:
            plan, _ = await make_plan(self.data_dir, network_id, without={peer.node_id})
            new = await apply_plan(self.data_dir, network_id, plan, remove={peer.node_id})
        else:
            nodes = [n for n in config.nodes if n.node_id != peer.node_id]
            new = config.model_copy(update={"nodes": nodes, "version": config.version + 1})
            write_config(self.data_dir, NetworkConfig.model_validate(new.model_dump()))
            await self.service.reload()
        return {"version": new.version}

    async def op_chain_broken(self, header, payload, peer, local) -> dict:
        """A member's chain failed: the admin looks for lost nodes (in the background)."""
        network_id = header["network_id"]
        self._member(peer, network_id)
        nm.admin_ca(self.data_dir, network_id)  # only the admin takes spans over
        self.service._in_background(
            self.service.chain_broken(network_id, str(header.get("why", ""))[:500])
        )
        return {}

    async def op_probe(self, header, payload, peer, local) -> dict:
        return {"bytes_per_ms": await asyncio.to_thread(probe_speed)}

    async def op_reload(self, header, payload, peer, local) -> dict:
        if not local:
            raise Refused("forbidden", "reload is only accepted from this PC")
        await self.service.reload()
        return {}

    async def op_heartbeat(self, header, payload, peer, local) -> dict:
        """The admin's beat (members may beat too; only the admin's is recorded): this node's
        figures back, and the time noted, so a node can tell when its admin was away."""
        network_id = header["network_id"]
        if self._member(peer, network_id).role == "admin":
            self.service.admin_beats[network_id] = time.time()
        return self.service.heartbeat(network_id)

    async def op_health(self, header, payload, peer, local) -> dict:
        """The admin's view of the network's health (``tiktrue network status``)."""
        network_id = header["network_id"]
        self._member(peer, network_id)
        return self._monitor(network_id).snapshot(int(header.get("history", 20)))

    async def op_health_suspect(self, header, payload, peer, local) -> dict:
        """A member lost its link to a node: the admin suspects it and probes it now."""
        network_id = header["network_id"]
        reporter = self._member(peer, network_id)
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

    async def op_config_prepare(self, header, payload, peer, local) -> dict:
        config = NetworkConfig.model_validate(header["config"])
        self._require_admin(peer, config.network_id)
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

    async def op_config_commit(self, header, payload, peer, local) -> dict:
        network_id, version = header["network_id"], int(header["version"])
        self._require_admin(peer, network_id)
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

    async def op_config_abort(self, header, payload, peer, local) -> dict:
        network_id = header["network_id"]
        self._require_admin(peer, network_id)
        staged = self.staged.get(network_id)
        if staged is not None and staged.version == int(header["version"]):
            del self.staged[network_id]
        return {}

    async def op_config_pull(self, header, payload, peer, local) -> dict:
        """A member (back after being away) asks the admin for the current config; it tells
        where its control channel listens now, which the admin records as a new version."""
        network_id = header["network_id"]
        member = self._member(peer, network_id)
        if not (self.data_dir / "networks" / network_id / "ca" / "ca_key.pem").is_file():
            raise Refused("not_admin", f"this node is not the admin of network {network_id}")
        config = await self.service.record_control_address(
            network_id, member.node_id, header.get("control")
        )
        return {"config": config.model_dump(mode="json")}

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
