"""``/api/admin/...``: the dashboard's operations as JSON, for scripts (and tests).

Admin accounts only: the caller sends ``Authorization: Bearer <JWT or API key>`` of an account
with role admin (the gateway's ``AuthMiddleware`` identifies it). A caller without credentials
is refused here even from this PC: whoever shares the PC is not the admin for that. Refusals
answer ``{"error": {"code", "message"}}`` with the status of ``AdminError``; long operations
answer a job (``GET /api/admin/jobs/{id}`` shows its progress).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from tiktrue.gateway.auth import caller_of
from tiktrue.limits import Priority
from tiktrue.ui.admin.errors import AdminError
from tiktrue.ui.admin.operations import AdminOperations, PlanRequest

PREFIX = "/api/admin"


def require_admin_caller(request: Request) -> None:
    caller = caller_of(request)
    if caller.anonymous:
        raise AdminError(
            "unauthorized",
            "log in as an admin: send 'Authorization: Bearer <token>' with a JWT "
            "(POST /auth/login) or an API key of an admin account",
            401,
        )
    if caller.role != "admin":
        raise AdminError("forbidden", f"{caller.user_name} is not an admin", 403)


class TokenBody(BaseModel):
    hours: float = Field(24.0, gt=0, le=24 * 365)


class ImportBody(BaseModel):
    path: str = Field(min_length=1, max_length=4096)
    model_id: str = Field(min_length=1, max_length=128)
    dtype: str | None = None


class DownloadBody(BaseModel):
    model_id: str = Field(min_length=1, max_length=128)
    source: str = Field(min_length=1, max_length=2048)


class Limits(BaseModel):
    rpm: int | None = Field(None, ge=1)
    rpd: int | None = Field(None, ge=1)
    tpd: int | None = Field(None, ge=1)  # tokens per day; left out of a PUT: kept as it is


class NewUser(Limits):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(max_length=1024)
    role: str | None = None
    priority: Priority | None = None  # the default class of its requests


class PriorityBody(BaseModel):
    priority: Priority | None  # the default class of requests; null: unset


class Password(BaseModel):
    password: str = Field(max_length=1024)


class NewKey(Limits):
    user: str = Field(min_length=1, max_length=64)
    name: str | None = Field(None, max_length=128)
    networks: list[str] | None = None
    days: float | None = Field(None, gt=0)
    priority: Priority | None = None


class Anonymous(BaseModel):
    allowed: bool


class AdminRoute(APIRoute):
    """Routes that answer an ``AdminError`` (their own, or a dependency's) as JSON."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request):
            try:
                return await handler(request)
            except AdminError as exc:
                return JSONResponse({"error": exc.as_dict()}, status_code=exc.status)

        return answer


def admin_router(ops: AdminOperations) -> APIRouter:
    """The routes, for the gateway's app (``create_app(routers=...)``)."""
    r = APIRouter(
        prefix=PREFIX, dependencies=[Depends(require_admin_caller)], route_class=AdminRoute
    )

    # networks and nodes
    @r.get("/networks")
    async def networks() -> list[dict]:
        return ops.networks()

    @r.get("/networks/{network_id}/status")
    async def status(network_id: str) -> dict:
        return await ops.status(network_id)

    @r.get("/networks/{network_id}/live")
    async def live(network_id: str) -> dict:
        return await ops.live(network_id)

    @r.get("/networks/{network_id}/join-requests")
    async def pending(network_id: str) -> list[dict]:
        return ops.pending(network_id)

    @r.post("/networks/{network_id}/join-requests/{request_id}/approve")
    async def approve(network_id: str, request_id: str) -> dict:
        return await ops.decide(network_id, request_id, True)

    @r.post("/networks/{network_id}/join-requests/{request_id}/refuse")
    async def refuse(network_id: str, request_id: str) -> dict:
        return await ops.decide(network_id, request_id, False)

    @r.post("/networks/{network_id}/tokens")
    async def token(network_id: str, body: TokenBody) -> dict:
        return await ops.create_token(network_id, body.hours)

    # plan
    @r.post("/networks/{network_id}/measure")
    async def measure(network_id: str) -> dict:
        return await ops.measure(network_id, fresh=True)

    @r.post("/networks/{network_id}/plan-preview")
    async def preview(network_id: str, body: PlanRequest) -> dict:
        return await ops.preview(network_id, body)

    @r.post("/networks/{network_id}/apply", status_code=202)
    async def apply(network_id: str, body: PlanRequest) -> dict:
        return ops.apply(network_id, body).as_dict()

    @r.post("/networks/{network_id}/rebalance")
    async def rebalance(network_id: str, hours: float = Query(24.0, gt=0, le=24 * 400)) -> dict:
        return await ops.rebalance(network_id, hours * 3600)

    @r.post("/networks/{network_id}/rebalance/apply", status_code=202)
    async def apply_rebalance(network_id: str) -> dict:
        return ops.apply_rebalance(network_id).as_dict()

    # jobs, events, alerts
    @r.get("/jobs")
    async def jobs() -> list[dict]:
        return [j.as_dict() for j in ops.jobs.list()]

    @r.get("/jobs/{job_id}")
    async def job(job_id: str) -> dict:
        return ops.jobs.get(job_id).as_dict()

    @r.get("/events")
    async def events(network_id: str | None = None, limit: int = 100) -> list[dict]:
        return ops.events(network_id, limit)

    @r.get("/alerts")
    async def alerts(network_id: str | None = None) -> list[dict]:
        return await ops.alerts(network_id)

    # models
    @r.get("/models")
    async def models() -> list[dict]:
        return ops.models()

    @r.post("/models/import", status_code=202)
    async def import_(body: ImportBody) -> dict:
        return ops.import_model(body.path, body.model_id, body.dtype).as_dict()

    @r.post("/models/download", status_code=202)
    async def download(body: DownloadBody) -> dict:
        return ops.download_model(body.model_id, body.source).as_dict()

    @r.post("/models/{model_id}/verify", status_code=202)
    async def verify(model_id: str) -> dict:
        return ops.verify_model(model_id).as_dict()

    # people
    @r.get("/users")
    async def users() -> list[dict]:
        return await ops.list_users()

    @r.post("/users", status_code=201)
    async def add_user(body: NewUser) -> dict:
        return await ops.add_user(
            body.name,
            body.password,
            body.role,
            rpm=body.rpm,
            rpd=body.rpd,
            tpd=body.tpd,
            priority=body.priority,
        )

    @r.delete("/users/{name}")
    async def remove_user(name: str) -> dict:
        return await ops.remove_user(name)

    @r.put("/users/{name}/limits")
    async def limits(name: str, body: Limits) -> dict:
        quota = {"tpd": body.tpd} if "tpd" in body.model_fields_set else {}
        return await ops.set_user_limits(name, rpm=body.rpm, rpd=body.rpd, **quota)

    @r.put("/users/{name}/priority")
    async def user_priority(name: str, body: PriorityBody) -> dict:
        return await ops.set_user_priority(name, body.priority)

    @r.put("/users/{name}/password")
    async def password(name: str, body: Password) -> dict:
        return await ops.set_password(name, body.password)

    @r.get("/keys")
    async def keys(user: str | None = None) -> list[dict]:
        return await ops.list_keys(user)

    @r.post("/keys", status_code=201)
    async def create_key(body: NewKey) -> dict:
        return await ops.create_key(
            body.user,
            name=body.name,
            networks=body.networks,
            days=body.days,
            rpm=body.rpm,
            rpd=body.rpd,
            tpd=body.tpd,
            priority=body.priority,
        )

    @r.put("/keys/{key_id}/priority")
    async def key_priority(key_id: int, body: PriorityBody) -> dict:
        return await ops.set_key_priority(key_id, body.priority)

    @r.delete("/keys/{key_id}")
    async def revoke_key(key_id: int) -> dict:
        return await ops.revoke_key(key_id)

    @r.get("/gateway")
    async def gateway() -> dict:
        return {"allow_anonymous": ops.anonymous_access()}

    @r.put("/gateway")
    async def set_gateway(body: Anonymous) -> dict:
        return {"allow_anonymous": ops.set_anonymous_access(body.allowed)}

    return r
