"""A PC with systemd as its init, for tests of the node service: this machine's own OS tree
booted by ``systemd-nspawn`` (Debian's ``systemd-container``) as a throwaway container.

``--volatile=yes``: the container's / is a tmpfs with this machine's /usr read-only in it, so
nothing it does reaches this machine's files but the folders bound in; ``--private-network``:
it has a loopback of its own and no other interface (its services cannot touch this machine's
network, and nothing of its network outlives it: no veth, no bridge, no address on this
machine). Its unit folder and the node's data dir are bound from the test's tmp dir, so they
outlive a power-off: booting the same container again is a reboot. Commands run inside through
``nsenter`` into the container's init. Needs root and systemd-nspawn; ``unavailable()`` says why
not where the machine cannot, and a first boot that fails raises :class:`ContainerUnavailable`
(a test skips, saying why: an unprivileged CI container, no cgroups to give, ...).

Nothing here can hang a test run: every wait has a timeout, and a container's whole life has a
ceiling (``ceiling_s``): past it a watchdog halts the container, so every command inside ends,
and the next call raises :class:`TimeoutError`. systemd-nspawn is told to halt the container
when the test process dies (``PR_SET_PDEATHSIG``), so not even a killed pytest leaves one
running.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import tiktrue

UNIT_DIR = "/etc/systemd/system"
BOOT_TIMEOUT_S = 120.0  # nspawn to a booted systemd: about a second here
# A container's whole life in a test, boots and commands together: the service test takes about
# a minute here (loaded 2-core machine); the ceiling only ends a run that would hang.
CEILING_S = 600.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PR_SET_PDEATHSIG = 1


class ContainerUnavailable(RuntimeError):
    """This machine cannot boot a systemd container (the message says what happened)."""


class CommandTimeout(TimeoutError):
    """A command inside did not finish in its time (it was killed)."""


def unavailable() -> str | None:
    """Why no container can boot here, where that is known without trying (None: try)."""
    if not sys.platform.startswith("linux"):
        return "systemd runs on Linux only"
    if os.geteuid() != 0:
        return "booting a systemd container needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return (
                f"{tool} is not installed (Debian: apt-get install systemd-container; "
                "`make test` installs it when run as root or with sudo)"
            )
    return None


def _python_paths() -> list[str]:
    """What this Python needs inside: its venv, its base install, the tiktrue source tree."""
    paths = {sys.prefix, sys.base_prefix, str(Path(tiktrue.__file__).resolve().parents[2])}
    return sorted(p for p in paths if not p.startswith("/usr/"))  # /usr is there already


def _container_init(nspawn_pid: int) -> int | None:
    """The pid (here) of the container's init: the descendant of systemd-nspawn that is PID 1
    in its own PID namespace (nspawn's first child is a helper that forks it)."""
    todo = [nspawn_pid]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:  # gone meanwhile
            continue
        nspids = next(
            (line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), []
        )
        if pid != nspawn_pid and len(nspids) > 1 and nspids[-1] == "1":
            return pid
        todo += [int(child) for child in children]
    return None


def _halt_with_parent() -> None:  # runs in the child, before exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # nspawn halts its container on SIGTERM


class SystemdContainer:
    def __init__(
        self,
        base: Path,
        *,
        binds: dict[str, Path],
        read_only: dict[str, Path] | None = None,
        name: str | None = None,
        ceiling_s: float = CEILING_S,
    ) -> None:
        """``binds``: path inside -> folder here (kept across boots); ``read_only``: the same,
        bound read-only."""
        self.base = Path(base)
        self.binds = {UNIT_DIR: self.base / "units", **binds}
        self.read_only = {**{p: Path(p) for p in _python_paths()}, **(read_only or {})}
        self.name = name or f"tt-test-{os.getpid()}"  # a run's own name beside other runs
        self.ceiling_s = ceiling_s
        self.process: subprocess.Popen | None = None
        self.init_pid: int | None = None
        self.boots = 0
        self.deadline: float | None = None
        self.expired = False
        self._watchdog: threading.Timer | None = None

    # --- the ceiling ---

    def _start_clock(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.ceiling_s
            self._watchdog = threading.Timer(self.ceiling_s, self._expire)
            self._watchdog.daemon = True
            self._watchdog.start()

    def _expire(self) -> None:
        self.expired = True
        self.kill()

    def remaining(self) -> float:
        """Seconds left before the ceiling; TimeoutError once it has passed."""
        left = (self.deadline or time.monotonic() + self.ceiling_s) - time.monotonic()
        if self.expired or left <= 0:
            raise TimeoutError(
                f"the systemd container passed its ceiling of {self.ceiling_s:.0f} s and was halted"
            )
        return left

    # --- life ---

    def boot(self) -> None:
        """Start the container and wait until systemd has booted it. A first boot that cannot
        happen raises :class:`ContainerUnavailable`; a later one, RuntimeError."""
        self._start_clock()
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
            *(f"--bind-ro={here}:{inside}" for inside, here in self.read_only.items()),
            *(f"--bind={here}:{inside}" for inside, here in self.binds.items()),
            "--boot",
        ]
        self.boots += 1
        failed = ContainerUnavailable if self.boots == 1 else RuntimeError
        with (self.base / f"boot{self.boots}.log").open("wb") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_halt_with_parent,
            )
        self.process = process
        deadline = time.monotonic() + min(BOOT_TIMEOUT_S, self.remaining())
        # the container's init: a descendant of nspawn that is PID 1 of its own namespace
        while self.init_pid is None:
            self.remaining()  # the watchdog may have halted it
            if process.poll() is not None:
                raise failed(f"systemd-nspawn exited ({process.returncode}): {self.boot_log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise failed(f"the container did not start in time: {self.boot_log()}")
            self.init_pid = _container_init(process.pid)
            if self.init_pid is None:
                time.sleep(0.2)
        # wait for the boot to finish (degraded is fine: this host's units that fail in a box);
        # until systemd has its bus up, systemctl cannot ask it and says nothing
        state = ""
        while state not in ("running", "degraded"):
            self.remaining()
            left = deadline - time.monotonic()
            if process.poll() is not None or left <= 0:
                self.kill()
                raise failed(f"the container did not boot ({state!r}): {self.boot_log()}")
            try:
                asked = self.run(
                    ["systemctl", "is-system-running", "--wait"], check=False, timeout=left
                )
                state = asked.stdout.strip() or asked.stderr.strip()
            except CommandTimeout:
                state = "still booting"
            if state not in ("running", "degraded"):
                time.sleep(0.2)

    def boot_log(self) -> str:
        path = self.base / f"boot{self.boots}.log"
        return path.read_text(errors="replace")[-3000:] if path.is_file() else ""

    def run(
        self,
        command: list[str],
        *,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess:
        """Run a command inside, as root, with a clean environment (plus ``env``). Past
        ``timeout`` (or the container's ceiling) the command is killed: TimeoutError."""
        assert self.init_pid is not None, "not booted"
        timeout = min(timeout, self.remaining())
        clean = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        argv = (
            ["nsenter", "-t", str(self.init_pid), "-a", "env", "-i"]
            + [f"{k}={v}" for k, v in clean.items()]
            + command
        )
        # its own process group: a timeout kills nsenter and what it started inside (the
        # command is nsenter's child, and would hold the output pipes open after nsenter died)
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            try:
                process.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # a descendant left the group, pipes open
                process.kill()
            raise CommandTimeout(f"{command} did not finish in {timeout:.0f} s") from None
        done = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
        if check and done.returncode != 0:
            raise AssertionError(
                f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done

    def get_json(self, url: str, timeout: float = 30.0):
        """GET ``url`` from inside (this Python, which is bound in) and read its JSON."""
        script = (
            "import json, sys, urllib.request; print(json.dumps(json.load("
            "urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])))))"
        )
        done = self.run([sys.executable, "-c", script, url, str(timeout)], timeout=timeout + 30)
        return json.loads(done.stdout)

    def poweroff(self, timeout: float = 120.0) -> None:
        """Shut the container down as a PC shuts down: systemd stops every unit."""
        process = self.process
        if process is None:
            return
        self.run(["systemctl", "poweroff", "--no-block"], check=False)
        try:
            process.wait(min(timeout, self.remaining()))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the container did not power off in {timeout:.0f} s") from None
        finally:
            self.kill()

    def kill(self) -> None:
        """Stop the container now (nspawn's own SIGTERM handling halts it; SIGKILL after a
        minute). Its processes, mounts and network namespace go with it."""
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.process, self.init_pid = None, None

    def close(self) -> None:
        """The end of the container's test: stopped, its watchdog too."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.kill()

    def __enter__(self) -> SystemdContainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def booted_or_skip(base: Path, **options) -> Iterator[SystemdContainer]:
    """A booted container (``SystemdContainer(base, **options)``), halted at the end, whatever
    happened; the test skips, saying why, where this machine cannot boot one."""
    why = unavailable()
    if why:
        pytest.skip(why)
    with SystemdContainer(base, **options) as box:
        try:
            box.boot()
        except ContainerUnavailable as exc:
            pytest.skip(f"this machine cannot boot a systemd container: {exc}")
        yield box
