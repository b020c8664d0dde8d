"""Whether mDNS can work on 127.0.0.1 here (tests that announce nodes on loopback need it)."""

from __future__ import annotations

import os
import socket

MDNS_GROUP = "224.0.0.251"


def loopback_multicast_problem() -> str:
    """'' when a multicast datagram sent on 127.0.0.1 comes back to a member there, else why not."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("", 0))  # a private port: no interference with real mDNS on 5353
        membership = socket.inet_aton(MDNS_GROUP) + socket.inet_aton("127.0.0.1")
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        rx.settimeout(1.0)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        token = os.urandom(16)
        tx.sendto(token, (MDNS_GROUP, rx.getsockname()[1]))
        while rx.recv(64) != token:
            pass
        return ""
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        rx.close()
        tx.close()
