"""``GET /metrics`` on the gateway's port: the node's Prometheus metrics (see
``tiktrue.monitoring.metrics``), for an admin account's key or JWT, or a caller on this PC
itself (Prometheus beside the gateway); anyone else is refused (``403``), also when the admin
lets callers without a key use the API from the LAN."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from tiktrue.gateway.auth import caller_of
from tiktrue.gateway.http_errors import APIError
from tiktrue.monitoring.metrics import NodeMetrics
from tiktrue.security.local_peers import is_local


def metrics_router(metrics: NodeMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    async def node_metrics(request: Request) -> Response:
        caller = caller_of(request)
        client = request.client.host if request.client else None
        server = request.scope.get("server") or (None,)
        if caller.anonymous and not is_local(client, server[0]):
            raise APIError(403, "metrics are for an admin's key or this PC itself", "forbidden")
        if not caller.anonymous and caller.role != "admin":
            raise APIError(403, "metrics are for an admin's key", "forbidden")
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=None, headers={"Content-Type": content_type})

    return router
