"""The gateway's HTTP app: OpenAI-compatible API, the client WebSocket ``/ws``, health.

``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` follow the OpenAI API, with
Server-Sent Events when ``stream`` is true, ending in ``data: [DONE]``. ``model`` selects the
network whose model answers (a node may serve several networks). Who may call is decided in
``tiktrue.gateway.auth`` (API keys, JWTs, this PC's own callers); ``/docs`` is off (its pages
load from a CDN, which an offline LAN cannot reach).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from tiktrue import __version__
from tiktrue.gateway.api_client import ChainError, Gateway
from tiktrue.gateway.auth import (
    AuthMiddleware,
    GatewayAuth,
    caller_of,
    require_network,
)
from tiktrue.gateway.ws_api import ClientProtocol
from tiktrue.model.errors import ModelError
from tiktrue.model.generation import GenerationResult
from tiktrue.model.sampling import SamplingParams
from tiktrue.node.peer_link import PeerUnavailable


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if isinstance(part, dict))


class GenerationFields(BaseModel):
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # not in OpenAI's API; accepted as llama.cpp and vLLM do
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None

    def sampling(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=stop,
            max_tokens=self.max_completion_tokens or self.max_tokens or 512,
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
) -> FastAPI:
    """One ASGI app for every network this node is a gateway of (keyed by network id; the
    dict may change while the app runs: networks joined or left). ``auth``: the node's
    accounts (None: no accounts, only this PC's callers without credentials get in).
    ``ui``: the web UI (``tiktrue.ui.main_app.WebUi``), mounted at ``/`` after the API's
    routes; its paths pass the API's auth (its pages ask for a login)."""
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
        raise HTTPException(404, detail=f"model {model!r} is not served here (models: {known})")

    @app.exception_handler(HTTPException)
    async def openai_error(request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = {"error": {"message": exc.detail, "type": kind, "code": exc.status_code}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def openai_validation_error(request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        body = {"error": {"message": problems, "type": "invalid_request_error", "code": 400}}
        return JSONResponse(body, status_code=400)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "version": __version__,
            "networks": {g.network_id: g.model_id for g in gateways.values()},
            # False while a node of the network is lost and the network heals (or is degraded)
            "healthy": {g.network_id: g.healthy for g in gateways.values()},
            "protocol": protocol.stats.as_dict(),
            "sessions": {g.network_id: g.session_stats() for g in gateways.values()},
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
        return await _respond(gateway, request, "chat", messages=messages)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        gateway = pick(request.model)
        require_network(caller_of(http), gateway.network_id)
        return await _respond(gateway, request, "text", text=request.prompt)

    @app.websocket("/ws")
    async def client_socket(ws: WebSocket) -> None:
        await ws.accept()
        connection = auth.connection(ws)

        async def send(message: dict) -> None:
            await ws.send_text(json.dumps(message))

        try:
            while True:
                raw = await ws.receive_text()
                await protocol.handle_text(raw, send, connection)
        except WebSocketDisconnect:
            pass

    if ui is not None:
        ui.mount(app)
    return app


RETRY_AFTER_S = 5  # what a client is told to wait while the network heals


async def _respond(gateway: Gateway, request: GenerationFields, kind: str, **inputs):
    try:
        params = request.sampling()
    except ValidationError as exc:
        raise HTTPException(400, detail=str(exc)) from None
    if not gateway.healthy and not await gateway.chain.probe():
        raise HTTPException(
            503,
            detail="a node of the network was lost and the network is healing; retry shortly",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    completion_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    result = GenerationResult()
    events = gateway.answer(params, result=result, **inputs)
    if request.stream:
        chunks = _sse(events, result, kind, completion_id, created, gateway.model_id)
        return StreamingResponse(chunks, media_type="text/event-stream")
    try:
        async for _ in events:
            pass
    except (ChainError, ModelError, PeerUnavailable) as exc:
        raise HTTPException(503, detail=f"the network could not answer: {exc}") from exc
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


async def _sse(events, result, kind, completion_id, created, model) -> AsyncIterator[str]:
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

    if kind == "chat":
        yield chunk(None, first=True)
    try:
        async for event in events:
            if event.text:
                yield chunk(event.text)
        yield chunk(None, _finish(result))
    except (ChainError, ModelError, PeerUnavailable) as exc:
        error = {
            "error": {"message": f"the network could not answer: {exc}", "type": "server_error"}
        }
        yield f"data: {json.dumps(error)}\n\n"
    yield "data: [DONE]\n\n"
