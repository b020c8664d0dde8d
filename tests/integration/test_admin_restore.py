"""The admin PC is lost and restored on another PC from its backup: real node processes on
loopback addresses of their own (the new PC is 127.0.x.2). The other nodes follow the
restored admin to its new address without joining again, a conversation of the lost PC's
gateway continues token for token, and its accounts and keys work there."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest
import websockets

from tests.helpers.cluster import api_key, ask, client_ws_url, request, token_ids
from tests.helpers.network import import_model_from_store, wait_until
from tiktrue.control.network_admin import network_status
from tiktrue.model.engine import Span
from tiktrue.protocol.network_config import config_path, read_config
from tiktrue.security.gateway_tls import certificate_hosts
from tiktrue.security.node_tls import node_identity
from tiktrue.service.local_network import LocalCluster, prepare_local_network

pytestmark = pytest.mark.integration
NET = "office"
PASSPHRASE = "a passphrase for the office's backup"
PROMPT, FOLLOW = [5, 17, 42, 99], [9, 10, 11]
# another address of this machine: the new PC (not 127.0.0.2, which other tests bind as a
# LAN caller's source address; one per run, so runs side by side never share its ports)
NEW_PC = f"127.0.{100 + os.getpid() % 150}.2"


def cli(home, *args, stdin: str = "", check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "tiktrue", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, "TIKTRUE_HOME": str(home)},
        timeout=120,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"tiktrue {' '.join(args)}:\n{done.stdout}\n{done.stderr}")
    return done


def turn(url: str, sid: str, ids: list[int]) -> list[int]:
    async def go() -> list[int]:
        async with websockets.connect(url) as ws:
            body = request(NET, temperature=0, max_tokens=6, session_id=sid, input_ids=ids)
            replies = await ask(ws, body)
        assert replies[-1].get("status") == "success", replies[-1]
        return token_ids(replies)

    return asyncio.run(go())


def test_the_admin_restored_on_another_pc_is_followed_and_its_conversations_go_on(
    tiny_llama, tmp_path
):
    order = tiny_llama.manifest.model_chain_order
    spans = [
        Span.of(order, "embed", "layer_1"),
        Span.of(order, "layer_2", "layer_3"),
        Span.of(order, "layer_4", "head"),
    ]
    homes, config = prepare_local_network(tmp_path / "pcs", tiny_llama, spans=spans, network_id=NET)
    admin_id = node_identity(homes[0]).node_id
    cluster = LocalCluster(homes, kv_budget_mb=16).start()
    restored = None
    try:
        url = client_ws_url(cluster)
        undisturbed = [turn(url, "reference", PROMPT), turn(url, "reference", FOLLOW)]
        assert turn(url, "kept", PROMPT) == undisturbed[0]  # the conversation to keep
        key = api_key(homes[0])

        backup = tmp_path / "office.tiktrue-backup"
        made = cli(homes[0], "admin", "backup", str(backup), "--passphrase-stdin", stdin=PASSPHRASE)
        assert f"node {admin_id}; networks: {NET} (" in made.stdout
        assert b"BEGIN" not in backup.read_bytes()  # the CA key is not in clear
        cluster.kill(0)  # the admin PC is gone

        fresh = tmp_path / "new-pc"
        wrong = cli(fresh, "admin", "restore", str(backup), "--passphrase-stdin",
                    stdin="not the passphrase", check=False)  # fmt: skip
        assert wrong.returncode == 1 and "passphrase is wrong" in wrong.stderr
        assert not (fresh / "networks").exists()  # nothing written
        done = cli(fresh, "admin", "restore", str(backup), "--passphrase-stdin", stdin=PASSPHRASE)
        assert f"this PC has no copy of model {tiny_llama.model_id}" in done.stderr
        assert node_identity(fresh).node_id == admin_id
        import_model_from_store(tiny_llama.root, fresh / "models")  # as the user does

        restored = LocalCluster([fresh], kv_budget_mb=16, host=NEW_PC).start()

        def followed() -> bool:
            return all(
                read_config(config_path(h, NET)).node(admin_id).host == NEW_PC for h in homes[1:]
            )

        wait_until(followed, "the other nodes following the admin to its new address")
        cert = (fresh / "networks" / NET / "node_cert.pem").read_bytes()
        assert NEW_PC in certificate_hosts(cert)
        status = asyncio.run(network_status(fresh, NET))
        assert {n["node_id"]: n["state"] for n in status["nodes"]} == {
            n.node_id: "serving" for n in config.nodes
        }
        # the conversation goes on at the new PC's gateway, as if nothing had happened
        assert turn(client_ws_url(restored), "kept", FOLLOW) == undisturbed[1]
        models = f"{restored.api_url}/models"
        assert httpx.get(models, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert httpx.get(models, headers={"Authorization": "Bearer tt-wrong"}).status_code == 401
    finally:
        if restored is not None:  # the admin first: no failover as the others stop
            restored.stop()
        cluster.stop()
