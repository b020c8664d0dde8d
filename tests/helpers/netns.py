"""Hosts of our own: Linux network namespaces on a bridge, made and removed by a test.

``VirtualLan(hosts=3)`` makes a "switch" namespace holding a bridge, and one namespace per
host, each with one interface (``eth0``, a veth whose other end is a port of the bridge), the
address ``10.77.0.<11+i>/24``, loopback up, and a default route through ``10.77.0.1`` (a
router that does not exist: enough for a PC to know which interface is its LAN). Nothing is
made in the namespace this test runs in: every interface is created inside its own namespace
(the names carry the test's pid, so runs side by side never meet). ``unplug(i)`` takes host
``i``'s cable out of the switch (its bridge port down); ``plug(i)`` puts it back.

Programs run on a host with ``ip netns exec`` (``run``, ``popen``); the test process itself
stays outside. Needs root and ``ip``: ``lan_problem()`` says why not, for a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SUBNET = "10.77.0"
ROUTER = f"{SUBNET}.1"  # the default route's gateway: on the link, never answering
REPO = Path(__file__).resolve().parents[2]


def lan_problem() -> str:
    """'' when this machine can make network namespaces, else why not."""
    if sys.platform != "linux":
        return "network namespaces are Linux's"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"ttprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:  # what a VirtualLan needs inside a namespace: exec, a veth pair, a bridge
        inside = ["ip", "netns", "exec", probe, "ip", "link", "add"]
        for what in (["v0", "type", "veth", "peer", "name", "v1"], ["b0", "type", "bridge"]):
            done = subprocess.run([*inside, *what], capture_output=True, text=True)
            if done.returncode != 0:
                why = done.stderr.strip()
                return f"`ip link add {' '.join(what)}` in a namespace failed: {why}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args: str, namespace: str | None = None) -> None:
    command = ["ip", "netns", "exec", namespace, "ip", *args] if namespace else ["ip", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")


class VirtualLan:
    """A switch and ``hosts`` PCs on it (see the module); a context manager."""

    def __init__(self, hosts: int = 3, *, default_route: bool = True, tag: str = "") -> None:
        self.tag = f"tt{os.getpid() % 100000}{tag}"
        self.switch = f"{self.tag}sw"
        self.names = [f"{self.tag}h{i + 1}" for i in range(hosts)]
        self.addresses = [f"{SUBNET}.{11 + i}" for i in range(hosts)]
        self.default_route = default_route
        self._made: list[str] = []

    def __enter__(self) -> VirtualLan:
        try:
            self._make()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("link", "set", "lo", "up", namespace=name)

    def _make(self) -> None:
        self._namespace(self.switch)
        _ip("link", "add", "br0", "type", "bridge", namespace=self.switch)
        _ip("link", "set", "br0", "up", namespace=self.switch)
        for i, (name, address) in enumerate(zip(self.names, self.addresses, strict=True)):
            self._namespace(name)
            port = f"port{i + 1}"
            # both ends made where they live: nothing appears in the test's own namespace
            _ip(
                "link", "add", "eth0", "netns", name, "type", "veth",
                "peer", "name", port, "netns", self.switch,
            )  # fmt: skip
            _ip("link", "set", port, "master", "br0", "up", namespace=self.switch)
            _ip("addr", "add", f"{address}/24", "dev", "eth0", namespace=name)
            _ip("link", "set", "eth0", "up", namespace=name)
            if self.default_route:
                _ip("route", "add", "default", "via", ROUTER, namespace=name)

    def remove(self) -> None:
        """Delete every namespace made (their interfaces go with them)."""
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made.clear()

    def unplug(self, i: int) -> None:
        """Host ``i``'s cable out of the switch: its port down (its side sees no carrier)."""
        _ip("link", "set", f"port{i + 1}", "down", namespace=self.switch)

    def plug(self, i: int) -> None:
        _ip("link", "set", f"port{i + 1}", "up", namespace=self.switch)

    def command(self, i: int, *args: str) -> list[str]:
        """``args`` run on host ``i``."""
        return ["ip", "netns", "exec", self.names[i], *args]

    def python(self, i: int, *args: str) -> list[str]:
        """This interpreter on host ``i`` (``-m tiktrue ...``, ``-c ...``)."""
        return self.command(i, sys.executable, *args)

    def run(self, i: int, *args: str, env: dict | None = None, timeout: float = 120, **kw):
        """Run ``python args`` on host ``i`` from the repository root; the CompletedProcess."""
        return subprocess.run(
            self.python(i, *args),
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            timeout=timeout,
            **kw,
        )

    def popen(self, i: int, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(
            self.python(i, *args), cwd=REPO, env={**os.environ, **(env or {})}, **kw
        )
