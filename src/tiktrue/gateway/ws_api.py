"""Client requests in the seed-003 protocol (2.0, seed-000 and legacy shapes), answered as a
stream of ``inference_response`` messages. The gateway's ``/ws`` endpoint and the block
servers' WebSockets both hand their client messages here.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Awaitable, Callable

from tiktrue import limits
from tiktrue.gateway.api_client import Gateway
from tiktrue.gateway.auth import Connection
from tiktrue.gateway.errors import ChainError
from tiktrue.gateway.http_errors import INTERNAL_MESSAGE, public_error
from tiktrue.model.errors import ModelError
from tiktrue.model.generation import GenerationResult
from tiktrue.model.sampling import SamplingParams
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.protocol import protocol_spec as ps
from tiktrue.security.users import ANONYMOUS

Send = Callable[[dict], Awaitable[None]]
log = logging.getLogger("tiktrue.gateway")


def _dump(message: ps.Message) -> dict:
    return message.model_dump(mode="json", exclude_none=True)


class ClientProtocol:
    """Routes client messages to the gateway of the network they name."""

    def __init__(self, gateways: dict[str, Gateway]) -> None:
        self.gateways = gateways
        self.stats = ps.ProtocolStats()

    def _gateway(self, network_id: str | None, parsed: ps.ParsedMessage) -> Gateway:
        """The network a message names; without ``network_id`` (legacy clients, seed 003's
        ``model_id`` + ``prompt``), the one whose model ``model_id`` names, else the only one
        this gateway serves."""
        if network_id is None:
            model_id = getattr(parsed.message, "model_id", None)
            by_model = [g for g in self.gateways.values() if g.model_id == model_id]
            if len(by_model) == 1:
                return by_model[0]
            if len(self.gateways) == 1:
                return next(iter(self.gateways.values()))
        gateway = self.gateways.get(network_id or "")
        if gateway is None:
            known = ", ".join(sorted(self.gateways)) or "none"
            wanted = network_id or "a network without naming it (send network_id)"
            raise ps.ProtocolError(
                ps.WRONG_NETWORK,
                f"this gateway serves network(s) {known}, not {wanted}",
                parsed.message_id,
                parsed.session_id,
            )
        return gateway

    async def handle_text(
        self, raw: str | bytes, send: Send, connection: Connection | None = None
    ) -> None:
        """One text message from a client connection (parse errors answered too).
        ``connection``: the caller of a ``/ws`` connection (None: a network's own node)."""
        try:
            parsed = ps.parse_message(raw, max_bytes=limits.MAX_MESSAGE_BYTES)
        except ps.ProtocolError as exc:
            self.stats.record_error()
            await send(ps.error_reply(exc))
            return
        self.stats.record(parsed)
        await self.handle(parsed, send, connection)

    async def handle(
        self, parsed: ps.ParsedMessage, send: Send, connection: Connection | None = None
    ) -> None:
        try:
            message = parsed.message
            if isinstance(message, ps.LegacyRequest):
                await self._legacy(message, parsed, send, connection)
            elif isinstance(message, ps.InferenceRequest):
                await self._inference(message, parsed, send, connection)
            elif isinstance(message, ps.Authentication) and connection is not None:
                detail = await connection.authenticate(message)
                await send(_dump(ps.Ack(in_reply_to=message.message_id, detail=detail)))
            elif isinstance(message, ps.Cancel):
                gateway = self._gateway(message.network_id, parsed)
                owner = _owner(connection, gateway, message)
                found = await gateway.sessions.cancel(message.session_id, owner)
                await send(
                    _dump(
                        ps.Ack(
                            in_reply_to=message.message_id,
                            session_id=message.session_id,
                            detail="cancelled" if found else "no such session",
                        )
                    )
                )
            elif isinstance(message, (ps.SessionSave, ps.SessionRestore, ps.SessionClose)):
                await self._session(message, parsed, send, connection)
            elif isinstance(message, ps.Heartbeat):
                await send(_dump(ps.Ack(in_reply_to=message.message_id, detail="alive")))
            else:
                raise ps.ProtocolError(
                    ps.UNKNOWN_MESSAGE_TYPE,
                    "a client may send inference_request, cancel, session_save, session_restore, "
                    "session_close, authentication or heartbeat, not "
                    f"{parsed.message_type.value}",
                    parsed.message_id,
                    parsed.session_id,
                )
        except (ChainError, ModelError, PeerUnavailable) as exc:  # e.g. another's session
            self.stats.record_error()
            await send(ps.error_reply(refusal(exc, parsed.message_id, parsed.session_id)))
        except ps.ProtocolError as exc:
            self.stats.record_error()
            await send(ps.error_reply(exc))
        except Exception:  # a bug: the client still gets an answer (and the log the why)
            log.exception("message %s failed", parsed.message_id)
            self.stats.record_error()
            error = ps.ProtocolError(
                ps.INTERNAL_ERROR, INTERNAL_MESSAGE, parsed.message_id, parsed.session_id
            )
            await send(ps.error_reply(error))

    async def _session(self, message, parsed, send: Send, connection=None) -> None:
        """Save a conversation (every node saves its KV cache), restore it, or close it."""
        gateway = self._gateway(message.network_id, parsed)
        owner = _owner(connection, gateway, message)
        try:
            if isinstance(message, ps.SessionSave):
                await gateway.saves.save(message.session_id, owner)
                detail = "saved"  # where is the server's business
            elif isinstance(message, ps.SessionRestore):
                await gateway.saves.restore(message.session_id, owner)
                detail = "restored"
            else:
                await gateway.sessions.close(message.session_id, owner)
                detail = "closed"
        except (ChainError, ModelError, PeerUnavailable) as exc:
            raise refusal(exc, message.message_id, message.session_id) from None
        ack = ps.Ack(
            in_reply_to=message.message_id,
            network_id=gateway.network_id,
            session_id=message.session_id,
            detail=detail,
        )
        await send(_dump(ack))

    async def _inference(
        self, request: ps.InferenceRequest, parsed, send: Send, connection=None
    ) -> None:
        gateway = self._gateway(request.network_id, parsed)
        owner = await _admitted(connection, gateway, request.message_id, request.session_id)
        # the same fields and bounds as the request's (tiktrue.limits): nothing to clamp; what
        # it leaves out comes from the model
        params = gateway.sampling(**request.model_dump(include=set(SamplingParams.model_fields)))
        inputs = (
            {"input_ids": request.input_ids}
            if request.input_ids is not None
            else {"text": request.prompt}
        )
        caller = connection.caller if connection is not None else None
        priority = (caller or ANONYMOUS).priority_of(request.priority)
        await self._stream(
            gateway, params, inputs, request.session_id, request.message_id, send, owner, priority
        )

    async def _legacy(self, request: ps.LegacyRequest, parsed, send: Send, connection=None) -> None:
        gateway = self._gateway(request.network_id, parsed)
        message_id = f"{request.session_id}:{request.step}"
        owner = await _admitted(connection, gateway, message_id, request.session_id)
        ids = request.input_tensors.input_ids
        if ids is None:
            raise ps.ProtocolError(
                ps.INVALID_MESSAGE, "input_tensors.input_ids is required", None, request.session_id
            )
        if request.step == 0:  # step 0 starts the session anew (also one kept in the store;
            # another's session: ChainError forbidden)
            await gateway.sessions.close(request.session_id, owner)
        inputs = {"text": ids} if isinstance(ids, str) else {"input_ids": ids}
        priority = (connection.caller if connection is not None else None) or ANONYMOUS
        await self._stream(
            gateway,
            gateway.sampling(),
            inputs,
            request.session_id,
            message_id,
            send,
            owner,
            priority.priority_of(None),
        )

    async def _stream(
        self,
        gateway: Gateway,
        params,
        inputs,
        session_id,
        message_id,
        send,
        owner=None,
        priority: str = limits.DEFAULT_PRIORITY,
    ):
        result = GenerationResult()
        keep = session_id is not None
        session_id = session_id or await gateway.sessions.new_id()

        def response(**fields) -> dict:
            return _dump(
                ps.InferenceResponse(
                    network_id=gateway.network_id,
                    session_id=session_id,
                    in_reply_to=message_id,
                    **fields,
                )
            )

        if not gateway.healthy:
            why = "a node of the network was lost; this request waits until the network heals"
            await send(response(status="queued", text=why))
        began = time.perf_counter()
        try:
            async for event in gateway.answer(
                params,
                session_id=session_id,
                keep=keep,
                result=result,
                owner=owner,
                priority=priority,
                **inputs,
            ):
                await send(response(status="processing", token_id=event.token_id, text=event.text))
        except (ChainError, ModelError, PeerUnavailable) as exc:
            await send(ps.error_reply(refusal(exc, message_id, session_id)))
            return
        except Exception:  # a bug: log it, answer plainly, keep the connection
            log.exception("answer %s failed", message_id)
            error = ps.ProtocolError(ps.INTERNAL_ERROR, INTERNAL_MESSAGE, message_id, session_id)
            await send(ps.error_reply(error))
            return
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": len(result.token_ids),
            "time_to_first_token_ms": round(result.time_to_first_token * 1000, 1),
            "tokens_per_second": round(result.decode_tokens_per_second, 2),
            **_chain_timing(result.step_timings),
        }
        # seed 000's answer: the tokens, the time, who answered
        payload = {
            "output_tokens": result.token_ids,
            "processing_time": round(time.perf_counter() - began, 3),
            "worker_id": gateway.credentials.identity.node_id,
        }
        await send(
            response(
                status="success",
                text=result.text,
                finish_reason=result.finish_reason,
                usage=usage,
                payload=payload,
            )
        )


def refusal(exc: Exception, message_id: str | None, session_id: str | None) -> ps.ProtocolError:
    """The protocol error answering a gateway, model or chain error: its code, a message for
    the caller and its numbers (``info``, e.g. a context length); never a server path or an
    exception's text (``public_error``)."""
    code, message, info = public_error(exc)
    return ps.ProtocolError(code, message, message_id, session_id, info)


def _owner(connection: Connection | None, gateway: Gateway, message) -> str | None:
    """The caller's account, after checking it may use this network (None: no credentials)."""
    if connection is None:
        return None
    return connection.check(gateway.network_id, message.message_id, message.session_id)


async def _admitted(connection, gateway: Gateway, message_id, session_id) -> str | None:
    """Like ``_owner``, and the request counts against the caller's rate limits."""
    if connection is None:
        return None
    return await connection.admit(gateway.network_id, message_id, session_id)


def _chain_timing(steps) -> dict:
    """Per decode step (medians): each node's compute and the time in transit between nodes;
    and each link's ping round trip, in chain order."""
    if not steps:
        return {}
    compute = list(zip(*([n["compute_ms"] for n in step.nodes] for step in steps), strict=False))
    last = steps[-1]
    return {
        "node_compute_ms": [round(statistics.median(c), 3) for c in compute],
        "transit_ms": round(statistics.median(step.transit_ms() for step in steps), 3),
        "hops": last.hops,
        "link_rtt_ms": last.link_rtt_ms(),
        "nodes": [n["span"] for n in last.nodes],
    }
