"""Node-side security against real node processes on 127.0.0.1 (issue 9, items 1-4): who may
call what on a control port and a block server (the whole table), the challenge against replay
and relay, expired and revoked certificates, forged and rolled-back configs."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time

import pytest
import torch
import websockets

from tests.helpers.cluster import node_connection
from tests.helpers.network import control_address
from tests.test_cli import tiktrue
from tiktrue import limits
from tiktrue.control import network_manager as nm
from tiktrue.control.config_signing import sign_config
from tiktrue.model.engine import Span
from tiktrue.node.control_link import ControlError, ControlLink
from tiktrue.node.peer_link import PeerLink, PeerUnavailable
from tiktrue.protocol import protocol_spec as ps
from tiktrue.protocol.frames import encode_tensor_frame
from tiktrue.protocol.network_config import NetworkConfig, config_path, read_config, write_config
from tiktrue.security import auth_manager
from tiktrue.security.access_control import (
    ADMIN,
    ANYONE,
    BACKUP,
    BLOCK_MESSAGES,
    CONTROL_OPS,
    OWNER,
    UNSCOPED_OPS,
    WORKER,
)
from tiktrue.security.auth_manager import certificate_info, create_network_ca
from tiktrue.security.link_auth import LinkChallenge, session_binding
from tiktrue.security.node_tls import (
    NetworkCredentials,
    control_client_context,
    install_certificate,
    node_identity,
)
from tiktrue.service.control_server import ControlServer
from tiktrue.service.local_network import LocalCluster, prepare_local_network

pytestmark = pytest.mark.integration
NET, OTHER = "sec-a", "sec-b"
CEILING = 120.0


@pytest.fixture(scope="module")
def secured(tiny_llama, tmp_path_factory):
    """Network sec-a: node1 (admin), node2, node3 (workers), node4 (a backup holding a replica
    of the head's span); network sec-b: node1 (admin) and node2. node2 is the node under test:
    a worker in both networks."""
    base = tmp_path_factory.mktemp("secured")
    order = tiny_llama.manifest.model_chain_order
    spans = [Span.of(order, "embed", "layer_1"), Span.of(order, "layer_2", "layer_3")]
    head = Span.of(order, "layer_4", "head")
    homes, config = prepare_local_network(
        base, tiny_llama, spans=[*spans, head], backups=[head], network_id=NET
    )
    homes_b, config_b = prepare_local_network(base, tiny_llama, nodes=2, network_id=OTHER)
    # one control port per node, whatever the network
    ports = {n.node_id: n.control_port for n in config.nodes}
    nodes_b = [n.model_copy(update={"control_port": ports[n.node_id]}) for n in config_b.nodes]
    config_b = sign_config(
        config_b.model_copy(update={"nodes": nodes_b}), nm.admin_ca(homes[0], OTHER)
    )
    for home in homes_b:
        write_config(home, config_b)
    cluster = LocalCluster(homes, kv_budget_mb=16, gateway=False).start()
    try:
        yield homes, config
    finally:
        cluster.stop()


def _credentials(homes) -> dict[str, NetworkCredentials | None]:
    return {
        ANYONE: None,
        ADMIN: NetworkCredentials.load(homes[0], NET),
        WORKER: NetworkCredentials.load(homes[2], NET),
        BACKUP: NetworkCredentials.load(homes[3], NET),
        "admin of sec-b": NetworkCredentials.load(homes[0], OTHER),
    }


def _harmless(op: str) -> dict:
    """A request each operation answers without changing anything (refused by a check after
    the table's, or doing no harm), so that only the table decides forbidden or not."""
    fields = {
        "hello": {"nonce": "00" * 16},
        "auth": {"proof": "00"},
        "join": {"request": {}},
        "join_status": {"request": {}, "request_id": "none"},
        "health_suspect": {"node_id": "nobody"},
        "blocks_held": {"model_id": "no-such-model"},
        "manifest_push": {"model_id": "no-such-model", "manifest": {}},
        "chunk": {"model_id": "no-such-model", "path": "x", "index": 0},
        "caps_set": {"caps": {"ram_bytes": "lots"}},
        "config_prepare": {"config": {}},
        "config_commit": {"version": 0},
        "config_abort": {"version": 0},
    }.get(op, {})
    return fields if op in UNSCOPED_OPS else {"network_id": NET, **fields}


def _may(op: str, caller: str) -> bool:
    """The table's answer: the caller's kind may call ``op``, and a certificate acts only in
    its own network (sec-b's admin names sec-a here)."""
    if caller == "admin of sec-b":
        return ADMIN in CONTROL_OPS[op] and op in UNSCOPED_OPS
    return caller in CONTROL_OPS[op]


async def _ask(address: str, node_id: str, op: str, **link) -> dict:
    try:
        async with ControlLink(address, expected_node_id=node_id, **link) as control:
            return await control.call(op, **_harmless(op))
    except ControlError as exc:
        return {"ok": False, "code": exc.code, "message": exc.message}


def test_every_control_operation_checks_the_table(secured):
    homes, config = secured
    target = config.nodes[1]
    address = control_address(homes[1])
    links = {name: {"credentials": c} for name, c in _credentials(homes).items()}
    links[OWNER] = {"owner": node_identity(homes[1])}
    assert {n.removeprefix("op_") for n in dir(ControlServer) if n.startswith("op_")} == set(
        CONTROL_OPS
    )

    async def walk() -> dict:
        return {
            (op, caller): await _ask(address, target.node_id, op, **link)
            for op in CONTROL_OPS
            for caller, link in links.items()
        }

    replies = asyncio.run(walk())
    wrong = [
        f"{op} by {caller}: {reply}"
        for (op, caller), reply in replies.items()
        if (reply.get("code") == "forbidden") == _may(op, caller)
    ]
    assert not wrong, "\n".join(wrong)
    public = {op for op in CONTROL_OPS if _may(op, ANYONE)}
    assert public == {"hello", "auth", "node_info", "join", "join_status"}
    seen = replies[("node_info", ANYONE)]  # who the node is, what discovery shows; no more
    assert (
        seen["public"]
        and seen["node_id"] == target.node_id
        and set(seen["networks"])
        == {
            NET,
            OTHER,
        }
    )
    assert not {"pid", "api", "resources", "caps"} & set(seen)
    assert "pid" in replies[("node_info", WORKER)]


def test_every_block_message_type_checks_the_table(secured):
    """Each role's certificate sends every message type of the block-server table to a
    worker; none is refused as forbidden. A backup standing by computes no step."""
    homes, config = secured
    middle, backup = config.nodes[1], config.nodes[3]
    credentials = _credentials(homes)
    roles = {role: credentials[role] for role in (ADMIN, WORKER, BACKUP)}
    assert all(set(BLOCK_MESSAGES[kind]) == set(roles) for kind in BLOCK_MESSAGES)
    replies = {"ack", "error", "hello_reply", "inference_response"}
    requests = {m.value for m in ps.MessageType} - replies
    assert requests == set(BLOCK_MESSAGES) - {"forward"}, "every request type is in the table"

    def message(kind: str, message_id: str) -> str | bytes:
        if kind == "forward":
            return encode_tensor_frame(
                torch.zeros(1, 2, 65),  # a wrong hidden size: answered, not computed
                kind="forward",
                network_id=NET,
                session_id="walk",
                message_id=message_id,
                start=0,
            )
        header = {"message_id": message_id, "message_type": kind, "protocol_version": "2.0"}
        body = {"network_id": NET, "session_id": "walk", "node_id": "n1", "peer": "x"}
        if kind == "authentication":
            body["license_key"] = "k"
        if kind == "inference_request":
            body["input_ids"] = [1]
        return json.dumps({"header": header, **body})

    async def walk() -> dict:
        replies = {}
        for role, creds in roles.items():
            ws = await node_connection(middle.address, creds, _hello(creds))  # hello, node_auth
            for kind in BLOCK_MESSAGES:
                if kind in ("hello", "node_auth", "link_lost"):  # link_lost has no answer
                    continue
                await ws.send(message(kind, f"{role}-{kind}"))
                reply = json.loads(await asyncio.wait_for(ws.recv(), CEILING))
                replies[(role, kind)] = reply
            await ws.close()
        # a backup standing by (config role backup) answers a step but computes none
        creds = roles[ADMIN]
        ws = await node_connection(backup.address, creds, _hello(creds))
        frame = encode_tensor_frame(
            torch.zeros(1, 2, 64),
            kind="forward",
            network_id=NET,
            session_id="standby",
            message_id="standby",
            start=0,
            open=True,
        )
        await ws.send(frame)
        replies["standby"] = json.loads(await asyncio.wait_for(ws.recv(), CEILING))
        await ws.close()
        return replies

    replies = asyncio.run(walk())
    forbidden = [key for key, reply in replies.items() if reply.get("code") == "forbidden"]
    assert not forbidden, forbidden
    assert replies[(WORKER, "forward")]["code"] == "bad_shape"
    assert replies[(BACKUP, "heartbeat")]["header"]["message_type"] == "heartbeat"
    standby = replies["standby"]
    assert (standby.get("code"), standby.get("in_reply_to")) == ("peer_unavailable", "standby")
    assert "is a backup" in standby["message"]


def _hello(credentials: NetworkCredentials, network_id: str = NET) -> ps.Hello:
    return ps.Hello(node_id=credentials.identity.node_id, network_id=network_id)


def test_a_caller_without_a_certificate_is_held_to_small_messages(secured):
    homes, _ = secured

    async def go():
        async with websockets.connect(
            f"wss://{control_address(homes[1])}", ssl=control_client_context(), max_size=None
        ) as ws:
            await ws.send(json.dumps({"op": "node_info", "pad": "x" * (100 << 10)}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), CEILING)
            return closed.value.rcvd.code

    assert asyncio.run(go()) == 1009  # message too big: closed before it is read


async def _block_challenge(address: str, creds: NetworkCredentials):
    """A raw block connection up to the server's challenge: (ws, this side's challenge)."""
    ws = await websockets.connect(f"wss://{address}", ssl=creds.client_context())
    tls = ws.transport.get_extra_info("ssl_object")
    binding = session_binding(tls, purpose=f"block:{NET}", own_cert=creds.cert_der, server=False)
    challenge = LinkChallenge(binding, "client")
    hello = _hello(creds).model_copy(update={"auth_nonce": challenge.nonce.hex()})
    await ws.send(ps.make_message(hello))
    reply = json.loads(await asyncio.wait_for(ws.recv(), CEILING))
    challenge.peer_nonce = bytes.fromhex(reply["auth_nonce"])
    return ws, challenge


async def _refused_answer(ws, proof: bytes) -> dict:
    await ws.send(ps.make_message(ps.NodeAuth(proof=proof.hex())))
    reply = json.loads(await asyncio.wait_for(ws.recv(), CEILING))
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), CEILING)
    return reply


def test_a_replayed_or_relayed_challenge_answer_is_refused(secured):
    homes, config = secured
    address = config.nodes[1].address
    creds = _credentials(homes)
    admin, worker = creds[ADMIN], creds[WORKER]

    async def go() -> dict:
        # a good answer, recorded ...
        ws, challenge = await _block_challenge(address, admin)
        recorded = challenge.answer(admin.identity)
        await ws.send(ps.make_message(ps.NodeAuth(proof=recorded.hex())))
        assert json.loads(await ws.recv())["header"]["message_type"] == "ack"
        await ws.close()
        # ... replayed on a new connection of the same node
        ws, _ = await _block_challenge(address, admin)
        replayed = await _refused_answer(ws, recorded)
        # relayed: the worker's connection gets its challenge answered by the admin, who
        # answers it in its own TLS session (as a relay makes it do)
        attacker, stolen = await _block_challenge(address, worker)
        victim, own = await _block_challenge(address, admin)
        own.peer_nonce = stolen.peer_nonce
        relayed = await _refused_answer(attacker, own.answer(admin.identity))
        await victim.close()
        # the same on the control port
        control = await _control_replay(control_address(homes[1]), admin)
        return {"replayed": replayed, "relayed": relayed, "control": control}

    replies = asyncio.run(go())
    for name, reply in replies.items():
        assert reply["code"] == "auth_failed", (name, reply)
    assert "does not verify" in replies["replayed"]["message"]


async def _control_replay(address: str, creds: NetworkCredentials) -> dict:
    """Answer the control port's challenge with an answer made on another connection: refused,
    and the connection stays without a certificate (the right answer comes too late)."""

    async def connect():
        ws = await websockets.connect(f"wss://{address}", ssl=control_client_context(creds))
        tls = ws.transport.get_extra_info("ssl_object")
        binding = session_binding(tls, purpose="control", own_cert=creds.cert_der, server=False)
        challenge = LinkChallenge(binding, "client")
        await ws.send(json.dumps({"op": "hello", "id": "h", "nonce": challenge.nonce.hex()}))
        challenge.peer_nonce = bytes.fromhex(json.loads(await ws.recv())["nonce"])
        return ws, challenge

    first, challenge = await connect()
    recorded = challenge.answer(creds.identity)
    await first.close()
    second, own = await connect()
    replies = []
    for proof in (recorded, own.answer(creds.identity)):  # one try: the right answer is late
        await second.send(json.dumps({"op": "auth", "id": "a", "proof": proof.hex()}))
        replies.append(json.loads(await second.recv()))
    await second.send(json.dumps({"op": "ping", "id": "p"}))
    still_anonymous = json.loads(await second.recv())
    await second.close()
    assert [r["code"] for r in replies] == ["auth_failed"] * 2, replies
    assert still_anonymous["code"] == "forbidden", still_anonymous
    return replies[0]


def test_expired_and_foreign_certificates_are_refused(secured, tmp_path, monkeypatch):
    homes, config = secured
    ca = nm.admin_ca(homes[0], NET)
    late = node_identity(tmp_path / "late")
    with monkeypatch.context() as past:
        long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
        past.setattr(auth_manager, "_utcnow", lambda: long_ago)
        expired = ca.generate_node_certificate(late.node_id, late.public_key, "worker", days=1)
    stranger = node_identity(tmp_path / "stranger")
    foreign_ca = create_network_ca(NET, tmp_path / "foreign-ca")  # same name, another CA
    foreign = foreign_ca.generate_node_certificate(stranger.node_id, stranger.public_key, "admin")
    refused = {}
    middle = config.nodes[1]
    for name, identity, cert in (("expired", late, expired), ("foreign", stranger, foreign)):
        install_certificate(identity.directory.parent, NET, ca.cert_pem, cert)
        folder = identity.directory.parent / "networks" / NET
        creds = NetworkCredentials(
            identity, folder / "ca_cert.pem", folder / "node_cert.pem", certificate_info(cert)
        )
        link = PeerLink(middle.host, middle.port, network_id=NET, credentials=creds)

        async def attempts(creds=creds, link=link):
            outcome = []
            for attempt in (
                _ask(control_address(homes[1]), middle.node_id, "ping", credentials=creds),
                link.connect(),
            ):
                try:
                    outcome.append(await attempt)
                except (PeerUnavailable, ps.ProtocolError) as exc:
                    outcome.append(type(exc).__name__)
            return outcome

        refused[name] = asyncio.run(attempts())
    # TLS itself refuses both (the server's alert, or the connection closed at once)
    assert refused == {n: ["PeerUnavailable", "PeerUnavailable"] for n in refused}, refused


def test_a_forged_or_rolled_back_config_is_refused_over_the_control_channel(secured, tmp_path):
    homes, config = secured
    admin = _credentials(homes)[ADMIN]
    ca = nm.admin_ca(homes[0], NET)
    renamed = sign_config(
        config.model_copy(update={"version": config.version + 1, "name": "renamed"}), ca
    )
    newer = config.model_copy(update={"version": config.version + 50, "name": "pushed"})
    offers = {
        "unsigned_config": newer.model_copy(update={"signature": None}),
        "bad_signature": sign_config(newer, ca).model_copy(update={"name": "altered"}),
        "forged": sign_config(newer, create_network_ca(NET, tmp_path / "evil-ca")),
        "stale_config": sign_config(config, ca),  # the version before ``renamed``, signed
    }

    async def go() -> dict:
        replies = {}
        async with ControlLink(
            control_address(homes[1]), expected_node_id=config.nodes[1].node_id, credentials=admin
        ) as link:
            prepared = await link.call(
                "config_prepare", network_id=NET, config=renamed.model_dump(mode="json")
            )
            assert prepared["staged"], prepared  # the admin's signed config is taken
            await link.call("config_commit", network_id=NET, version=renamed.version)
            for name, offered in offers.items():
                try:
                    await link.call(
                        "config_prepare", network_id=NET, config=offered.model_dump(mode="json")
                    )
                    replies[name] = "accepted"
                except ControlError as exc:
                    replies[name] = exc.code
        return replies

    assert asyncio.run(go()) == {
        "unsigned_config": "unsigned_config",
        "bad_signature": "bad_signature",
        "forged": "bad_signature",
        "stale_config": "stale_config",
    }


def test_a_removed_node_is_refused_at_once_on_every_node(tiny_llama, tmp_path):
    """``tiktrue network remove``: the node's open control and block connections are closed
    as soon as the signed config that revokes it is committed; new ones are refused."""
    order = tiny_llama.manifest.model_chain_order
    spans = [Span.of(order, "embed", "layer_2"), Span.of(order, "layer_3", "head")]
    homes, config = prepare_local_network(
        tmp_path / "rev", tiny_llama, spans=spans, backups=[spans[1]], network_id="rev"
    )
    # node3: a member that holds nothing yet (joined, not planned in)
    nodes = [n.model_copy(update={"blocks": []}) if n.role == "backup" else n for n in config.nodes]
    config = sign_config(config.model_copy(update={"nodes": nodes}), nm.admin_ca(homes[0], "rev"))
    for home in homes:
        write_config(home, config)
    first, worker, removed = config.nodes
    creds = NetworkCredentials.load(homes[2], "rev")
    cluster = LocalCluster(homes, kv_budget_mb=16, gateway=False).start()
    try:

        async def go() -> list:
            control = ControlLink(
                control_address(homes[1]), expected_node_id=worker.node_id, credentials=creds
            )
            await control.__aenter__()
            await control.call("ping")
            block = await node_connection(worker.address, creds, _hello(creds, "rev"))
            done = await asyncio.to_thread(
                tiktrue, homes[0], "network", "remove", "rev", removed.node_id, "--reason", "lost"
            )
            assert "revoked its certificate" in done.stdout, done.stdout
            for ws in (control._ws, block):  # closed by node2 when it commits the config
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), CEILING)
            refusals = [
                (await _ask(control_address(home), entry.node_id, "ping", credentials=creds))[
                    "code"
                ]
                for home, entry in ((homes[1], worker), (homes[0], first))
            ]
            with pytest.raises(ps.ProtocolError) as refused:
                await node_connection(worker.address, creds, _hello(creds, "rev"))
            return [*refusals, refused.value.code, refused.value.message]

        *codes, message = asyncio.run(go())
        assert codes == ["auth_failed"] * 3 and "was removed" in message, (codes, message)
        held = read_config(config_path(homes[1], "rev"))
        assert [(r.node_id, r.reason) for r in held.revoked] == [(removed.node_id, "lost")]
        assert removed.node_id not in {n.node_id for n in held.nodes}
    finally:
        cluster.stop()


def test_a_node_that_left_is_refused_although_its_certificate_is_valid(secured):
    """A node that left (not revoked: it may join again) is no longer in the network's config
    on the node it calls: every request is refused, and the connection ends."""
    homes, config = secured
    target, leaver = homes[1], config.nodes[3]  # the backup leaves
    path = config_path(target, NET)
    before = path.read_bytes()
    left = NetworkConfig.model_validate(
        {
            **config.model_dump(),
            "nodes": [n.model_dump() for n in config.nodes if n.node_id != leaver.node_id],
            "version": config.version + 1,
        }
    )

    def ask() -> dict:
        return asyncio.run(
            _ask(
                control_address(target),
                node_identity(target).node_id,
                "health_suspect",
                credentials=_credentials(homes)[BACKUP],
            )
        )

    write_config(target, left)
    try:
        reply = ask()
    finally:
        path.write_bytes(before)
    assert reply["ok"] is False and reply["code"] == "not_a_member", reply
    still = ask()
    assert still.get("code") != "not_a_member", still  # back in the config: answered again


def test_a_flood_without_certificates_is_capped_per_source(secured):
    """From one address (127.0.0.2: another PC of the LAN), connections without a certificate
    over the source's cap are closed right after their TLS handshake and, over its cap of
    open connections, at once, before any TLS; a member behind the same address still gets
    in, and the counts come back when the flood stops."""
    homes, config = secured
    address = control_address(homes[1])
    host, port = address.rsplit(":", 1)
    source = ("127.0.0.2", 0)
    member = control_client_context(NetworkCredentials.load(homes[2], NET))

    async def hello(context) -> dict | Exception:
        try:
            async with websockets.connect(
                f"wss://{address}", ssl=context, local_addr=source, open_timeout=CEILING
            ) as ws:
                await ws.send(json.dumps({"op": "hello", "id": "h", "nonce": "00" * 16}))
                return json.loads(await asyncio.wait_for(ws.recv(), CEILING))
        except (OSError, websockets.InvalidHandshake, websockets.ConnectionClosed) as exc:
            return exc

    async def go():
        certless = [
            await websockets.connect(
                f"wss://{address}", ssl=control_client_context(), local_addr=source
            )
            for _ in range(limits.MAX_CERTLESS_PER_SOURCE)
        ]
        one_more = await hello(control_client_context())
        with_cert = await hello(member)
        raw = [  # sockets that never start TLS, up to the source's cap of open connections
            await asyncio.open_connection(host, int(port), local_addr=source)
            for _ in range(limits.MAX_CONNECTIONS_PER_SOURCE - len(certless))
        ]
        try:
            await asyncio.wait_for(
                asyncio.open_connection(
                    host, int(port), ssl=control_client_context(), local_addr=source
                ),
                CEILING,
            )
            over = None
        except (OSError, asyncio.IncompleteReadError) as exc:
            over = exc
        for ws in certless:
            await ws.close()
        for _, writer in raw:
            writer.close()
        return one_more, with_cert, over

    one_more, with_cert, over = asyncio.run(go())
    assert isinstance(one_more, Exception), one_more
    assert with_cert.get("ok") and with_cert["node_id"] == config.nodes[1].node_id, with_cert
    assert over is not None, "a connection over the source's cap got a TLS handshake"
    log = (homes[1] / "node.log").read_text(errors="replace")
    assert "from 127.0.0.2: too many connections without a certificate" in log
    assert "from 127.0.0.2: too many connections (" in log

    def counted_again() -> bool:  # the flood gone: the address gets in again
        reply = asyncio.run(hello(control_client_context()))
        return isinstance(reply, dict) and reply.get("ok")

    deadline = time.monotonic() + CEILING
    while not counted_again():
        assert time.monotonic() < deadline, "the address was not let in again"
        time.sleep(0.2)
