"""Node certificates renew themselves while the node is a member: three real node processes
whose certificates are made to end soon (the admin's CA issues them for 45 s) each get a new
one before the end (the members from the admin over the control channel, the admin from its
own CA), show it on new connections without a restart, and the network works past the old
certificates' end."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest
import websockets
from cryptography import x509

from tests.helpers.cluster import ask, node_connection, request, token_ids
from tests.helpers.network import wait_until
from tests.integration.test_chain import client_ws_url, reference_tokens
from tiktrue.control.network_admin import network_status, poke_local_service
from tiktrue.model.engine import Span
from tiktrue.protocol import protocol_spec as ps
from tiktrue.security.auth_manager import NetworkCA
from tiktrue.security.node_tls import (
    NODE_CERT,
    NetworkCredentials,
    install_certificate,
    node_identity,
    pem_to_der,
)
from tiktrue.service.local_network import LocalCluster, prepare_local_network

pytestmark = pytest.mark.integration
NET = "renewing"
VALID_S = 45.0  # the short certificates' life: renewed when a third is left (15 s)
PROMPT = [5, 17, 42, 99]


def _cert(home) -> x509.Certificate:
    return x509.load_pem_x509_certificate((home / "networks" / NET / NODE_CERT).read_bytes())


def test_node_certificates_renew_themselves_before_they_end(tiny_llama, tmp_path):
    order = tiny_llama.manifest.model_chain_order
    spans = [
        Span.of(order, "embed", "layer_1"),
        Span.of(order, "layer_2", "layer_3"),
        Span.of(order, "layer_4", "head"),
    ]
    homes, config = prepare_local_network(tmp_path, tiny_llama, spans=spans, network_id=NET)
    cluster = LocalCluster(homes, kv_budget_mb=16).start()
    try:
        # every node's certificate now ends in 45 s, as one issued long ago would
        ca = NetworkCA.load(homes[0] / "networks" / NET / "ca")
        for home, entry in zip(homes, config.nodes, strict=True):
            identity = node_identity(home)
            short = ca.generate_node_certificate(
                identity.node_id,
                identity.public_key,
                entry.role,
                hosts=("127.0.0.1", "localhost"),
                days=VALID_S / 86400,
            )
            install_certificate(home, NET, ca.cert_pem, short)
        ends = _cert(homes[0]).not_valid_after_utc
        for home in homes:  # the services read their certificates again (as at a start)
            assert asyncio.run(poke_local_service(home))

        # each node has a new certificate before the old one ends (the end is the ceiling)
        def renewed() -> bool:
            return all(_cert(h).not_valid_after_utc > ends + dt.timedelta(days=1) for h in homes)

        left = (ends - dt.datetime.now(dt.timezone.utc)).total_seconds()
        wait_until(renewed, "every node's certificate renewed", timeout=left)
        for home, entry in zip(homes, config.nodes, strict=True):
            cert = _cert(home)
            assert cert.subject.rfc4514_string().startswith(f"CN={entry.node_id},OU={entry.role}")
            assert cert.not_valid_after_utc - ends > dt.timedelta(days=300)

        time.sleep(max(0.0, (ends - dt.datetime.now(dt.timezone.utc)).total_seconds() + 1))
        # past the old certificates' end: new connections both ways show the new ones ...
        admin = NetworkCredentials.load(homes[0], NET)

        async def connect_all() -> None:
            hello = ps.Hello(node_id=admin.identity.node_id, network_id=NET, role="admin")
            for home, entry in zip(homes[1:], config.nodes[1:], strict=True):
                ws = await node_connection(entry.address, admin, hello)
                shown = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
                await ws.close()
                assert shown == pem_to_der((home / "networks" / NET / NODE_CERT).read_bytes())

        asyncio.run(connect_all())
        # ... the admin reaches every node, and the chain answers as before
        status = asyncio.run(network_status(homes[0], NET))
        assert {n["node_id"]: n["state"] for n in status["nodes"]} == {
            n.node_id: "serving" for n in config.nodes
        }

        async def answer() -> list[int]:
            async with websockets.connect(client_ws_url(cluster)) as ws:
                body = request(NET, input_ids=PROMPT, temperature=0, max_tokens=6)
                return token_ids(await ask(ws, body))

        assert asyncio.run(answer()) == reference_tokens(tiny_llama, PROMPT, 6)
    finally:
        cluster.stop()
