"""A PC with systemd as its init, for tests of the node service: this machine's own OS tree
booted by ``systemd-nspawn`` (Debian's ``systemd-container``) as a throwaway container.

``--volatile=yes``: the container's / is a tmpfs with this machine's /usr read-only in it, so
nothing it does reaches this machine's files but the folders bound in; ``--private-network``:
it has a loopback of its own and no other interface (its services cannot touch this machine's
network). Its unit folder and the node's data dir are bound from the test's tmp dir, so they
outlive a power-off: booting the same container again is a reboot. Commands run inside through
``nsenter`` into the container's init. Needs root and systemd-nspawn; ``unavailable()`` says why
not where the machine cannot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tiktrue

UNIT_DIR = "/etc/systemd/system"
BOOT_TIMEOUT_S = 120.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "systemd runs on Linux only"
    if os.geteuid() != 0:
        return "booting a systemd container needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install systemd-container)"
    return None


def _python_paths() -> list[str]:
    """What this Python needs inside: its venv, its base install, the tiktrue source tree."""
    paths = {sys.prefix, sys.base_prefix, str(Path(tiktrue.__file__).resolve().parents[2])}
    return sorted(p for p in paths if not p.startswith("/usr/"))  # /usr is there already


class SystemdContainer:
    def __init__(self, base: Path, *, binds: dict[str, Path], name: str = "tt-test") -> None:
        """``binds``: path inside -> folder here (kept across boots)."""
        self.base = Path(base)
        self.binds = {UNIT_DIR: self.base / "units", **binds}
        self.name = name
        self.process: subprocess.Popen | None = None
        self.init_pid: int | None = None
        self.boots = 0

    def boot(self) -> None:
        for folder in self.binds.values():
            folder.mkdir(parents=True, exist_ok=True)
        # a box with a loopback only has no network to wait for: network-online.target would
        # wait on systemd-networkd-wait-online's two-minute timeout
        wait_online = self.binds[UNIT_DIR] / "systemd-networkd-wait-online.service"
        if not wait_online.is_symlink():
            wait_online.symlink_to("/dev/null")
        command = [
            "systemd-nspawn",
            "--directory=/",
            "--volatile=yes",
            "--private-network",
            "--register=no",
            "--keep-unit",
            f"--machine={self.name}",
            "--console=pipe",
            "--quiet",
            *(f"--bind-ro={path}" for path in _python_paths()),
            *(f"--bind={here}:{inside}" for inside, here in self.binds.items()),
            "--boot",
        ]
        self.boots += 1
        log = (self.base / f"boot{self.boots}.log").open("wb")
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while self.init_pid is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.boot_log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the container did not start: {self.boot_log()}")
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            with_init = children.read_text().split() if children.exists() else []
            self.init_pid = int(with_init[0]) if with_init else None
            time.sleep(0.2)
        # wait for the boot to finish (degraded is fine: this host's units that fail in a box);
        # until systemd has its bus up, systemctl cannot ask it and says nothing
        while True:
            state = self.run(
                ["systemctl", "is-system-running", "--wait"], check=False, timeout=BOOT_TIMEOUT_S
            ).stdout.strip()
            if state in ("running", "degraded"):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the container did not boot ({state!r}): {self.boot_log()}")
            time.sleep(0.2)

    def boot_log(self) -> str:
        return (self.base / f"boot{self.boots}.log").read_text(errors="replace")[-3000:]

    def run(
        self,
        command: list[str],
        *,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess:
        """Run a command inside, as root, with a clean environment (plus ``env``)."""
        assert self.init_pid is not None, "not booted"
        clean = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        done = subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-a", "env", "-i"]
            + [f"{k}={v}" for k, v in clean.items()]
            + command,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done

    def poweroff(self, timeout: float = 120.0) -> None:
        """Shut the container down as a PC shuts down: systemd stops every unit."""
        if self.process is None:
            return
        self.run(["systemctl", "poweroff", "--no-block"], check=False)
        try:
            self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """Stop the container at once (nspawn's own SIGTERM handling halts it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process, self.init_pid = None, None
