"""Whether a connection comes from this PC itself (the gateway's and the metrics port's
rule for callers without credentials)."""

from __future__ import annotations

import ipaddress
import time

import psutil

_ADDRESSES_TTL_S = 10.0
_own: tuple[float, frozenset] = (0.0, frozenset())


def _ip(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address((host or "").split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


def own_addresses() -> frozenset:
    """The addresses of this PC's interfaces (loopback included), refreshed every few seconds
    (a DHCP lease may change them)."""
    global _own
    taken, addresses = _own
    if time.monotonic() - taken > _ADDRESSES_TTL_S:
        found = {_ip("127.0.0.1"), _ip("::1")}
        for entries in psutil.net_if_addrs().values():
            found.update(_ip(e.address) for e in entries)
        addresses = frozenset(found - {None})
        _own = (time.monotonic(), addresses)
    return addresses


def is_local(client_host: str | None, server_host: str | None = None) -> bool:
    """Whether a connection comes from this PC itself: its source address is one of this PC's
    own interface addresses (127.0.0.1 and ::1 included), or the address it reached.

    The operating system gives a connection between two programs of one PC such a source
    address (127.0.0.1 for any loopback destination, the PC's LAN address when that is what
    the client dialled). A PC on the LAN cannot pass for this one: a TCP handshake claiming
    one of this PC's addresses is answered to this PC itself, never to the sender (and Linux
    drops such packets outright: a martian source). Other loopback addresses
    (127.0.0.2 ...) are no interface's: a program must bind one on purpose, and is treated like
    a LAN caller (this is how tests play a LAN caller without leaving 127.0.0.0/8).
    """
    client = _ip(client_host)
    if client is None:
        return False
    return client == _ip(server_host) or client in own_addresses()
