"""A network of several node processes on this PC: the demo and the integration tests.

``prepare_local_network`` does by hand what joining will do over the LAN: one node home per
node, each with its own identity, a certificate from the network's CA, the network config and
only its own blocks. ``LocalCluster`` starts one ``tiktrue node`` process per home and stops
them all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from tiktrue.control.config_signing import sign_config
from tiktrue.control.network_manager import install_block_key
from tiktrue.model.engine import Span, split_evenly
from tiktrue.model.store import BlockStore
from tiktrue.node.resources import free_ports
from tiktrue.paths import HOME_ENV, run_file
from tiktrue.protocol.network_config import (
    NetworkConfig,
    NodeEntry,
    list_configs,
    network_dir,
    write_config,
)
from tiktrue.security.auth_manager import NetworkCA, create_network_ca
from tiktrue.security.crypto_layer import new_block_key
from tiktrue.security.node_tls import install_certificate, node_identity
from tiktrue.service.os_service import node_command


def place_blocks(store: BlockStore, target: Path, blocks: list[str]) -> None:
    """A node's copy of a model: manifest, config, tokenizer and only ``blocks``' files
    (hard-linked where it can: a test that damages a file must give its home copies first)."""
    (target / "blocks").mkdir(parents=True, exist_ok=True)
    for item in store.root.iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)
    for name in blocks:
        source, dest = store.block_path(name), target / store.manifest.blocks[name].file
        if dest.exists() and dest.stat().st_size == source.stat().st_size:
            continue
        dest.unlink(missing_ok=True)
        try:
            os.link(source, dest)  # same disk: no copy
        except OSError:
            shutil.copy2(source, dest)


def prepare_local_network(
    base: Path,
    store: BlockStore,
    *,
    nodes: int = 3,
    network_id: str = "local",
    spans: list[Span] | None = None,
    backups: list[Span] = (),
    host: str = "127.0.0.1",
) -> tuple[list[Path], NetworkConfig]:
    """Homes ``base/node1..N`` for a network serving ``store``'s model, fresh ports each call.

    The first node is the admin and holds every block (as after its download: it can push
    blocks when the plan changes); each ``backups`` span gets one more node, a backup holding
    that replica. Every node gets a fixed control port, so the admin can reach it."""
    spans = list(spans or split_evenly(store.manifest.model_chain_order, nodes))
    roles = ["admin"] + ["worker"] * (len(spans) - 1) + ["backup"] * len(backups)
    spans += list(backups)
    homes = [Path(base) / f"node{i + 1}" for i in range(len(spans))]
    identities = [node_identity(home) for home in homes]
    ca_dir = network_dir(homes[0], network_id) / "ca"
    ca = NetworkCA.load(ca_dir) if (ca_dir / "ca_key.pem").is_file() else None
    ca = ca or create_network_ca(network_id, ca_dir)
    ports = free_ports(2 * len(homes), host)
    entries = [
        NodeEntry(
            node_id=identity.node_id,
            role=role,
            host=host,
            port=port,
            control_port=control_port,
            blocks=list(span.blocks),
        )
        for identity, span, role, port, control_port in zip(
            identities, spans, roles, ports[: len(homes)], ports[len(homes) :], strict=True
        )
    ]
    config = NetworkConfig(
        network_id=network_id,
        name=f"{network_id} (this PC)",
        model_id=store.model_id,
        model_chain_order=store.manifest.model_chain_order,
        nodes=entries,
    )
    config = sign_config(config, ca)
    key = new_block_key()
    for home, identity, entry in zip(homes, identities, entries, strict=True):
        install_block_key(home, network_id, key)
        cert = ca.generate_node_certificate(
            identity.node_id, identity.public_key, entry.role, hosts=(host, "localhost")
        )
        install_certificate(home, network_id, ca.cert_pem, cert)
        write_config(home, config)
        held = store.manifest.model_chain_order if entry.role == "admin" else entry.blocks
        place_blocks(store, home / "models" / store.model_id, held)
    return homes, config


def _own_control_port(home: Path) -> int | None:
    """The control port a network config of ``home`` gives its node (None: any free one)."""
    me = node_identity(home).node_id
    for config in list_configs(home):
        for entry in config.nodes:
            if entry.node_id == me and entry.control_port:
                return entry.control_port
    return None


class LocalCluster:
    """``tiktrue node`` processes, one per home; the first one also runs the gateway."""

    def __init__(
        self,
        homes: list[Path],
        *,
        kv_budget_mb: int = 256,
        gateway: bool = True,
        own_control_ports: bool = True,  # False: any free port, as `--control-port 0` gives
        gateway_args: list[str] | None = None,
        node_env: dict[int, dict[str, str]] | None = None,
        host: str | None = "127.0.0.1",
    ):
        """``host``: where every node listens (loopback: these processes are one PC; None:
        the PC's LAN address, as ``tiktrue node`` takes it by default)."""
        self.homes = [Path(h) for h in homes]
        self.own_control_ports = own_control_ports
        self.gateway = gateway
        self.kv_budget_mb = kv_budget_mb
        self.gateway_args = list(gateway_args or [])  # more `tiktrue node` options, gateway only
        self.node_env = node_env or {}  # more environment for node i
        self.host = host
        self.processes: list[subprocess.Popen] = []
        self.api_url: str | None = None
        self.ui_url: str | None = None  # the gateway's web UI (None: served without one)
        self._api_port: int | None = None

    def _spawn(self, i: int) -> subprocess.Popen:
        home = self.homes[i]
        home.mkdir(parents=True, exist_ok=True)
        run_file(home).unlink(missing_ok=True)
        args = node_command([])  # this Python, or the bundle's service_runner
        port = _own_control_port(home) if self.own_control_ports else None
        args += ["--control-port", str(port or 0)]
        args += ["--host", self.host] if self.host else []
        args += ["--kv-budget-mb", str(self.kv_budget_mb)]
        if i == 0 and self.gateway:
            args += ["--api-port", str(self._api_port or 0), *self.gateway_args]
        log = (home / "node.log").open("ab")
        # Node processes on one PC share its cores: an idle node's OpenMP threads must not
        # spin long (GNU default 300k spins) while the next node of the chain computes.
        env = {
            "GOMP_SPINCOUNT": "30000",
            **os.environ,
            **self.node_env.get(i, {}),
            HOME_ENV: str(home),
        }
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)

    def _wait_started(self, indices, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for i in indices:
            home, process = self.homes[i], self.processes[i]
            while not run_file(home).is_file():
                if process.poll() is not None:
                    self.stop()
                    tail = (home / "node.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"node in {home} exited:\n{tail}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"node in {home} did not start in {timeout} s")
                time.sleep(0.1)
            if i == 0 and self.gateway:
                info = json.loads(run_file(home).read_text())
                self.api_url, self.ui_url = info["api"], info.get("ui")
                self._api_port = int(self.api_url.rsplit(":", 1)[1].split("/")[0])

    def start(self, timeout: float = 120.0) -> LocalCluster:
        self.processes = [self._spawn(i) for i in range(len(self.homes))]
        self._wait_started(range(len(self.homes)), timeout)
        return self

    def kill(self, i: int) -> None:
        """Kill node ``i`` at once (SIGKILL): a PC switched off."""
        self.processes[i].kill()
        self.processes[i].wait()

    def restart(self, i: int, *, kill: bool = False, timeout: float = 120.0) -> None:
        """Stop node ``i`` (SIGTERM, or SIGKILL when ``kill``: a crash; nothing when it is
        already down) and start it again on the same home and ports; returns once it
        listens."""
        process = self.processes[i]
        if process.poll() is None and kill:
            process.kill()
        elif process.poll() is None:
            process.terminate()
        process.wait(timeout)
        self.processes[i] = self._spawn(i)
        self._wait_started([i], timeout)

    def stop(self, timeout: float = 15.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
