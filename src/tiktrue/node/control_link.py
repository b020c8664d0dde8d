"""The client side of a node's control channel (join, node info, config and block pushes).

One request at a time on one TLS 1.3 WebSocket. The server is pinned: the key it proves in the
handshake must hash to the node id the caller expects. On connect both ends answer each other's
challenge bound to this TLS session (``security.link_auth``): the server with its identity key,
the caller with the key of the network certificate it presented (a member), or with this
node's own identity key (``owner``: the CLI on the node's own PC). A caller that proves
nothing gets only what a PC that has not joined needs (``security.access_control``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import websockets
from cryptography import x509

from tiktrue.node.peer_link import CLOSE_TIMEOUT, HARD_FRAME_LIMIT, PeerUnavailable
from tiktrue.security.auth_manager import IdentityError, NodeIdentity, new_challenge
from tiktrue.security.link_auth import LinkChallenge, parse_nonce, parse_proof, session_binding
from tiktrue.security.node_tls import NetworkCredentials, control_client_context, peer_node_id

CONTROL_PURPOSE = "control"

TIMEOUT = 30.0


class ControlError(Exception):
    """The other node refused a control request; ``code`` says why."""

    def __init__(self, code: str, message: str, info: dict | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.info = info or {}  # the numbers of the refusal, where it has some


class ControlLink:
    def __init__(
        self,
        address: str,
        *,
        expected_node_id: str | None,
        credentials: NetworkCredentials | None = None,
        owner: NodeIdentity | None = None,
    ) -> None:
        """``credentials``: act as a member of their network; ``owner``: this node's own
        identity, to act as the owner of the node it reaches (its own PC's service)."""
        self.address = address
        self.expected_node_id = expected_node_id
        self.credentials = credentials
        self.owner = owner
        self.node_id: str | None = None
        self.caller: str | None = None  # what the server saw us prove
        self._ws = None

    @classmethod
    def to(cls, node, credentials: NetworkCredentials) -> ControlLink:
        """A link to ``node`` (a config entry), pinned by its id, presenting ``credentials``."""
        if node.control_address is None:
            raise PeerUnavailable(f"node {node.node_id} has no control port in the config")
        return cls(node.control_address, expected_node_id=node.node_id, credentials=credentials)

    async def __aenter__(self) -> ControlLink:
        try:
            self._ws = await asyncio.wait_for(
                websockets.connect(
                    f"wss://{self.address}",
                    ssl=control_client_context(self.credentials),
                    max_size=HARD_FRAME_LIMIT,
                    compression=None,
                    close_timeout=CLOSE_TIMEOUT,
                ),
                TIMEOUT,
            )
        except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
            raise PeerUnavailable(f"cannot reach the node at {self.address}: {exc}") from exc
        self.node_id = peer_node_id(self._ws.transport.get_extra_info("ssl_object"))
        try:
            if self.expected_node_id and self.node_id != self.expected_node_id:
                raise IdentityError(
                    f"{self.address} is node {self.node_id}, not {self.expected_node_id} as "
                    "expected"
                )
            await self._authenticate()
        except BaseException:
            await self._ws.close()
            raise
        return self

    async def _authenticate(self) -> None:
        """The challenge both ways (once per connection): the server answers ours with its
        identity key; we answer its own with the key we act with, if any."""
        ssl_object = self._ws.transport.get_extra_info("ssl_object")
        nonce = new_challenge()
        reply = await self.call("hello", nonce=nonce.hex())
        # A node that is in no network of ours asks for no certificate, and binds none
        shown = self.credentials is not None and reply.get("client_cert") is True
        if self.credentials is not None and not shown:
            raise IdentityError(
                f"the node at {self.address} does not take certificates of network "
                f"{self.credentials.info.network_id} (yet): it has not joined it, or not "
                "reloaded since"
            )
        own_cert = self.credentials.cert_der if shown else None
        binding = session_binding(
            ssl_object, purpose=CONTROL_PURPOSE, own_cert=own_cert, server=False
        )
        challenge = LinkChallenge(binding, "client", nonce=nonce)
        challenge.peer_nonce = parse_nonce(reply.get("nonce"))
        server = x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True))
        challenge.check_key(server.public_key(), parse_proof(reply.get("proof")))
        signer = self.credentials.identity if self.credentials is not None else self.owner
        if signer is None:
            self.caller = "anyone"
            return
        acting = "member" if self.credentials is not None else "owner"
        answer = challenge.answer(signer).hex()
        self.caller = (await self.call("auth", proof=answer, **{"as": acting}))["caller"]

    async def __aexit__(self, *exc) -> None:
        if self._ws is not None:
            await self._ws.close()

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake (the peer may be hung)."""
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.transport.abort()

    async def call(self, op: str, payload: bytes | None = None, **fields: Any) -> dict:
        """Send one request (JSON, or a binary frame when ``payload`` is given); await its reply."""
        request_id = uuid.uuid4().hex
        if payload is None:
            message = json.dumps({"op": op, "id": request_id, **fields})
        else:
            from tiktrue.protocol.frames import encode_bytes_frame

            message = encode_bytes_frame(payload, op=op, id=request_id, **fields)
        try:
            await self._ws.send(message)
        except websockets.ConnectionClosed as exc:
            raise PeerUnavailable(f"{self.address} closed the connection before {op}") from exc
        try:
            reply = json.loads(await asyncio.wait_for(self._ws.recv(), TIMEOUT * 4))
        except (websockets.ConnectionClosed, asyncio.TimeoutError) as exc:
            raise PeerUnavailable(f"{self.address} did not answer {op}: {exc}") from exc
        if not reply.get("ok"):
            info = reply.get("info") if isinstance(reply.get("info"), dict) else None
            raise ControlError(reply.get("code", "error"), reply.get("message", ""), info)
        return reply
