"""What the first-run pages do, without the pages: create a network (the model from this PC's
store or downloaded from a model repository) or join one, reporting progress as they go.

The same control functions the CLI and the demo use do the work (``create_network``,
``download_model_blocks``, ``join_network``, discovery); this module only sequences them and
keeps a :class:`Progress` that a page polls (downloads run in a worker thread, so the page
reads the figures instead of being called from that thread). Its sentences are
:class:`~tiktrue.ui.i18n.Message` texts: the page shows them in its person's language.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tiktrue.control.discovery import DiscoveredNetwork, discover_networks, summarize_networks
from tiktrue.control.join import join_network
from tiktrue.control.model_downloader import DownloadProgress, download_model_blocks
from tiktrue.control.network_admin import probe_announcement
from tiktrue.control.network_manager import create_network
from tiktrue.model.errors import StoreError
from tiktrue.model.store import BlockStore, list_stores
from tiktrue.node.resources import free_ports
from tiktrue.protocol.network_config import NetworkConfig, config_path, read_config
from tiktrue.ui.context import UiContext
from tiktrue.ui.i18n import N_, Bytes, Message

SERVE_TIMEOUT_S = 600.0  # a new network's blocks load and its gateway starts within this
_ADMIN_IS = re.compile(r"the admin at (\S+) is node (\S+):")  # join_network's first words


class SetupError(Exception):
    """A first-run step that cannot go on; the message (a ``Message``) says why and what to
    do."""


@dataclass
class Progress:
    """Where a long first-run job is: a sentence, and a fraction per bar."""

    step: str = ""
    download: float | None = None  # 0..1 while a model downloads
    download_text: str = ""
    blocks: float | None = None  # 0..1 while this PC receives or loads its blocks
    blocks_text: str = ""
    log: list[str] = field(default_factory=list)
    done: bool = False
    error: str | None = None
    config: NetworkConfig | None = None  # the network, once made or joined

    def say(self, text: Message) -> None:
        self.step = text
        self.log.append(text)


def local_models(data_dir: Path) -> dict[str, str]:
    """Model id -> a label (architecture, layers, size) for the models in this PC's store."""
    models = {}
    for store in list_stores(Path(data_dir) / "models"):
        if isinstance(store, StoreError):
            continue
        m = store.manifest
        models[m.model_id] = N_(
            "{model} ({architecture}, {layers} layers, {size})",
            model=m.model_id,
            architecture=m.architecture,
            layers=m.num_layers,
            size=Bytes(m.total_bytes),
        )
    return models


def _download(data_dir: Path, model_id: str, url: str, progress: Progress) -> BlockStore:
    def report(p: DownloadProgress) -> None:
        progress.download = p.done_bytes / max(p.total_bytes, 1)
        progress.download_text = N_(
            "{done:.1f} / {total:.1f} MB", done=p.done_bytes / 1e6, total=p.total_bytes / 1e6
        )

    return download_model_blocks(
        model_id, url, dest_root=Path(data_dir) / "models", progress_callback=report
    )


async def create_new_network(
    context: UiContext,
    progress: Progress,
    *,
    name: str,
    model_id: str,
    repository: str | None = None,
    port: int | None = None,
    backups: int = 0,
) -> NetworkConfig:
    """Download the model when a repository is given, create the network with this PC as its
    admin, and wait until it serves (its gateway answers)."""
    name = name.strip()
    if not name:
        raise SetupError(N_("Give the network a name."))
    if not model_id:
        raise SetupError(N_("Choose a model."))
    data_dir = context.data_dir
    try:
        if repository:
            progress.say(
                N_(
                    "Downloading {model} from {repository} ...",
                    model=model_id,
                    repository=repository,
                )
            )
            progress.download = 0.0
            store = await asyncio.to_thread(_download, data_dir, model_id, repository, progress)
            progress.download = 1.0
        else:
            store = BlockStore(data_dir / "models" / model_id)
    except StoreError as exc:
        raise SetupError(N_("The model cannot be used: {detail}", detail=str(exc))) from exc
    info = context.node_info()
    host, control_port = info["host"], info["control_port"]
    progress.say(N_("Creating the network: its certificate authority, keys and config ..."))
    config = await asyncio.to_thread(
        create_network,
        data_dir,
        name,
        store,
        host=host,
        port=port or free_ports(1, host)[0],
        control_port=control_port,
        backup_nodes=backups,
    )
    progress.say(N_("Loading the model's blocks on this PC ..."))
    await context.reload()
    await wait_serving(context, config.network_id, progress)
    progress.say(N_("Done: the model is loaded and the network answers."))
    progress.done = True
    return config


async def wait_serving(
    context: UiContext, network_id: str, progress: Progress, *, gateway: bool = True
) -> int:
    """Wait until this PC serves its part of ``network_id`` (its blocks received and loaded)
    and, with ``gateway``, the network's gateway runs here; ``progress.blocks`` follows the
    blocks. Returns how many blocks the plan gives this PC."""
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while True:
        info = context.node_info()["networks"].get(network_id)
        if info is not None:
            wanted, present = _blocks_present(context.data_dir, network_id)
            progress.blocks = present / wanted if wanted else None
            progress.blocks_text = N_(
                "{present} of {wanted} blocks on this PC", present=present, wanted=wanted
            )
            ready = info["serving"] or not info["blocks"]
            if ready and (network_id in context.gateways or not gateway):
                if wanted:
                    progress.blocks = 1.0
                return wanted
            if info.get("waiting"):
                progress.step = N_("Waiting: {reason}", reason=info["waiting"])
        if time.monotonic() > deadline:
            raise SetupError(
                N_("Network {network} did not start serving in time.", network=network_id)
            )
        await asyncio.sleep(0.5)


def _blocks_present(data_dir: Path, network_id: str) -> tuple[int, int]:
    from tiktrue.security.node_tls import node_identity

    config = read_config(config_path(data_dir, network_id))
    me = config.node(node_identity(data_dir).node_id)
    root = Path(data_dir) / "models" / config.model_id
    try:
        store = BlockStore(root)
    except StoreError:
        return len(me.blocks), 0
    present = sum(1 for b in me.blocks if store.block_path(b).is_file())
    return len(me.blocks), present


async def find_networks(
    context: UiContext, manual: list[str] | None = None, timeout: float = 3.0
) -> list[DiscoveredNetwork]:
    """The networks on the LAN (zeroconf on this node's address, and ``manual`` host:port
    addresses asked directly), with their admin; this PC's own networks left out."""
    host = context.node_info().get("host")
    nodes = await asyncio.to_thread(
        discover_networks,
        timeout,
        interfaces=[host] if host else None,
        manual=manual or [],
        probe=probe_announcement,
    )
    mine = context.node_info()["node_id"]
    return [n for n in summarize_networks(nodes) if all(m.node_id != mine for m in n.nodes)]


def admin_address(network: DiscoveredNetwork) -> tuple[str, str] | None:
    """The admin's control address and node id of a discovered network (None: not found)."""
    for member in network.nodes:
        if member.node_id == network.admin:
            return f"{member.host}:{member.control_port}", member.node_id
    return None


async def join_existing_network(
    context: UiContext,
    progress: Progress,
    *,
    admin: str,
    token: str | None = None,
    network_id: str | None = None,
    admin_node_id: str | None = None,
    wait: float = 1800.0,
) -> NetworkConfig:
    """Join by token (at once) or by the admin's approval (waits, saying so), then wait until
    this PC has received its blocks and serves them."""
    from tiktrue.control.join import JoinError
    from tiktrue.node.control_link import ControlError
    from tiktrue.node.peer_link import PeerUnavailable
    from tiktrue.security.auth_manager import SecurityError

    admin = admin.strip()
    if not admin or ":" not in admin:
        raise SetupError(
            N_(
                "Give the admin's address as host:port (its control port, {port}).",
                port="7470",
            )
        )
    info = context.node_info()
    service = {"control": f"{info['host']}:{info['control_port']}"}
    progress.say(N_("Asking the admin at {admin} ...", admin=admin))

    def log(text: str) -> None:
        admin_is = _ADMIN_IS.match(text)
        if admin_is:
            progress.say(
                N_(
                    "The admin at {admin} is node {node}: check it on the admin PC.",
                    admin=admin_is[1],
                    node=admin_is[2],
                )
            )
        elif text.startswith("waiting for approval"):
            progress.say(
                N_(
                    "Waiting for the admin to approve this PC (on the admin PC: Admin, "
                    "join requests; or {command})",
                    command=text.split(": ", 1)[-1],
                )
            )
        else:  # the join's own words (control layer)
            progress.say(N_("Joining: {step}", step=text))

    try:
        config = await join_network(
            context.data_dir,
            admin,
            service=service,
            token=token.strip() if token else None,
            network_id=network_id,
            admin_node_id=admin_node_id,
            wait=wait,
            log=log,
        )
    except (JoinError, ControlError, PeerUnavailable, SecurityError, OSError) as exc:
        raise SetupError(N_("Could not join: {detail}", detail=str(exc))) from exc
    progress.say(
        N_("Joined {network}; receiving this PC's blocks from the admin ...", network=config.name)
    )
    await context.reload()
    if await wait_serving(context, config.network_id, progress, gateway=False):
        progress.say(N_("Done: this PC serves its part of {network}.", network=config.name))
    else:
        progress.say(
            N_(
                "Done: this PC is in {network}. The plan keeps the model on the other PCs for "
                "now; this PC gets its part when the network is planned again.",
                network=config.name,
            )
        )
    progress.done = True
    return config
