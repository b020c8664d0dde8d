"""Who may use a running gateway (real node processes): API keys and JWTs, callers from the LAN,
owners of sessions, rate limits.

"From the LAN" without leaving 127.0.0.0/8: the gateway counts a caller as this PC's own when
its source address is one of this PC's interface addresses (127.0.0.1 for every ordinary
loopback connection). A client that binds the source address 127.0.0.2, which no interface
has, is treated as a LAN caller (see ``tiktrue.gateway.auth.is_local``).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import websockets

from tests.helpers.cluster import ask, request, token_ids
from tiktrue.gateway.auth import set_allow_anonymous
from tiktrue.security.users import UserStore

pytestmark = pytest.mark.integration
NET = "testnet"
LAN_SOURCE = "127.0.0.2"


@pytest.fixture(scope="module")
def gateway(tiny_cluster):
    """(api_url, ws_url, users, keys): accounts ada and bob on the gateway's node, a key each,
    a second key of ada's, and a key limited to another network."""
    cluster, homes, _ = tiny_cluster
    users = UserStore(homes[0], rounds=4)
    for name in ("ada", "bob"):  # plain accounts whichever module made the cluster's first
        if name not in {u.name for u in users.list_users()}:
            users.add_user(name, f"{name}'s password", "user")
    keys = {
        "ada": users.create_key("ada")[1],
        "ada2": users.create_key("ada", name="phone")[1],
        "bob": users.create_key("bob")[1],
        "other-net": users.create_key("bob", networks=["another-net"])[1],
    }
    ws_url = cluster.api_url.replace("http://", "ws://").removesuffix("/v1") + "/ws"
    yield cluster.api_url, ws_url, users, keys, homes[0]
    set_allow_anonymous(homes[0], False)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def lan_client() -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=LAN_SOURCE), timeout=120)


def test_a_key_works_with_the_openai_client_and_a_wrong_or_revoked_one_gets_401(gateway):
    api, _, users, keys, _ = gateway
    good = openai.OpenAI(base_url=api, api_key=keys["bob"], max_retries=0)
    answer = good.chat.completions.create(
        model=NET, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert answer.choices[0].message.content is not None
    for wrong in (keys["bob"][:-1] + "x", "not-a-key", "tt-" + "A" * 43):
        bad = openai.OpenAI(base_url=api, api_key=wrong, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    record, revoked = users.create_key("bob", name="to revoke")
    assert httpx.get(f"{api}/models", headers=bearer(revoked)).status_code == 200
    users.revoke_key(record.id)
    refused = httpx.get(f"{api}/models", headers=bearer(revoked))
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert "revoked" in refused.json()["error"]["message"]


def test_a_wrong_credential_is_refused_on_every_route_but_health(gateway):
    api, ws_url, _, _, _ = gateway
    root = api.removesuffix("/v1")
    wrong = bearer("tt-wrong")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, path in (
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/no/such/route"),
    ):
        reply = httpx.request(method, root + path, headers=wrong, json=body)
        assert reply.status_code == 401, (path, reply.status_code)
    assert httpx.get(root + "/health", headers=wrong).status_code == 200
    assert httpx.get(root + "/docs").status_code == 404  # off: its assets come from a CDN

    for kwargs in ({"additional_headers": wrong}, {"uri": ws_url + "?token=tt-wrong"}):
        uri = kwargs.pop("uri", ws_url)
        with pytest.raises(websockets.InvalidStatus) as refused:
            asyncio.run(handshake_to(uri, **kwargs))
        assert refused.value.response.status_code == 401


async def handshake_to(uri: str, **kwargs) -> None:
    async with websockets.connect(uri, open_timeout=60, **kwargs):
        pass


def test_a_jwt_from_login_works_and_a_wrong_password_gets_401(gateway):
    api, _, _, _, _ = gateway
    root = api.removesuffix("/v1")
    wrong = httpx.post(f"{root}/auth/login", json={"username": "ada", "password": "nope"})
    assert wrong.status_code == 401
    login = httpx.post(f"{root}/auth/login", json={"username": "ada", "password": "ada's password"})
    assert login.status_code == 200, login.text
    token = login.json()["access_token"]
    with lan_client() as lan:  # a JWT is a credential from the LAN too
        assert lan.get(f"{api}/models", headers=bearer(token)).status_code == 200
        assert lan.get(f"{api}/models", headers=bearer(token + "x")).status_code == 401


def seed_authentication(message_id: str, key: str) -> dict:
    """Seed 003's authentication message, as written there."""
    header = {
        "message_id": message_id,
        "message_type": "authentication",
        "protocol_version": "2.0",
        "timestamp": "2024-01-01T12:00:00Z",
    }
    return {"header": header, "license_key": key}


def test_callers_without_a_key_from_the_lan_are_refused_unless_anonymous_access_is_on(gateway):
    api, ws_url, _, keys, home = gateway
    assert httpx.get(f"{api}/models").status_code == 200  # this PC: allowed by default
    with lan_client() as lan:
        refused = lan.get(f"{api}/models")
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
        assert lan.get(f"{api}/models", headers=bearer(keys["bob"])).status_code == 200
        set_allow_anonymous(home, True)
        try:
            assert lan.get(f"{api}/models").status_code == 200
        finally:
            set_allow_anonymous(home, False)
        assert lan.get(f"{api}/models").status_code == 401

    async def over_ws():
        async with websockets.connect(ws_url, local_addr=(LAN_SOURCE, 0)) as ws:
            before = await ask(ws, request(NET, prompt="hi", max_tokens=2, message_id="a"))
            denied = await ask(ws, seed_authentication("w", "tt-wrong"))
            accepted = await ask(ws, seed_authentication("k", keys["bob"]))
            after = await ask(ws, request(NET, prompt="hi", max_tokens=2, message_id="b"))
            return before, denied, accepted, after

    before, denied, accepted, after = asyncio.run(over_ws())
    assert before[0]["code"] == "unauthorized" and before[0]["in_reply_to"] == "a"
    assert denied[0]["code"] == "unauthorized"
    assert accepted[0]["header"]["message_type"] == "ack" and "bob" in accepted[0]["detail"]
    assert after[-1]["status"] == "success"


def test_another_account_cannot_touch_a_session(gateway):
    _, ws_url, _, keys, _ = gateway
    sid = "ada-private"

    def msg(kind: str, message_id: str, **body) -> dict:
        return request(NET, message_type=kind, session_id=sid, message_id=message_id, **body)

    async def go():
        ada = await websockets.connect(ws_url, additional_headers=bearer(keys["ada"]))
        bob = await websockets.connect(f"{ws_url}?token={keys['bob']}")
        anonymous = await websockets.connect(ws_url)  # this PC, no key
        ada2 = await websockets.connect(ws_url, additional_headers=bearer(keys["ada2"]))
        out = {
            "start": await ask(ada, msg("inference_request", "s", input_ids=[5, 6], max_tokens=3))
        }
        for name, ws in (("bob", bob), ("anonymous", anonymous)):
            for kind in ("inference_request", "cancel", "session_save", "session_close"):
                extra = {"input_ids": [7], "max_tokens": 2} if kind == "inference_request" else {}
                out[f"{name}-{kind}"] = await ask(ws, msg(kind, f"{name}-{kind}", **extra))
        legacy = {"session_id": sid, "step": 0, "input_tensors": {"input_ids": [1, 2]}}
        out["bob-legacy"] = await ask(bob, json.dumps(legacy))
        out["save"] = await ask(ada, msg("session_save", "save"))
        out["close"] = await ask(ada, msg("session_close", "close"))
        out["bob-restore"] = await ask(bob, msg("session_restore", "bob-restore"))
        out["restore"] = await ask(ada2, msg("session_restore", "restore"))  # ada's other key
        out["more"] = await ask(ada, msg("inference_request", "m", input_ids=[9], max_tokens=2))
        for ws in (ada, bob, anonymous, ada2):
            await ws.close()
        return out

    out = asyncio.run(go())
    assert out["start"][-1]["status"] == "success" and len(token_ids(out["start"])) == 3
    for name in ("bob", "anonymous"):
        for kind in ("inference_request", "cancel", "session_save", "session_close"):
            reply = out[f"{name}-{kind}"]
            assert reply[0]["code"] == "forbidden", (name, kind, reply)
            assert reply[0]["in_reply_to"] == f"{name}-{kind}"
    assert out["bob-legacy"][0]["code"] == "forbidden"
    assert out["save"][0]["detail"].startswith("saved")
    assert out["close"][0]["detail"] == "closed"
    assert out["bob-restore"][0]["code"] == "forbidden"
    assert out["restore"][0]["detail"] == "restored", out["restore"]
    assert out["more"][-1]["status"] == "success" and len(token_ids(out["more"])) == 2


def test_a_key_keeps_to_its_networks_and_its_rate_limit(gateway):
    api, ws_url, users, keys, _ = gateway
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.get(f"{api}/models", headers=bearer(keys["other-net"])).json()["data"] == []
    other = httpx.post(f"{api}/chat/completions", headers=bearer(keys["other-net"]), json=body)
    assert other.status_code == 403

    async def ws_other():
        async with websockets.connect(ws_url, additional_headers=bearer(keys["other-net"])) as ws:
            return await ask(ws, request(NET, prompt="hi", max_tokens=2))

    assert asyncio.run(ws_other())[0]["code"] == "forbidden"

    _, limited = users.create_key("bob", rpm=2)
    replies = [httpx.get(f"{api}/models", headers=bearer(limited)) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 429], [r.text for r in replies]
    assert 1 <= int(replies[2].headers["retry-after"]) <= 60

    _, limited_ws = users.create_key("bob", rpm=1)

    async def ws_limited():
        async with websockets.connect(ws_url, additional_headers=bearer(limited_ws)) as ws:
            first = await ask(ws, request(NET, prompt="hi", max_tokens=2, message_id="1"))
            second = await ask(ws, request(NET, prompt="hi", max_tokens=2, message_id="2"))
            return first, second

    first, second = asyncio.run(ws_limited())
    assert first[-1]["status"] == "success"
    assert second[0]["code"] == "rate_limited" and "retry in" in second[0]["message"]


def test_a_closed_or_saved_conversation_stays_its_owners(gateway, tiny_cluster):
    """The issue's walk: ada saves and closes S over /ws; bob, from another address of the
    LAN, asks with S, restores S, saves, closes and cancels it; a caller without credentials
    on this PC does the same: every one is refused, and S (its row, its messages, its saved
    KV) stays ada's, who restores it and goes on. A saved conversation that is still open, and
    a closed one never saved, are refused the same way."""
    from tiktrue.gateway.session_store import SessionStore

    _, ws_url, _, keys, home = gateway
    net = tiny_cluster[2].network_id

    def msg(kind: str, sid: str, message_id: str, **body) -> dict:
        return request(net, message_type=kind, session_id=sid, message_id=message_id, **body)

    def turn(sid: str, message_id: str, ids: list[int]) -> dict:
        return msg("inference_request", sid, message_id, input_ids=ids, max_tokens=3)

    async def asked(ws, body) -> list[dict]:  # a ceiling: a reply that never comes fails
        return await asyncio.wait_for(ask(ws, body), 120)

    async def go():
        ada = await websockets.connect(ws_url, additional_headers=bearer(keys["ada"]))
        bob = await websockets.connect(
            ws_url, additional_headers=bearer(keys["bob"]), local_addr=(LAN_SOURCE, 0)
        )
        anonymous = await websockets.connect(ws_url)  # this PC's loopback, no key
        out = {}
        for sid in ("S", "S-open", "S-unsaved"):
            out[f"{sid}-start"] = await asked(ada, turn(sid, f"{sid}-start", [5, 6]))
        for sid in ("S", "S-open"):
            out[f"{sid}-save"] = await asked(ada, msg("session_save", sid, f"{sid}-save"))
        for sid in ("S", "S-unsaved"):
            out[f"{sid}-close"] = await asked(ada, msg("session_close", sid, f"{sid}-close"))
        for name, ws in (("bob", bob), ("anonymous", anonymous)):
            for sid in ("S", "S-open", "S-unsaved"):
                for kind in ("inference_request", "session_restore", "session_save"):
                    key = f"{name}-{sid}-{kind}"
                    body = turn(sid, key, [7]) if kind == "inference_request" else None
                    out[key] = await asked(ws, body or msg(kind, sid, key))
                for kind in ("cancel", "session_close"):
                    key = f"{name}-{sid}-{kind}"
                    out[key] = await asked(ws, msg(kind, sid, key))
        legacy = {"session_id": "S", "step": 0, "input_tensors": {"input_ids": [1, 2]}}
        out["anonymous-legacy"] = await asked(anonymous, json.dumps(legacy))
        out["restore"] = await asked(ada, msg("session_restore", "S", "restore"))
        out["more"] = await asked(ada, turn("S", "more", [9]))
        for sid in ("S", "S-open"):
            await asked(ada, msg("session_close", sid, f"{sid}-end"))
        for ws in (ada, bob, anonymous):
            await ws.close()
        return out

    store = SessionStore.open(home)
    out = asyncio.run(go())
    for sid in ("S", "S-open", "S-unsaved"):
        assert out[f"{sid}-start"][-1]["status"] == "success", out[f"{sid}-start"]
    refused = {k: v[0] for k, v in out.items() if k.startswith(("bob-", "anonymous-"))}
    assert len(refused) == 2 * 3 * 5 + 1
    for key, reply in refused.items():
        assert reply.get("code") == "forbidden", (key, reply)
    assert [out["S-save"][0]["detail"], out["S-close"][0]["detail"]] == ["saved", "closed"]
    row = store.get(net, "S")
    assert (
        row.owner
        == store.saved(net, "S").owner
        == "user:" + str(UserStore(home, rounds=4).user("ada").id)
    )
    assert row.tokens[:2] == [5, 6] and 7 not in row.tokens  # nobody else's turn got in
    assert out["restore"][0]["detail"] == "restored", out["restore"]
    assert out["more"][-1]["status"] == "success" and len(token_ids(out["more"])) == 3
    assert "/" not in json.dumps(out["S-save"])  # no server path in the acknowledgement
    store.db.close()
