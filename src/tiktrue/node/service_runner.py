"""``tiktrue node``: the node service (seed ``service_runner``).

Reads every ``network_config_<network_id>.json`` in the data dir and starts, with
``asyncio.gather``, one block server per network in which this node serves blocks, and the
gateway's HTTP app (OpenAI API, ``/ws``) for the networks whose model tokenizer it holds.
When everything listens it writes ``<data>/run/node.json`` (pid, ports, API URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path

import uvicorn

from tiktrue.control.network_config import list_configs
from tiktrue.gateway.api_client import Gateway
from tiktrue.gateway.openai_api import create_app
from tiktrue.gateway.ws_api import ClientProtocol
from tiktrue.node.model_node import BlockServer
from tiktrue.security.node_tls import NetworkCredentials, node_identity

log = logging.getLogger("tiktrue.node")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our loop: the node, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def run_file(data_dir: Path) -> Path:
    return Path(data_dir) / "run" / "node.json"


async def run_node(
    data_dir: Path,
    *,
    api_host: str = "127.0.0.1",
    api_port: int | None = None,
    kv_budget_mb: int = 512,
) -> None:
    data_dir = Path(data_dir)
    identity = node_identity(data_dir)
    servers: list[BlockServer] = []
    gateways: dict[str, Gateway] = {}
    for config in list_configs(data_dir):
        if identity.node_id not in {n.node_id for n in config.nodes}:
            continue
        credentials = NetworkCredentials.load(data_dir, config.network_id)
        if config.node(identity.node_id).blocks:
            servers.append(
                BlockServer(data_dir, config, credentials, kv_budget_bytes=kv_budget_mb << 20)
            )
        if api_port is not None:
            gateways[config.network_id] = Gateway(data_dir, config, credentials)
    if not servers and not gateways:
        raise SystemExit(
            f"node {identity.node_id} is in no network yet (no network_config_*.json in "
            f"{data_dir} names it)"
        )
    protocol = ClientProtocol(gateways)
    for server in servers:
        if server.network_id in gateways:
            server.client_handler = protocol.handle
        await server.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows: no such API
            loop.add_signal_handler(sig, stop.set)

    tasks = [asyncio.create_task(stop.wait())]
    api_url = None
    http = None
    if gateways:
        config = uvicorn.Config(
            create_app(gateways), host=api_host, port=api_port, log_level="warning", lifespan="off"
        )
        http = _EmbeddedServer(config)
        tasks.append(asyncio.create_task(http.serve()))
        while not http.started:
            if tasks[-1].done():
                tasks[-1].result()  # raises the bind error
            await asyncio.sleep(0.05)
        port = http.servers[0].sockets[0].getsockname()[1]
        api_url = f"http://{api_host}:{port}/v1"
        log.info("OpenAI API on %s", api_url)

    _write_run_file(data_dir, identity.node_id, servers, api_url)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if http is not None:
            http.should_exit = True
        for gateway in gateways.values():
            await gateway.chain.aclose()
        for server in servers:
            await server.stop()
        await asyncio.gather(*tasks[1:], return_exceptions=True)
        run_file(data_dir).unlink(missing_ok=True)


def _write_run_file(data_dir, node_id, servers, api_url) -> None:
    path = run_file(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "pid": os.getpid(),
        "node_id": node_id,
        "networks": {s.network_id: {"port": s.entry.port, "span": str(s.span)} for s in servers},
        "api": api_url,
    }
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(info, indent=2), "utf-8")
    partial.replace(path)
