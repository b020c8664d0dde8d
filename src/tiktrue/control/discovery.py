"""Finding TikTrue nodes on the LAN: DNS-SD over mDNS (python-zeroconf), plus manual addresses.

Every node service announces one ``_tiktrue._tcp.local.`` instance (``NodeAnnouncer``) that
says who it is (node id, name, version), where its control API listens, and which networks it
serves (network id -> name, role, model id). An admin finds them with ``discover_networks()``
(a one-shot browse) or watches them with ``NetworkBrowser``; for LANs that block multicast,
``discover_networks(manual=["host:port", ...], probe=...)`` asks nodes at known addresses.

TXT record: ``txtvers``, ``node_id``, ``name``, ``version``, ``control_port``, ``nn`` (how many
chunks) and ``n0``, ``n1``, ... the networks as compact JSON, split so that each TXT string
stays within DNS-SD's 255 bytes.

All of this is blocking, thread-based API: from asyncio code call it via
``asyncio.to_thread`` (python-zeroconf refuses its sync API on a running event loop).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

import ifaddr
from pydantic import BaseModel, Field, ValidationError
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from tiktrue import __version__
from tiktrue.node.lan_address import LOOPBACK, lan_addresses
from tiktrue.protocol.network_config import CONFIG_PREFIX, ConfigError, read_config
from tiktrue.protocol.protocol_spec import ID_PATTERN

log = logging.getLogger(__name__)

SERVICE_TYPE = "_tiktrue._tcp.local."
TXT_VERSION = "1"
TTL_S = 120  # how long others cache an announcement of a node that vanished without goodbye
MAX_LABEL_BYTES = 63  # a DNS label, the instance name included
MAX_TXT_STRING = 255  # one "key=value" string in a TXT record
MAX_NETWORKS_JSON = 3500  # keeps the whole announcement well inside one mDNS packet
_CHUNK = MAX_TXT_STRING - len("n999=")
RESOLVE_TIMEOUT_MS = 1500

Interfaces = Sequence[str | int] | None


class NetworkInfo(BaseModel):
    """What a node says about one network it is in."""

    name: str = ""
    role: str = "worker"  # "admin", "worker" or "backup" (kept open for newer versions)
    model_id: str = ""


class NodeAnnouncement(BaseModel):
    node_id: str = Field(pattern=ID_PATTERN)
    name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=60)
    host: str = Field("", description="address peers should use; '' = this PC's LAN addresses")
    control_port: int = Field(ge=1, le=65535)
    version: str = __version__
    networks: dict[str, NetworkInfo] = Field(default_factory=dict)


class DiscoveredNode(NodeAnnouncement):
    """A node found on the LAN: ``host`` is the address to reach its control API at."""

    addresses: list[str] = Field(default_factory=list)
    source: Literal["mdns", "manual"] = "mdns"


class NetworkMember(BaseModel):
    node_id: str
    name: str
    host: str
    control_port: int
    role: str


class DiscoveredNetwork(BaseModel):
    network_id: str
    name: str
    model_id: str
    admin: str | None = Field(None, description="node id of the network's admin, if found")
    nodes: list[NetworkMember]


# --- TXT encoding ----------------------------------------------------------------------------


def encode_properties(announcement: NodeAnnouncement) -> dict[str, str]:
    """The TXT properties of an announcement (every ``key=value`` fits in 255 bytes)."""
    networks = announcement.model_dump(mode="json")["networks"]
    blob = json.dumps(networks, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    if len(blob) > MAX_NETWORKS_JSON:
        raise ValueError(
            f"the networks of node {announcement.node_id} take {len(blob)} bytes of JSON; "
            f"an mDNS announcement holds at most {MAX_NETWORKS_JSON}"
        )
    chunks = [blob[i : i + _CHUNK] for i in range(0, len(blob), _CHUNK)] if networks else []
    properties = {
        "txtvers": TXT_VERSION,
        "node_id": announcement.node_id,
        "name": announcement.name,
        "version": announcement.version,
        "control_port": str(announcement.control_port),
        "nn": str(len(chunks)),
    }
    properties.update({f"n{i}": chunk for i, chunk in enumerate(chunks)})
    return properties


def decode_properties(properties: dict[str, str | None], host: str) -> NodeAnnouncement:
    """Inverse of ``encode_properties``; raises ``ValueError`` on a malformed record."""
    try:
        count = int(properties.get("nn") or 0)
        blob = "".join(properties[f"n{i}"] or "" for i in range(count))
        networks = json.loads(blob) if blob else {}
        return NodeAnnouncement(
            node_id=properties.get("node_id") or "",
            name=properties.get("name") or "?",
            host=host,
            control_port=int(properties.get("control_port") or 0),
            version=properties.get("version") or "?",
            networks=networks,
        )
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise ValueError(f"malformed TikTrue announcement: {exc}") from exc


def instance_name(announcement: NodeAnnouncement) -> str:
    """``<name>-<node_id>``, the name cut so that the label fits in 63 bytes."""
    suffix = f"-{announcement.node_id}"
    name = announcement.name.replace(".", "-").strip() or "node"
    room = MAX_LABEL_BYTES - len(suffix.encode("utf-8"))
    name = name.encode("utf-8")[: max(room, 0)].decode("utf-8", errors="ignore")
    return f"{name}{suffix}"


# --- announcing ------------------------------------------------------------------------------


def make_zeroconf(interfaces: Interfaces = None) -> Zeroconf:
    """A Zeroconf on ``interfaces`` (addresses like ``"192.168.1.5"``; None = all, IPv4)."""
    if interfaces is None:
        return Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    chosen = list(interfaces)
    v6 = any(":" in str(i) for i in chosen)
    return Zeroconf(interfaces=chosen, ip_version=IPVersion.All if v6 else IPVersion.V4Only)


class NodeAnnouncer:
    """Announces this node on the LAN until ``stop()``.

    ``interfaces``: where to announce (passed to Zeroconf; None = every IPv4 interface).
    ``addresses``: the addresses to advertise; by default ``announcement.host`` when set, else
    the addresses in ``interfaces``, else this PC's LAN addresses.
    """

    def __init__(
        self,
        announcement: NodeAnnouncement,
        *,
        interfaces: Interfaces = None,
        addresses: Sequence[str] | None = None,
        zeroconf: Zeroconf | None = None,
    ):
        self._announcement = announcement
        self._interfaces = interfaces
        self._addresses = list(addresses) if addresses else None
        self._zc = zeroconf
        self._own_zc = zeroconf is None
        self._info: ServiceInfo | None = None
        self._lock = threading.Lock()
        encode_properties(announcement)  # refuse an announcement that cannot be sent, early

    @property
    def announcement(self) -> NodeAnnouncement:
        return self._announcement

    @property
    def instance(self) -> str:
        return f"{instance_name(self._announcement)}.{SERVICE_TYPE}"

    def start(self) -> NodeAnnouncer:
        with self._lock:
            if self._info is not None:
                return self
            if self._zc is None:
                self._zc = make_zeroconf(self._interfaces)
            info = self._service_info(self._announcement)
            try:
                self._zc.register_service(info, ttl=TTL_S)
            except Exception:
                self._close_zeroconf()
                raise
            self._info = info
            log.info("announcing %s on %s", info.name, info.parsed_addresses())
        return self

    def update(self, announcement: NodeAnnouncement) -> None:
        """Re-announce with new details (networks joined or left, name, port)."""
        if announcement.node_id != self._announcement.node_id:
            raise ValueError(
                f"an announcer speaks for node {self._announcement.node_id}, "
                f"not {announcement.node_id}"
            )
        encode_properties(announcement)
        with self._lock:
            old, self._announcement = self._announcement, announcement
            if self._info is None:
                return
            assert self._zc is not None
            info = self._service_info(announcement)
            if info.name != self._info.name:  # renamed: a different instance
                self._zc.unregister_service(self._info)
                self._zc.register_service(info, ttl=TTL_S)
            elif announcement != old:
                self._zc.update_service(info)
            self._info = info

    def stop(self) -> None:
        """Say goodbye (others drop this node at once) and release the sockets."""
        with self._lock:
            if self._info is not None and self._zc is not None:
                try:
                    self._zc.unregister_service(self._info)
                except Exception as exc:  # the goodbye is best effort; TTL_S covers it
                    log.warning("cannot unregister %s: %s", self._info.name, exc)
            self._info = None
            self._close_zeroconf()

    def _close_zeroconf(self) -> None:
        if self._own_zc and self._zc is not None:
            self._zc.close()
            self._zc = None

    def _service_info(self, announcement: NodeAnnouncement) -> ServiceInfo:
        addresses = self._advertised()
        return ServiceInfo(
            SERVICE_TYPE,
            f"{instance_name(announcement)}.{SERVICE_TYPE}",
            port=announcement.control_port,
            properties=encode_properties(announcement),
            server=f"tiktrue-{announcement.node_id}.local.",
            host_ttl=TTL_S,
            other_ttl=TTL_S,
            parsed_addresses=addresses,
        )

    def _advertised(self) -> list[str]:
        if self._addresses:
            return self._addresses
        if self._announcement.host:
            return [self._announcement.host]
        if self._interfaces is not None:
            given = [str(i) for i in self._interfaces if isinstance(i, str) and _is_ip(i)]
            if given:
                return given
        return lan_addresses() or [LOOPBACK]

    def __enter__(self) -> NodeAnnouncer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def announcement_for(
    data_dir: Path, control_port: int, *, name: str | None = None, host: str = ""
) -> NodeAnnouncement:
    """This node's announcement: its id from its key, its networks from its configs."""
    from tiktrue.security.node_tls import node_identity

    node_id = node_identity(data_dir).node_id
    networks: dict[str, NetworkInfo] = {}
    for path in sorted(Path(data_dir).glob(f"{CONFIG_PREFIX}*.json")):
        try:
            config = read_config(path)
            role = config.node(node_id).role
        except ConfigError as exc:
            log.warning("not announcing %s: %s", path.name, exc)
            continue
        networks[config.network_id] = NetworkInfo(
            name=config.name, role=role, model_id=config.model_id
        )
    extra = {"name": name} if name else {}
    return NodeAnnouncement(
        node_id=node_id, host=host, control_port=control_port, networks=networks, **extra
    )


# --- browsing --------------------------------------------------------------------------------


class NetworkBrowser:
    """Watches the LAN for TikTrue nodes until ``stop()``.

    ``on_change(nodes)`` is called (from a background thread) with the current nodes whenever
    one appears, changes its announcement, or says goodbye.
    """

    def __init__(
        self,
        *,
        interfaces: Interfaces = None,
        on_change: Callable[[list[DiscoveredNode]], None] | None = None,
        zeroconf: Zeroconf | None = None,
    ):
        self._interfaces = interfaces
        self._on_change = on_change
        self._zc = zeroconf
        self._own_zc = zeroconf is None
        self._browser: ServiceBrowser | None = None
        self._worker: threading.Thread | None = None
        self._events: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._found: dict[str, tuple[int, DiscoveredNode]] = {}  # instance -> (seq, node)
        self._seq = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> NetworkBrowser:
        if self._browser is not None:
            return self
        if self._zc is None:
            self._zc = make_zeroconf(self._interfaces)
        self._stopping.clear()
        self._worker = threading.Thread(target=self._run, name="tiktrue-browser", daemon=True)
        self._worker.start()
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._handle])
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._browser is not None:
            self._browser.cancel()
            self._browser = None
        if self._worker is not None:
            self._events.put(None)
            self._worker.join(timeout=RESOLVE_TIMEOUT_MS / 1000 + 2)
            self._worker = None
        if self._own_zc and self._zc is not None:
            self._zc.close()
            self._zc = None

    def nodes(self) -> list[DiscoveredNode]:
        """The nodes seen now, one per node id (its newest announcement)."""
        with self._lock:
            return _unique(self._found.values())

    def networks(self) -> list[DiscoveredNetwork]:
        return summarize_networks(self.nodes())

    def _handle(self, zeroconf, service_type, name, state_change) -> None:
        kind = "remove" if state_change is ServiceStateChange.Removed else "resolve"
        self._events.put((kind, name))

    def _run(self) -> None:
        while True:
            event = self._events.get()
            if event is None or self._stopping.is_set():
                return
            kind, name = event
            if kind == "remove":
                with self._lock:
                    changed = self._found.pop(name, None) is not None
            else:
                node = self._resolve(name)
                with self._lock:
                    before = self._found.get(name)
                    changed = node is not None and (before is None or before[1] != node)
                    if changed:
                        self._seq += 1
                        self._found[name] = (self._seq, node)
            if changed and self._on_change is not None:
                try:
                    self._on_change(self.nodes())
                except Exception:
                    log.exception("on_change callback failed")

    def _resolve(self, name: str) -> DiscoveredNode | None:
        zc = self._zc
        if zc is None:
            return None
        try:
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=RESOLVE_TIMEOUT_MS)
        except Exception as exc:
            log.debug("cannot resolve %s: %s", name, exc)
            return None
        if info is None:
            log.debug("no answer resolving %s", name)
            return None
        addresses = info.parsed_addresses()
        try:
            announcement = decode_properties(info.decoded_properties, _pick_host(addresses))
        except ValueError as exc:
            log.warning("ignoring %s: %s", name, exc)
            return None
        return DiscoveredNode(
            **announcement.model_dump(exclude={"control_port"}),
            control_port=info.port or announcement.control_port,
            addresses=addresses,
            source="mdns",
        )

    def __enter__(self) -> NetworkBrowser:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def discover_networks(
    timeout: float = 3.0,
    *,
    interfaces: Interfaces = None,
    manual: Sequence[str] = (),
    probe: Callable[[str, int], NodeAnnouncement | None] | None = None,
    probe_timeout: float = 5.0,
    until: Callable[[list[DiscoveredNode]], bool] | None = None,
) -> list[DiscoveredNode]:
    """The TikTrue nodes on the LAN and the networks they serve, one entry per node id.

    Browses mDNS for ``timeout`` seconds (0 = don't), or until ``until(nodes found so far)``
    holds, whichever comes first (so a caller waiting for known nodes waits on the event, with
    ``timeout`` as a ceiling), and meanwhile calls
    ``probe(host, port)`` for every ``"host:port"`` in ``manual`` (``"[v6addr]:port"`` for
    IPv6); a probe that returns None or raises is skipped, one still running after
    ``max(timeout, probe_timeout)`` seconds too. Where a node is found both ways, the manual
    entry wins: it was reached at that address. Sorted by name, then node id.
    """
    targets = [parse_host_port(entry) for entry in manual]
    if targets and probe is None:
        raise ValueError("manual addresses need a probe function to ask those nodes")
    started = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, len(targets))))
    try:
        futures = {pool.submit(probe, host, port): (host, port) for host, port in targets}
        found: list[DiscoveredNode] = []
        if timeout > 0:
            enough = threading.Event()

            def seen(nodes: list[DiscoveredNode]) -> None:
                if until is not None and until(nodes):
                    enough.set()

            with NetworkBrowser(interfaces=interfaces, on_change=seen) as browser:
                enough.wait(timeout)
                found = browser.nodes()
        remaining = max(timeout, probe_timeout) - (time.monotonic() - started)
        done, _ = concurrent.futures.wait(futures, timeout=max(remaining, 0))
        manual_nodes = []
        for future in futures:
            host, port = futures[future]
            if future not in done:
                log.warning("no answer from %s:%d in time", host, port)
                continue
            try:
                answer = future.result()
            except Exception as exc:
                log.warning("probing %s:%d failed: %s", host, port, exc)
                continue
            if answer is None:
                continue
            manual_nodes.append(
                DiscoveredNode(
                    **answer.model_dump(exclude={"host", "control_port"}),
                    host=host,
                    control_port=port,
                    addresses=[host],
                    source="manual",
                )
            )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    by_id = {node.node_id: node for node in found}
    by_id.update({node.node_id: node for node in manual_nodes})
    return sorted(by_id.values(), key=lambda n: (n.name.lower(), n.node_id))


def summarize_networks(nodes: Iterable[DiscoveredNode]) -> list[DiscoveredNetwork]:
    """Group nodes by the networks they announce; a network's name and model come from its
    admin's announcement where found, else from what most members say."""
    members: dict[str, list[tuple[DiscoveredNode, NetworkInfo]]] = {}
    for node in nodes:
        for network_id, info in node.networks.items():
            members.setdefault(network_id, []).append((node, info))
    networks = []
    for network_id, entries in sorted(members.items()):
        admins = [(n, i) for n, i in entries if i.role == "admin"]
        if admins:
            admin_node, admin_info = admins[0]
            name, model_id, admin = admin_info.name, admin_info.model_id, admin_node.node_id
        else:
            name = Counter(i.name for _, i in entries).most_common(1)[0][0]
            model_id = Counter(i.model_id for _, i in entries).most_common(1)[0][0]
            admin = None
        networks.append(
            DiscoveredNetwork(
                network_id=network_id,
                name=name,
                model_id=model_id,
                admin=admin,
                nodes=[
                    NetworkMember(
                        node_id=n.node_id,
                        name=n.name,
                        host=n.host,
                        control_port=n.control_port,
                        role=i.role,
                    )
                    for n, i in sorted(entries, key=lambda e: e[0].node_id)
                ],
            )
        )
    return networks


def parse_host_port(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); ``ValueError`` when malformed."""
    entry = text.strip()
    if entry.startswith("["):
        host, sep, port = entry[1:].partition("]:")
    else:
        host, sep, port = entry.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address as [address]:port")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port (port 1-65535)")
    return host, int(port)


# --- helpers ---------------------------------------------------------------------------------


def _unique(entries: Iterable[tuple[int, DiscoveredNode]]) -> list[DiscoveredNode]:
    newest: dict[str, tuple[int, DiscoveredNode]] = {}
    for seq, node in entries:
        if node.node_id not in newest or seq > newest[node.node_id][0]:
            newest[node.node_id] = (seq, node)
    return sorted((n for _, n in newest.values()), key=lambda n: (n.name.lower(), n.node_id))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _pick_host(addresses: list[str]) -> str:
    """The advertised address most likely reachable from here: one on a subnet of ours, else
    the first IPv4, else the first."""
    if not addresses:
        return ""
    parsed = [ipaddress.ip_address(a.split("%")[0]) for a in addresses]
    networks = []
    try:
        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                if ip.is_IPv4:
                    networks.append(ipaddress.ip_network(f"{ip.ip}/{ip.network_prefix}", False))
    except Exception as exc:  # only a preference; never fail discovery over it
        log.debug("cannot list local subnets: %s", exc)
    for address, text in zip(parsed, addresses, strict=True):
        if any(address in net for net in networks if net.version == address.version):
            return text
    for address, text in zip(parsed, addresses, strict=True):
        if address.version == 4:
            return text
    return addresses[0]
