"""Discovery over real mDNS on 127.0.0.1 (python-zeroconf, no mocks), and the manual path."""

from __future__ import annotations

import threading
import uuid

import pytest

from tiktrue import __version__
from tiktrue.control import discovery
from tiktrue.control.discovery import (
    MAX_TXT_STRING,
    DiscoveredNode,
    NetworkBrowser,
    NodeAnnouncement,
    NodeAnnouncer,
    announcement_for,
    decode_properties,
    discover_networks,
    encode_properties,
    instance_name,
    parse_host_port,
    summarize_networks,
)
from tiktrue.protocol.network_config import NetworkConfig, NodeEntry, write_config
from tiktrue.security.node_tls import node_identity

LOOPBACK = ["127.0.0.1"]


class Watcher:
    """Collects a NetworkBrowser's on_change calls; waits for a condition on them."""

    def __init__(self):
        self.nodes: list[DiscoveredNode] = []
        self.calls = 0
        self._cond = threading.Condition()

    def __call__(self, nodes: list[DiscoveredNode]) -> None:
        with self._cond:
            self.nodes = nodes
            self.calls += 1
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 120.0) -> list[DiscoveredNode]:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.nodes), timeout), (
                f"not within {timeout} s; browser saw {self.nodes}"
            )
            return self.nodes


def _ours(nodes, node_id):
    """Our node among ``nodes`` (other TikTrue services may run on this machine)."""
    return next((n for n in nodes if n.node_id == node_id), None)


def _announcement(**networks) -> NodeAnnouncement:
    return NodeAnnouncement(
        node_id=uuid.uuid4().hex[:16], name="test-pc", control_port=7481, networks=networks
    )


def _many_networks(count: int) -> dict:
    return {
        f"net-{i:02d}": {
            "name": f"Office network number {i} with a long name",
            "role": "worker",
            "model_id": "llama-3.1-8b-instruct-q4",
        }
        for i in range(count)
    }


def test_announce_discover_update_stop(loopback_multicast):
    announcement = _announcement(office={"name": "Office", "role": "admin", "model_id": "m1"})
    node_id = announcement.node_id
    watcher = Watcher()
    browser = NetworkBrowser(interfaces=LOOPBACK, on_change=watcher)
    announcer = NodeAnnouncer(announcement, interfaces=LOOPBACK)
    try:
        announcer.start()
        nodes = discover_networks(
            timeout=120, interfaces=LOOPBACK, until=lambda ns: _ours(ns, node_id) is not None
        )
        found = _ours(nodes, node_id)
        assert found is not None, nodes
        assert (found.name, found.host, found.control_port) == ("test-pc", "127.0.0.1", 7481)
        assert found.version == __version__ and found.source == "mdns"
        assert {k: v.model_dump() for k, v in found.networks.items()} == {
            "office": {"name": "Office", "role": "admin", "model_id": "m1"}
        }
        [network] = summarize_networks([found])
        assert (network.name, network.model_id, network.admin) == ("Office", "m1", node_id)

        browser.start()
        watcher.wait_for(lambda ns: _ours(ns, node_id) is not None)

        # More networks than fit in one TXT string: the JSON is split over several keys.
        many = _many_networks(12)
        announcer.update(announcement.model_copy(update={"networks": {}}))
        watcher.wait_for(lambda ns: (n := _ours(ns, node_id)) is not None and not n.networks)
        announcer.update(NodeAnnouncement(**{**announcement.model_dump(), "networks": many}))
        nodes = watcher.wait_for(lambda ns: len(getattr(_ours(ns, node_id), "networks", ())) > 1)
        found = _ours(nodes, node_id)
        assert {k: v.model_dump() for k, v in found.networks.items()} == many

        announcer.stop()
        watcher.wait_for(lambda ns: _ours(ns, node_id) is None)
    finally:
        announcer.stop()
        browser.stop()


def test_one_entry_per_node_and_manual_wins(loopback_multicast):
    announcement = _announcement(lab={"name": "Lab", "role": "worker", "model_id": "m2"})
    asked = []

    def probe(host: str, port: int) -> NodeAnnouncement | None:
        asked.append((host, port))
        return announcement

    browsed = []  # what mDNS found: the node must be found both ways for the test to mean it

    def until(nodes) -> bool:
        browsed.extend(n for n in nodes if n.node_id == announcement.node_id)
        return bool(browsed)

    with NodeAnnouncer(announcement, interfaces=LOOPBACK):
        nodes = discover_networks(
            timeout=120, interfaces=LOOPBACK, manual=["localhost:7999"], probe=probe, until=until
        )
    ours = [n for n in nodes if n.node_id == announcement.node_id]
    assert browsed and browsed[0].source == "mdns", "the browse never saw the node"
    assert asked == [("localhost", 7999)]
    assert len(ours) == 1
    assert (ours[0].source, ours[0].host, ours[0].control_port) == ("manual", "localhost", 7999)
    assert set(ours[0].networks) == {"lab"}


def test_manual_addresses_use_the_probe(monkeypatch):
    """No multicast involved: timeout=0 skips the mDNS browse."""

    def no_browse(*args, **kwargs):
        raise AssertionError("timeout=0 must not browse")

    monkeypatch.setattr(discovery, "NetworkBrowser", no_browse)
    good = _announcement(home={"name": "Home", "role": "admin", "model_id": "m3"})
    asked = []

    def probe(host: str, port: int) -> NodeAnnouncement | None:
        asked.append((host, port))
        if port == 7001:
            return good
        if port == 7002:
            return None  # not a TikTrue node
        raise ConnectionRefusedError("nobody listens")

    nodes = discover_networks(
        timeout=0, manual=["192.0.2.10:7001", "[::1]:7002", "192.0.2.11:7003"], probe=probe
    )
    assert sorted(asked) == [("192.0.2.10", 7001), ("192.0.2.11", 7003), ("::1", 7002)]
    [node] = nodes
    assert (node.node_id, node.host, node.control_port) == (good.node_id, "192.0.2.10", 7001)
    assert node.source == "manual" and node.addresses == ["192.0.2.10"]
    assert node.networks["home"].name == "Home"


def test_manual_addresses_are_checked():
    with pytest.raises(ValueError, match="probe function"):
        discover_networks(timeout=0, manual=["192.0.2.10:7001"])
    for bad in ["192.0.2.10", "host:0", "host:99999", ":7000", "::1:7000", "[::1]7000"]:
        with pytest.raises(ValueError):
            parse_host_port(bad)
    assert parse_host_port(" pc-7.lan:7480 ") == ("pc-7.lan", 7480)
    assert parse_host_port("[fe80::1%eth0]:7480") == ("fe80::1%eth0", 7480)


def test_a_slow_probe_is_left_behind():
    """A probe still running after ``probe_timeout``: the answer comes without it (the probe
    is held until the answer is in, or a ceiling far beyond the timeout passes)."""
    release, finished = threading.Event(), threading.Event()

    def probe(host, port):
        release.wait(120)
        finished.set()
        return _announcement()

    try:
        assert discover_networks(timeout=0, manual=["h:1"], probe=probe, probe_timeout=0.3) == []
        assert not finished.is_set(), "discover_networks waited for the slow probe"
    finally:
        release.set()


def test_txt_properties_fit_and_round_trip():
    announcement = _announcement(**_many_networks(20))
    properties = encode_properties(announcement)
    assert int(properties["nn"]) > 1
    for key, value in properties.items():
        assert len(f"{key}={value}".encode()) <= MAX_TXT_STRING
    decoded = decode_properties(properties, "192.0.2.5")
    assert decoded == announcement.model_copy(update={"host": "192.0.2.5"})

    fresh = _announcement()
    assert decode_properties(encode_properties(fresh), "h").networks == {}
    with pytest.raises(ValueError, match="malformed"):
        decode_properties({k: v for k, v in properties.items() if k != "n1"}, "h")
    with pytest.raises(ValueError, match="at most"):
        encode_properties(_announcement(**_many_networks(100)))


def test_instance_name_fits_a_dns_label():
    long = NodeAnnouncement(node_id="0123456789abcdef", name="ö" * 60, control_port=1)
    name = instance_name(long)
    assert name.endswith("-0123456789abcdef") and len(name.encode()) <= 63
    assert instance_name(long.model_copy(update={"name": "pc.lan"})) == "pc-lan-0123456789abcdef"
    announcer = NodeAnnouncer(long)
    with pytest.raises(ValueError, match="speaks for node"):
        announcer.update(long.model_copy(update={"node_id": "fedcba9876543210"}))


def test_announcement_from_data_dir(tmp_path):
    node_id = node_identity(tmp_path).node_id
    config = NetworkConfig(
        network_id="office",
        name="Office",
        model_id="m1",
        model_chain_order=["embed", "head"],
        nodes=[NodeEntry(node_id=node_id, role="admin", port=7480, blocks=["embed", "head"])],
    )
    write_config(tmp_path, config)
    (tmp_path / "network_config_broken.json").write_text("{", "utf-8")

    announcement = announcement_for(tmp_path, 7481, name="desk")
    assert announcement.node_id == node_id
    assert (announcement.name, announcement.control_port) == ("desk", 7481)
    assert {k: v.model_dump() for k, v in announcement.networks.items()} == {
        "office": {"name": "Office", "role": "admin", "model_id": "m1"}
    }
    assert announcement_for(tmp_path / "fresh", 7481).networks == {}


def test_summarize_without_admin_uses_the_majority():
    def node(node_id, name):
        return DiscoveredNode(
            node_id=node_id,
            name=node_id,
            host="192.0.2.1",
            control_port=1,
            networks={"n": {"name": name, "role": "worker", "model_id": "m"}},
        )

    [network] = summarize_networks([node("a", "Old"), node("b", "New"), node("c", "New")])
    assert (network.name, network.admin) == ("New", None)
    assert [m.node_id for m in network.nodes] == ["a", "b", "c"]
