"""Which address of this PC a node listens and announces on: its LAN address by default.

A node serves other PCs, so by default it takes the address of the interface that carries
the default route (the one a PC's traffic to the rest of the LAN and beyond leaves by). The
kernel says which one that is: ``connect()`` on a UDP socket makes it choose a source address
for the destination without sending a packet (the same on Linux, Windows and macOS). Without a
default route (an office LAN with no internet gateway), the one private IPv4 address of the
PC is taken, or the first of several; with none at all, loopback, which the node then says is
reachable from this PC only. ``--host`` chooses another address; ``--local`` loopback.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

import ifaddr

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Any address outside the LAN will do: the kernel only looks up its route. TEST-NET-2
# (RFC 5737) is never a real host, and a UDP connect() sends nothing.
_ROUTE_PROBE = ("198.51.100.1", 9)


@dataclass(frozen=True)
class LanAddress:
    """The address chosen and how: ``default route``, ``only LAN address``, ``first LAN
    address``, ``given`` (``--host``), ``loopback`` (``--local``) or ``no LAN address``."""

    host: str
    how: str

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this PC only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def is_unspecified(host: str) -> bool:
    """``0.0.0.0`` or ``::``: every address of this PC."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def default_route_address() -> str | None:
    """The IPv4 address of the interface of the default route, or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(_ROUTE_PROBE)
            address = probe.getsockname()[0]
        except OSError:  # no route to anywhere outside the LAN
            return None
    if address in ("0.0.0.0", "") or is_loopback(address):
        return None
    return address


def lan_addresses() -> list[str]:
    """This PC's IPv4 addresses other PCs can reach (neither loopback nor link-local),
    private ones first."""
    found = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not ip.is_IPv4:
                continue
            address = ipaddress.IPv4Address(ip.ip)
            if not (address.is_loopback or address.is_link_local or address.is_unspecified):
                found.add(address)
    return [str(a) for a in sorted(found, key=lambda a: (not a.is_private, a))]


def choose_host(host: str | None = None, *, local: bool = False) -> LanAddress:
    """The address a node listens and announces on: ``host`` when given, loopback when
    ``local``, else this PC's LAN address (see the module)."""
    if host:
        return LanAddress(host, "given")
    if local:
        return LanAddress(LOOPBACK, "loopback")
    routed = default_route_address()
    if routed is not None:
        return LanAddress(routed, "default route")
    found = lan_addresses()
    if len(found) == 1:
        return LanAddress(found[0], "only LAN address")
    if found:
        log.warning("no default route; several LAN addresses (%s): taking %s", found, found[0])
        return LanAddress(found[0], "first LAN address")
    log.warning("this PC has no LAN address: listening on %s (this PC only)", LOOPBACK)
    return LanAddress(LOOPBACK, "no LAN address")


def reach_note(host: str) -> str:
    """One sentence on who can reach a node listening on ``host`` (for logs and the UI)."""
    if is_loopback(host):
        return (
            f"{host} is this PC's loopback: other PCs cannot reach this node. Start it "
            "without --local (it takes the PC's LAN address) or with --host <LAN address>."
        )
    if is_unspecified(host):
        return f"listening on every address of this PC ({host})"
    return f"other PCs reach this node at {host}"
