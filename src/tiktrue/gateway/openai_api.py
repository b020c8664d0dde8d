"""The gateway's HTTP app: OpenAI-compatible API, the client WebSocket ``/ws``, health.

``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` follow the OpenAI API, with
Server-Sent Events when ``stream`` is true, ending in ``data: [DONE]``. ``model`` selects the
network whose model answers (a node may serve several networks). Who may call is decided in
``tiktrue.gateway.auth`` (API keys, JWTs, this PC's own callers); ``/docs`` is off (its pages
load from a CDN, which an offline LAN cannot reach).

A request is refused with a proper status before a stream starts (a prompt longer than the
network's context is a ``400 context_length_exceeded``): the first token is awaited before
the response begins. An error after that ends the stream with an ``error`` event and
``data: [DONE]``; a stream is never cut short without saying why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import APIRouter, FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from tiktrue import __version__, limits
from tiktrue.gateway.api_client import Gateway
from tiktrue.gateway.auth import (
    AuthMiddleware,
    GatewayAuth,
    caller_of,
    require_network,
)
from tiktrue.gateway.errors import ChainError
from tiktrue.gateway.http_errors import INTERNAL_MESSAGE, APIError, error_body, from_network
from tiktrue.gateway.ws_api import ClientProtocol
from tiktrue.limits import (
    MaxTokens,
    MinP,
    Priority,
    RepetitionPenalty,
    Seed,
    StopString,
    StopStrings,
    Temperature,
    TopK,
    TopP,
)
from tiktrue.model.errors import ModelError
from tiktrue.model.generation import GenerationResult
from tiktrue.model.sampling import SAMPLING_FIELDS, SamplingDefaults, SamplingParams
from tiktrue.node.peer_link import PeerUnavailable
from tiktrue.protocol import protocol_spec as ps
from tiktrue.security.users import Principal

log = logging.getLogger("tiktrue.gateway")
NETWORK_ERRORS = (ChainError, ModelError, PeerUnavailable)


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if isinstance(part, dict))


class GenerationFields(BaseModel):
    """The sampling fields, with the bounds of ``tiktrue.limits`` (the same as ``/ws`` and the
    sampler: what one accepts, the others do). A field left out (or null: OpenAI's client
    leaves out what it was not given) takes the model's own default."""

    model: str | None = None
    stream: bool = False
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None  # not in OpenAI's API; accepted as llama.cpp and vLLM do
    min_p: MinP | None = None  # likewise
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    stop: StopString | StopStrings | None = None
    user: str | None = None
    # TikTrue's extension: the request's class (quick / normal / deep), which every node
    # honours under load; left out: the API key's or account's default, else normal
    priority: Priority | None = None

    def sampling(self, defaults: SamplingDefaults | None = None) -> SamplingParams:
        """The settings of this request: its fields over the model's ``defaults``."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return (defaults or SamplingDefaults()).params(
            **{name: getattr(self, name) for name in SAMPLING_FIELDS},
            seed=self.seed,
            stop=stop,
            max_tokens=self.max_completion_tokens or self.max_tokens or limits.DEFAULT_MAX_TOKENS,
        )


class ChatRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(GenerationFields):
    prompt: str


def create_app(
    gateways: dict[str, Gateway],
    protocol: ClientProtocol | None = None,
    auth: GatewayAuth | None = None,
    ui=None,
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """One ASGI app for every network this node is a gateway of (keyed by network id; the
    dict may change while the app runs: networks joined or left). ``auth``: the node's
    accounts (None: no accounts, only this PC's callers without credentials get in).
    ``ui``: the web UI (``tiktrue.ui.main_app.WebUi``), mounted at ``/`` after the API's
    routes; its paths pass the API's auth (its pages ask for a login). ``routers``: more API
    routes behind the same auth (the admin API), added before the UI takes ``/``."""
    app = FastAPI(title="TikTrue gateway", version=__version__, docs_url=None, redoc_url=None)
    protocol = protocol or ClientProtocol(gateways)
    auth = auth or GatewayAuth(None)
    app.add_middleware(AuthMiddleware, auth=auth, ui_paths=ui.serves if ui else None)
    app.include_router(auth.router())

    def pick(model: str | None) -> Gateway:
        by_model = {g.model_id: g for g in gateways.values()}
        if model in by_model:
            return by_model[model]
        if model in gateways:
            return gateways[model]
        if len(gateways) == 1 and model in (None, ""):
            return next(iter(gateways.values()))
        known = ", ".join(sorted(by_model)) or "none yet"
        raise APIError(
            404,
            f"model {model!r:.80} is not served here (models: {known})",
            "model_not_found",
            param="model",
        )

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def openai_error(request, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(RequestValidationError)
    async def openai_validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors[:5]
        )
        first = ".".join(str(p) for p in errors[0]["loc"][1:]) if errors else None
        return APIError(400, problems, "invalid_value", param=first or None).response()

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "version": __version__,
            "networks": {g.network_id: g.model_id for g in gateways.values()},
            # False while a node of the network is lost and the network heals (or is degraded)
            "healthy": {g.network_id: g.healthy for g in gateways.values()},
            "protocol": protocol.stats.as_dict(),
            "sessions": {g.network_id: g.sessions.stats() for g in gateways.values()},
        }

    @app.get("/v1/models")
    async def models(http: Request) -> dict:
        caller = caller_of(http)
        return {
            "object": "list",
            "data": [
                {
                    "id": g.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": f"tiktrue network {g.network_id}",
                }
                for g in gateways.values()
                if caller.allows(g.network_id)
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        gateway = pick(request.model)
        require_network(caller_of(http), gateway.network_id)
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        return await _respond(gateway, request, caller_of(http), "chat", messages=messages)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        gateway = pick(request.model)
        require_network(caller_of(http), gateway.network_id)
        return await _respond(gateway, request, caller_of(http), "text", text=request.prompt)

    @app.websocket("/ws")
    async def client_socket(ws: WebSocket) -> None:
        await ws.accept()
        await serve_client(ws, protocol, auth.connection(ws))

    for router in routers:
        app.include_router(router)
    if ui is not None:
        ui.mount(app)
    return app


async def serve_client(ws: WebSocket, protocol: ClientProtocol, connection) -> None:
    """One ``/ws`` connection: every message, text or binary (JSON in UTF-8, as seed 003's
    handler reads them), is handled in a task of its own, so a ``cancel`` is read while an
    answer streams; replies never interleave within a message. A client gone cancels its
    answers in flight."""
    lock = asyncio.Lock()
    running: set[asyncio.Task] = set()

    async def send(message: dict) -> None:
        async with lock:
            await ws.send_text(json.dumps(message))

    async def handle(raw) -> None:
        try:
            await protocol.handle_text(raw, send, connection)
        except Exception as exc:  # only sending fails here: the client left meanwhile
            log.debug("a /ws reply was not delivered: %r", exc)

    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            if len(running) >= limits.MAX_IN_FLIGHT_PER_CONNECTION:
                busy = ps.ProtocolError(
                    ps.RATE_LIMITED,
                    f"{len(running)} requests of this connection are still running; wait for "
                    "an answer (or open another connection)",
                )
                await send(ps.error_reply(busy))
                continue
            task = asyncio.create_task(handle(raw))
            running.add(task)
            task.add_done_callback(running.discard)
    except WebSocketDisconnect:
        pass
    finally:
        for task in running:
            task.cancel()


RETRY_AFTER_S = 5  # what a client is told to wait while the network heals


async def _respond(
    gateway: Gateway, request: GenerationFields, caller: Principal, kind: str, **inputs
):
    # the request's fields over the model's defaults (the same bounds: nothing to refuse here)
    params = request.sampling(gateway.sampling_defaults)
    if not gateway.healthy and not await gateway.chain.probe():
        raise APIError(
            503,
            "a node of the network was lost and the network is healing; retry shortly",
            "network_healing",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    completion_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    result = GenerationResult()
    param = "messages" if kind == "chat" else "prompt"
    priority = caller.priority_of(request.priority)
    events = gateway.answer(params, result=result, priority=priority, **inputs)
    try:  # the first token (or the refusal) before any byte of the response
        first = await anext(events, None)
    except NETWORK_ERRORS as exc:
        raise from_network(exc, param=param) from None
    if request.stream:
        chunks = _sse(first, events, result, kind, completion_id, created, gateway.model_id)
        return StreamingResponse(chunks, media_type="text/event-stream")
    try:
        async for _ in events:
            pass
    except NETWORK_ERRORS as exc:
        raise from_network(exc, param=param) from None
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "finish_reason": _finish(result),
        }
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": _finish(result)}
    return {
        "id": completion_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": gateway.model_id,
        "choices": [choice],
        "usage": _usage(result),
    }


def _finish(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(result: GenerationResult) -> dict:
    completion = len(result.token_ids)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": result.prompt_tokens + completion,
    }


async def _sse(first, events, result, kind, completion_id, created, model) -> AsyncIterator[str]:
    """The stream of an answer whose ``first`` event is known; it always ends in
    ``data: [DONE]``, after an ``error`` event when the answer failed on the way."""

    def chunk(delta: str | None, finish: str | None = None, first: bool = False) -> str:
        if kind == "chat":
            body = {"role": "assistant", "content": ""} if first else {}
            if delta:
                body["content"] = delta
            choice = {"index": 0, "delta": body, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish}
            obj = "text_completion"
        data = {"id": completion_id, "object": obj, "created": created, "model": model}
        data["choices"] = [choice]
        if finish is not None:
            data["usage"] = _usage(result)
        return f"data: {json.dumps(data)}\n\n"

    try:
        if kind == "chat":
            yield chunk(None, first=True)
        if first is not None and first.text:
            yield chunk(first.text)
        async for event in events:
            if event.text:
                yield chunk(event.text)
        yield chunk(None, _finish(result))
    except NETWORK_ERRORS as exc:
        yield f"data: {json.dumps(from_network(exc).body())}\n\n"
    except Exception:  # a bug: logged; the stream still ends, saying so plainly
        log.exception("stream %s failed", completion_id)
        body = error_body(INTERNAL_MESSAGE, 500, ps.INTERNAL_ERROR)
        yield f"data: {json.dumps(body)}\n\n"
    finally:
        await events.aclose()  # the session's turn ends here, also when the client left
    yield "data: [DONE]\n\n"
