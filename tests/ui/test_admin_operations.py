"""The admin dashboard's operations against real node processes (the shared tiny cluster):
status with resources, live health, plan previews whose verdict follows the caps (nothing
changes on the nodes), join requests refused, tokens, events; and the same through
``/api/admin`` on the cluster's gateway, for admin accounts only."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.helpers.network import control_address, wait_until
from tiktrue.control.join import make_join_request, parse_token
from tiktrue.node.control_link import ControlLink
from tiktrue.node.resources import NodeCaps, free_ports
from tiktrue.protocol.network_config import config_path, read_config
from tiktrue.security.node_tls import node_identity
from tiktrue.security.users import UserStore
from tiktrue.ui.admin.errors import AdminError
from tiktrue.ui.admin.operations import AdminOperations, PlanRequest

pytestmark = pytest.mark.integration
NET = "testnet"
RUNTIME = 400_000_000  # the planner's runtime allowance per node (DEFAULT_RUNTIME_BYTES)


@pytest.fixture(scope="module")
def admin(tiny_cluster):
    """(operations on the admin node's data dir, cluster, homes)."""
    cluster, homes, _ = tiny_cluster
    return AdminOperations(homes[0], users=UserStore(homes[0], rounds=4)), cluster, homes


def test_status_shows_every_node_with_resources_span_and_live_health(admin):
    ops, _, homes = admin
    ids = [node_identity(h).node_id for h in homes]
    assert [n["network_id"] for n in ops.networks()] == [NET]

    status = asyncio.run(ops.status(NET))
    nodes = {n["node_id"]: n for n in status["nodes"]}
    assert set(nodes) == set(ids)
    for node in nodes.values():
        assert node["resources"]["cpu_cores_logical"] >= 1
        assert node["resources"]["ram_total_bytes"] > 0
        assert node["resources"]["disk_total_bytes"] > 0
        assert "gpus" in node["resources"] and node["caps"] is not None
    spans = {row["node_id"]: row["span"] for row in status["block_map"]["nodes"]}
    assert spans == {ids[0]: "embed..layer_1", ids[1]: "layer_2..layer_3", ids[2]: "layer_4..head"}

    def all_online():
        live = asyncio.run(ops.live(NET))
        states = {i: n["state"] for i, n in live["nodes"].items()}
        return live if states == dict.fromkeys(ids, "online") else None

    live = wait_until(all_online, "every node online in the admin's health view")
    for node in live["nodes"].values():
        assert node["rtt_ms"] is not None and node["ram_total_bytes"] > 0
        assert node["cpu_percent"] is not None and node["last_beat_s"] is not None
    online = [e for e in ops.events(NET) if e["event"] == "node_online"]
    assert online and online[0]["time"] >= online[-1]["time"]  # newest first


def test_the_preview_verdict_follows_the_caps_and_changes_nothing(admin):
    ops, _, homes = admin
    ids = [node_identity(h).node_id for h in homes]
    before = read_config(config_path(homes[0], NET))

    fits = asyncio.run(ops.preview(NET, PlanRequest()))
    assert fits["fits"] and fits["verdict"].startswith("fits:"), fits
    served = [r for r in fits["plan"]["nodes"] if r["kind"] == "serving"]
    assert sum(r["count"] for r in served) == len(before.model_chain_order)

    starved = PlanRequest(caps={i: NodeCaps(ram_bytes=RUNTIME + 1000) for i in ids})
    refused = asyncio.run(ops.preview(NET, starved))
    assert not refused["fits"] and "more RAM" in refused["verdict"], refused
    assert refused["plan"] is None
    assert {n["caps"]["ram_bytes"] for n in refused["nodes"]} == {RUNTIME + 1000}

    # one node starved: the others carry the model, and the map shows it
    one = asyncio.run(ops.preview(NET, PlanRequest(caps={ids[2]: starved.caps[ids[2]]})))
    assert one["fits"], one
    assert ids[2] not in {r["node_id"] for r in one["plan"]["nodes"] if r["kind"] == "serving"}

    after = read_config(config_path(homes[0], NET))
    assert after.version == before.version and after.nodes == before.nodes
    with pytest.raises(AdminError) as unknown:
        asyncio.run(ops.preview("no-such-net", PlanRequest()))
    assert unknown.value.code == "not_found"


def test_a_join_request_is_listed_and_refused(admin, tmp_path):
    ops, _, homes = admin
    joiner = tmp_path / "joiner"
    request = make_join_request(
        joiner,
        NET,
        host="127.0.0.1",
        block_port=free_ports(1)[0],
        control_port=None,
        token_secret=None,
    )

    async def ask() -> dict:
        async with ControlLink(control_address(homes[0]), expected_node_id=None) as link:
            return await link.call("join", request=request.model_dump())

    reply = asyncio.run(ask())
    assert reply["state"] == "pending"
    waiting = ops.pending(NET)
    assert [(w["request_id"], w["node_id"]) for w in waiting] == [
        (reply["request_id"], node_identity(joiner).node_id)
    ]
    before = read_config(config_path(homes[0], NET)).version
    decided = asyncio.run(ops.decide(NET, reply["request_id"], approve=False))
    assert decided["state"] == "rejected" and ops.pending(NET) == []
    assert read_config(config_path(homes[0], NET)).version == before
    with pytest.raises(AdminError, match="already rejected"):
        asyncio.run(ops.decide(NET, reply["request_id"], approve=True))
    with pytest.raises(AdminError, match="no join request"):
        asyncio.run(ops.decide(NET, "nope", approve=True))


def test_a_join_token_comes_with_the_command_for_the_other_pc(admin):
    ops, _, homes = admin
    made = asyncio.run(ops.create_token(NET, hours=1))
    network_id, admin_id, _ = parse_token(made["token"])
    assert (network_id, admin_id) == (NET, node_identity(homes[0]).node_id)
    assert (
        made["command"]
        == f"tiktrue network join {control_address(homes[0])} --token " + (made["token"])
    )
    with pytest.raises(AdminError):
        asyncio.run(ops.create_token(NET, hours=0))


# --- the JSON API on the cluster's gateway ------------------------------------------------------


@pytest.fixture(scope="module")
def api(tiny_cluster):
    """(base URL, an admin's key, a plain user's key)."""
    cluster, homes, _ = tiny_cluster
    users = UserStore(homes[0], rounds=4)
    names = {u.name for u in users.list_users()}
    if "dash-admin" not in names:
        users.add_user("dash-admin", "dash-admin's password", "admin")
    if "dash-user" not in names:
        users.add_user("dash-user", "dash-user's password", "user")
    keys = users.create_key("dash-admin")[1], users.create_key("dash-user")[1]
    return cluster.api_url.removesuffix("/v1"), *keys


def test_the_admin_api_answers_admins_only(api):
    base, admin_key, user_key = api
    with httpx.Client(base_url=base, timeout=120) as http:
        nobody = http.get("/api/admin/networks")  # from this PC, but without credentials
        assert nobody.status_code == 401 and nobody.json()["error"]["code"] == "unauthorized"
        plain = http.get("/api/admin/users", headers={"Authorization": f"Bearer {user_key}"})
        assert plain.status_code == 403 and plain.json()["error"]["code"] == "forbidden"

        http.headers["Authorization"] = f"Bearer {admin_key}"
        assert [n["network_id"] for n in http.get("/api/admin/networks").json()] == [NET]
        status = http.get(f"/api/admin/networks/{NET}/status").json()
        assert len(status["nodes"]) == 3 and status["pending"] == []
        preview = http.post(f"/api/admin/networks/{NET}/plan-preview", json={}).json()
        assert preview["fits"], preview
        bad = http.post(
            f"/api/admin/networks/{NET}/plan-preview", json={"caps": {"x": {"ram_bytes": -1}}}
        )
        assert bad.status_code == 400
        missing = http.get("/api/admin/networks/nope/live")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_keys_are_shown_once_and_revoked_through_the_api(api):
    base, admin_key, _ = api
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=base, timeout=120, headers=headers) as http:
        made = http.post("/api/admin/keys", json={"user": "dash-user", "name": "laptop"})
        assert made.status_code == 201
        key, record = made.json()["key"], made.json()["record"]
        assert key.startswith("tt-") and record["state"] == "active"
        listed = http.get("/api/admin/keys", params={"user": "dash-user"}).json()
        assert key not in str(listed) and record["id"] in {k["id"] for k in listed}
        chat = {"Authorization": f"Bearer {key}"}
        assert http.get("/v1/models", headers=chat).status_code == 200

        revoked = http.delete(f"/api/admin/keys/{record['id']}")
        assert revoked.json()["state"] == "revoked"
        assert http.get("/v1/models", headers=chat).status_code == 401
        again = http.delete(f"/api/admin/keys/{record['id']}")
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"


def test_verify_runs_as_a_job_with_progress(api, tiny_llama):
    base, admin_key, _ = api
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=base, timeout=120, headers=headers) as http:
        models = {m["model_id"]: m for m in http.get("/api/admin/models").json()}
        assert models[tiny_llama.model_id]["networks"] == [NET]
        job = http.post(f"/api/admin/models/{tiny_llama.model_id}/verify")
        assert job.status_code == 202

        def finished():
            seen = http.get(f"/api/admin/jobs/{job.json()['id']}").json()
            return seen if seen["state"] != "running" else None

        done = wait_until(finished, "the verify job")
        assert done["state"] == "done" and done["fraction"] == 1.0, done
        assert done["result"]["verified"] == len(tiny_llama.manifest.blocks)
        assert http.post("/api/admin/models/nope/verify").status_code == 404
    assert time.time() >= done["started_at"]


def test_token_quotas_are_set_through_the_api(api):
    base, admin_key, _ = api
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=base, timeout=120, headers=headers) as http:
        made = http.post("/api/admin/keys", json={"user": "dash-user", "tpd": 5000})
        assert made.json()["record"]["tpd"] == 5000
        set_ = http.put("/api/admin/users/dash-user/limits", json={"rpm": 60, "tpd": 20000})
        assert (set_.json()["rpm"], set_.json()["tpd"]) == (60, 20000)
        kept = http.put("/api/admin/users/dash-user/limits", json={"rpm": 30})  # no tpd: kept
        assert (kept.json()["rpm"], kept.json()["tpd"]) == (30, 20000)
        off = http.put("/api/admin/users/dash-user/limits", json={"rpm": None, "tpd": None})
        assert off.json()["tpd"] is None
        assert http.put("/api/admin/users/dash-user/limits", json={"tpd": 0}).status_code == 400


def test_priority_classes_are_set_through_the_api(api):
    base, admin_key, _ = api
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=base, timeout=120, headers=headers) as http:
        made = http.post("/api/admin/keys", json={"user": "dash-user", "priority": "quick"})
        assert made.status_code == 201 and made.json()["record"]["priority"] == "quick"
        key_id = made.json()["record"]["id"]
        user = http.put("/api/admin/users/dash-user/priority", json={"priority": "deep"})
        assert user.json()["priority"] == "deep"
        assert (
            http.put(f"/api/admin/keys/{key_id}/priority", json={"priority": None}).json()[
                "priority"
            ]
            is None
        )
        listed = {u["name"]: u for u in http.get("/api/admin/users").json()}
        assert listed["dash-user"]["priority"] == "deep"
        wrong = http.put("/api/admin/users/dash-user/priority", json={"priority": "urgent"})
        assert wrong.status_code == 400
        http.put("/api/admin/users/dash-user/priority", json={"priority": None})


def test_the_rebalancing_is_shown_and_applied_only_when_it_is_worth_it(api):
    base, admin_key, user_key = api
    with httpx.Client(base_url=base, timeout=300) as http:
        plain = {"Authorization": f"Bearer {user_key}"}
        assert http.post(f"/api/admin/networks/{NET}/rebalance", headers=plain).status_code == 403
        http.headers["Authorization"] = f"Bearer {admin_key}"
        shown = http.post(f"/api/admin/networks/{NET}/rebalance", params={"hours": 1}).json()
        assert shown["verdict"]  # measured or not, it says so
        if shown["measured"]:
            assert sum(h["slowest"] for h in shown["hops"]) == 1
            assert shown["plan"]["chain"] and shown["current_ms"] > 0
        if not shown["worth_it"]:  # the tiny cluster's equal PCs: nothing to apply
            refused = http.post(f"/api/admin/networks/{NET}/rebalance/apply")
            assert refused.status_code == 409, refused.text
        missing = http.post("/api/admin/networks/nope/rebalance")
        assert missing.status_code == 404
