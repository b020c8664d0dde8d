"""``tiktrue demo``: the whole seed-000 journey on this PC, with the real small model.

1. A model repository (``tiktrue models serve``) holds SmolLM2-135M-Instruct, imported once.
2. Four node services start: the admin in ``TIKTRUE_HOME`` itself (so ``tiktrue network
   status`` and ``tiktrue chat`` there see the demo), three more in ``<home>/demo/node2..4``.
3. The admin downloads the model from the repository (resumable, verified) and creates the
   network (with one backup); discovery (zeroconf) finds the others; each joins with a
   one-time token.
4. The admin measures every node, plans the spans (the model fits only on three nodes; the
   fourth, with more RAM, is held back as the backup of the other two workers), pushes each
   node its blocks (encrypted, verified) and switches the chain to the new config. Killing
   either worker is survived: the backup takes over and answers in flight go on.
5. An admin account (made on the first run) gets a fresh API key, printed beside the API's
   address (the demo's earlier keys are revoked), and its password for the web UI, kept in
   ``<home>/demo/admin_password`` so every run prints the same one.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from pathlib import Path

import uvicorn

from tiktrue.control.discovery import discover_networks
from tiktrue.control.join import create_join_token, join_network
from tiktrue.control.local_service import poke_local_service
from tiktrue.control.model_downloader import download_model_blocks
from tiktrue.control.model_repository import repository_app
from tiktrue.control.network_admin import set_caps
from tiktrue.control.network_manager import create_network, leave_network
from tiktrue.control.planner import DEFAULT_RUNTIME_BYTES, ModelProfile
from tiktrue.control.plans import apply_network
from tiktrue.limits import MIN_AUTO_CONTEXT_TOKENS
from tiktrue.model.demo_model import DEMO_MODEL_ID, ensure_demo_model
from tiktrue.node.resources import free_ports
from tiktrue.paths import run_file
from tiktrue.protocol.network_config import config_path
from tiktrue.security.auth_manager import _write_private_file
from tiktrue.security.users import InvalidCredentials, NotFound, UserStore
from tiktrue.service.local_network import LocalCluster
from tiktrue.ui.progress import progress_printer

NETWORK_ID = "demo"
DEMO_ADMIN = "admin"
DEMO_KEY_NAME = "demo"
DEMO_PASSWORD_FILE = "admin_password"
BACKUP_INDEX = 3  # the fourth node: it gets more RAM, and the planner holds it back as backup


def ram_caps(store) -> tuple[int, int]:
    """RAM caps (bytes) for the demo's PCs, from the model's size: with ``small`` the model
    and its KV budget fit only on three PCs; ``large`` holds a replica of two of the spans."""
    profile = ModelProfile.from_manifest(store.manifest, store.config())
    context = profile.max_context or MIN_AUTO_CONTEXT_TOKENS  # the plan reserves the model's own
    need = profile.total_bytes + profile.kv_bytes(profile.chain_order, context)
    return DEFAULT_RUNTIME_BYTES + int(need * 0.42), DEFAULT_RUNTIME_BYTES + int(need * 0.9)


class _Repository:
    """``tiktrue models serve`` in a thread of this process."""

    def __init__(self, root: Path) -> None:
        port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            repository_app(root), host="127.0.0.1", port=port, log_level="error"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Repository:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(5)


def demo_api_key(home: Path) -> tuple[str, str]:
    """A new API key of the demo's admin account, and the account's password (the one kept
    in ``<home>/demo/admin_password``; a new one when that file is missing or no longer the
    account's)."""
    users = UserStore(home)
    path = Path(home) / "demo" / DEMO_PASSWORD_FILE
    password = path.read_text("utf-8").strip() if path.is_file() else None
    try:
        users.user(DEMO_ADMIN)
        if password is None:
            raise InvalidCredentials("no demo password kept")
        users.check_password(DEMO_ADMIN, password)
    except NotFound:
        password = secrets.token_urlsafe(12)
        users.add_user(DEMO_ADMIN, password, "admin")
        _keep_password(path, password)
    except InvalidCredentials:
        password = secrets.token_urlsafe(12)
        users.set_password(DEMO_ADMIN, password)
        _keep_password(path, password)
    for old in users.list_keys(DEMO_ADMIN):
        if old.name == DEMO_KEY_NAME and old.revoked_at is None:
            users.revoke_key(old.id)
    _, key = users.create_key(DEMO_ADMIN, name=DEMO_KEY_NAME)
    users.close()
    return key, password


def _keep_password(path: Path, password: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    _write_private_file(path, password.encode("utf-8"))


def _service(home: Path) -> dict:
    return json.loads(run_file(home).read_text("utf-8"))


def start_demo_network(
    home: Path, *, nodes: int = 4, log=print, dtype: str | None = None
) -> LocalCluster:
    """Everything up to a served network; returns the running cluster (stop it when done)."""
    repository = home / "repository"
    store = ensure_demo_model(log, models_root=repository, dtype=dtype)
    m = store.manifest
    log(
        f"model {m.model_id}: {store.weight_format} weights, {m.dtype} activations, "
        f"{m.total_bytes / 1e6:.0f} MB"
    )
    homes = [home] + [home / "demo" / f"node{i}" for i in range(2, nodes + 1)]
    for h in homes:  # a fresh network each run (identities and downloads are kept)
        leave_network(h, NETWORK_ID)
    cluster = LocalCluster(homes)
    log(f"starting {len(homes)} node services (logs: node.log in each node's folder) ...")
    cluster.start()
    try:
        with _Repository(repository) as repo:
            log(f"model repository at {repo.url}; the admin downloads {DEMO_MODEL_ID} once ...")
            progress = progress_printer(
                log,
                lambda p: f"  download {p.done_bytes / 1e6:6.1f} / {p.total_bytes / 1e6:.1f} MB",
            )

            admin_store = download_model_blocks(
                DEMO_MODEL_ID, repo.url, dest_root=home / "models", progress_callback=progress
            )
        admin = _service(home)
        control_host, control_port = admin["control"].rsplit(":", 1)
        create_network(
            home,
            "Demo",
            admin_store,
            host=control_host,
            port=free_ports(1)[0],
            control_port=int(control_port),
            network_id=NETWORK_ID,
            auto_plan=False,
            backup_nodes=1,
        )
        asyncio.run(poke_local_service(home))
        log(f"created network {NETWORK_ID} on the admin node {admin['node_id']}")
        others = [_service(h) for h in homes[1:]]
        wanted = {o["node_id"] for o in others}
        found = discover_networks(
            15.0, interfaces=["127.0.0.1"], until=lambda ns: wanted <= {n.node_id for n in ns}
        )
        seen = {n.node_id for n in found}
        for other in others:
            how = "found by discovery" if other["node_id"] in seen else "not announced; by address"
            log(f"node {other['node_id']} at {other['control']}: {how}")
        for h in homes[1:]:
            token = create_join_token(home, NETWORK_ID, ttl=600)
            asyncio.run(
                join_network(h, admin["control"], token=token, service=_service(h), log=log)
            )
            log(f"node {_service(h)['node_id']} joined with a one-time token")

        async def plan_and_apply():
            # the first three PCs give RAM for about a third of the model each: it fits only on
            # all three; the fourth gives more and stands by as the backup of the other two
            small, large = ram_caps(admin_store)
            for i, h in enumerate(homes):
                caps = {"ram_bytes": large if i == BACKUP_INDEX else small}
                await set_caps(home, NETWORK_ID, _service(h)["node_id"], caps)
            log(
                f"nodes 1-3 give {small / 1e6:.0f} MB of RAM each to the network, "
                f"node 4 gives {large / 1e6:.0f} MB"
            )
            pushed = progress_printer(
                log,
                lambda p: (
                    f"  -> {p.node_id}: {p.sent_bytes / 1e6:6.1f} / {p.total_bytes / 1e6:.1f} MB"
                ),
                steps=4,
                done="sent_bytes",
                per="node_id",
            )

            return await apply_network(
                home, NETWORK_ID, planned=lambda plan: log(plan.describe()), progress=pushed
            )

        config = asyncio.run(plan_and_apply())
        log(f"network {NETWORK_ID} runs config v{config.version} ({config_path(home, NETWORK_ID)})")
        _wait_serving(homes, config)
        log(survival(config))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def survival(config) -> str:
    """What the network survives, in a sentence for the person watching the demo."""
    for backup in config.backups():
        covered = [n.node_id for n in config.chain() if set(n.blocks) <= set(backup.blocks)]
        if covered:
            return (
                f"backup: node {backup.node_id} holds a replica of {backup.blocks[0]}.."
                f"{backup.blocks[-1]}; if node {' or '.join(covered)} stops (kill it: "
                f"any answer in flight pauses, then goes on), it takes over at once"
            )
    return "no backup: a node that stops is replaced by moving its blocks where there is room"


def _wait_serving(homes: list[Path], config, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    expected = {n.node_id for n in config.nodes if n.blocks}
    while time.monotonic() < deadline:
        serving = {_service(h)["node_id"] for h in homes if _service(h)["networks"].get(NETWORK_ID)}
        if expected <= serving:
            return
        time.sleep(0.2)
    raise TimeoutError("the nodes did not start serving their new spans in time")
