"""This PC's node as a service of the OS: started at boot, restarted after a crash.

One interface, :class:`ServiceManager` (install, uninstall, start, stop, status), over the OS's
own service manager:

- Linux: a systemd unit ``tiktrue-node.service``, system-wide (``/etc/systemd/system``, the node
  runs as the person who installed it, with their data dir, so their ``tiktrue`` commands and
  ``tiktrue app`` see the same node) or per user (``systemctl --user``, started at login, or at
  boot once ``loginctl enable-linger`` allows it).
- Windows: the service ``TiktrueWorkerService`` (pywin32, no other executable): automatic start
  (delayed until the network is up), restarted by the service manager's recovery actions,
  hosted by the bundle's ``service_runner.exe`` (:mod:`tiktrue.service.windows_service`).

The node logs to its own rotated file, ``<data>/logs/node.log``; the service adds no log of its
own beyond what the OS's manager keeps (the journal; the Windows event log).
Every call into the OS goes through ``run`` (systemd) or :class:`ScmApi` (Windows), so the logic
is tested on any PC; the Windows half was written to pywin32's documented API and has not run on
Windows here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tiktrue.paths import data_dir as default_data_dir
from tiktrue.paths import log_dir, run_file, write_text_atomic
from tiktrue.service.scm_api import STOP_TIMEOUT_S, ScmApi

UNIT_NAME = "tiktrue-node.service"
WINDOWS_SERVICE_NAME = "TiktrueWorkerService"
WINDOWS_SERVICE_ARG = "--windows-service"  # service_runner.exe: started by the service manager
DISPLAY_NAME = "TikTrue node"
DESCRIPTION = "TikTrue node service: this PC's part of the LAN's language model."
DEFAULT_API_PORT = 8000  # the gateway and web UI that `tiktrue app` opens (its --port default)
RESTART_DELAY_S = 5  # after a crash, before the manager starts the node again
SYSTEMCTL_TIMEOUT_S = STOP_TIMEOUT_S + 30  # `systemctl stop` waits for the node to stop
# Windows' recovery actions: restart after 5 s, 10 s, then every 30 s; the count of failures
# starts again after a day without one
WINDOWS_RESTART_DELAYS_S = (5, 10, 30)
WINDOWS_FAILURE_RESET_S = 24 * 3600


class ServiceError(Exception):
    """The service cannot be installed, changed or found; the message says why, plainly."""


@dataclass(frozen=True)
class NodeOptions:
    """What the installed node is started with (``tiktrue node``'s options that a service
    takes; the rest keep their defaults)."""

    host: str | None = None
    control_port: int | None = None
    api_host: str | None = None
    api_port: int | None = DEFAULT_API_PORT

    def as_args(self) -> list[str]:
        """``tiktrue node`` arguments: only the options given (a node default stays one)."""
        args: list[str] = []
        for flag, value in (
            ("--host", self.host),
            ("--control-port", self.control_port),
            ("--api-host", self.api_host),
            ("--api-port", self.api_port),
        ):
            if value is not None:
                args += [flag, str(value)]
        return args

    def as_kwargs(self) -> dict[str, Any]:
        """``NodeService`` keyword arguments (the Windows service runs the node in-process)."""
        given = {
            "host": self.host,
            "control_port": self.control_port,
            "api_host": self.api_host,
            "api_port": self.api_port,
        }
        kwargs = {key: value for key, value in given.items() if value is not None}
        kwargs.setdefault("control_port", 7470)  # as `tiktrue node`
        kwargs["web_ui"] = kwargs.get("api_port") is not None
        return kwargs


@dataclass(frozen=True)
class ServiceSpec:
    data_dir: Path
    options: NodeOptions = field(default_factory=NodeOptions)
    run_as: str | None = None  # systemd, system-wide: the account the node runs as


@dataclass
class ServiceStatus:
    """What ``tiktrue service status`` says."""

    name: str
    manager: str
    installed: bool
    state: str = "not installed"  # running, starting, stopping, stopped, failed, ...
    pid: int | None = None
    at_boot: bool = False
    command: list[str] = field(default_factory=list)
    data_dir: Path | None = None
    manager_log: str | None = None  # where the OS keeps the service's own messages

    @property
    def running(self) -> bool:
        return self.state in ("running", "starting")

    def node_log(self) -> Path | None:
        return log_dir(self.data_dir) / "node.log" if self.data_dir else None


def node_command(args: list[str]) -> list[str]:
    """The command line that runs ``tiktrue node ARGS`` with this installation: the bundle's
    ``service_runner`` (PyInstaller), else this Python with ``-m tiktrue node``."""
    if getattr(sys, "frozen", False):
        name = "service_runner.exe" if sys.platform == "win32" else "service_runner"
        return [str(Path(sys.executable).resolve().parent / name), *args]
    return [sys.executable, "-m", "tiktrue", "node", *args]


class ServiceManager(ABC):
    """This PC's node service, as the OS runs it."""

    name: str

    @abstractmethod
    def install(self, spec: ServiceSpec) -> None:
        """Register the node, start it at every boot, restart it after a crash, start it now."""

    @abstractmethod
    def uninstall(self) -> None:
        """Stop the node and remove the service (the data dir stays)."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def status(self) -> ServiceStatus: ...


# --- Linux: systemd ------------------------------------------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess]


def systemd_running() -> bool:
    """sd_booted(): systemd is this PC's init (it made /run/systemd/system)."""
    return Path("/run/systemd/system").is_dir()


def _systemd_quote(arg: str, *, dollar: bool = True) -> str:
    """One word of a unit line, as systemd reads it: '%' doubled (a specifier otherwise), '$'
    doubled where it would expand (ExecStart=, not Environment=); quoted with backslash escapes
    when it holds spaces, quotes or backslashes."""
    arg = arg.replace("%", "%%")
    if dollar:
        arg = arg.replace("$", "$$")
    if arg and not any(c in arg for c in " \t\"'\\;"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(spec: ServiceSpec, command: list[str], *, user_scope: bool = False) -> str:
    """The unit file: after the network is up, restarted on failure, stopped with SIGTERM
    (the node saves and closes in a few seconds), stdout/stderr to the journal only."""
    env = {"TIKTRUE_HOME": str(spec.data_dir), "PYTHONUNBUFFERED": "1"}
    lines = [
        "# Written by `tiktrue service install`; `tiktrue service uninstall` removes it.",
        "[Unit]",
        f"Description={DISPLAY_NAME} (one language model across the PCs of the LAN)",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=exec",
    ]
    if spec.run_as and not user_scope:
        lines.append(f"User={spec.run_as}")
    lines += [f"Environment={_systemd_quote(f'{k}={v}', dollar=False)}" for k, v in env.items()]
    lines += [
        "ExecStart=" + " ".join(_systemd_quote(word) for word in command),
        "Restart=on-failure",
        f"RestartSec={RESTART_DELAY_S}",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        "",
        "[Install]",
        f"WantedBy={'default.target' if user_scope else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


def _unquote(line: str, *, dollar: bool = True) -> list[str]:
    """The words of a unit line written with :func:`_systemd_quote`."""
    words = shlex.split(line, posix=True)
    if dollar:
        words = [w.replace("$$", "$") for w in words]
    return [w.replace("%%", "%") for w in words]


class SystemdManager(ServiceManager):
    def __init__(
        self,
        *,
        user_scope: bool = False,
        run: Runner = subprocess.run,
        unit_dir: Path | None = None,
    ) -> None:
        self.user_scope = user_scope
        self.name = UNIT_NAME
        self._run = run
        if unit_dir is None:
            unit_dir = (
                Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd/user"
                if user_scope
                else Path("/etc/systemd/system")
            )
        self.unit_path = Path(unit_dir) / UNIT_NAME

    @property
    def manager(self) -> str:
        return "systemd (--user)" if self.user_scope else "systemd (system-wide)"

    def _systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = ["systemctl", *(["--user"] if self.user_scope else []), *args]
        try:
            done = self._run(command, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S)
        except FileNotFoundError:
            raise ServiceError("systemctl is not on this PC: systemd is needed") from None
        except subprocess.TimeoutExpired:
            raise ServiceError(f"`{' '.join(command)}` did not answer in time") from None
        if check and done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()
            raise ServiceError(
                f"`{' '.join(command)}` failed: {why[-1] if why else done.returncode}"
            )
        return done

    def install(self, spec: ServiceSpec) -> None:
        if not self.user_scope and os.geteuid() != 0:
            raise ServiceError(
                "a system-wide service needs root: run it with sudo, or install it for "
                "yourself with --user"
            )
        command = node_command(spec.options.as_args())
        self.unit_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.unit_path, systemd_unit(spec, command, user_scope=self.user_scope))
        self._systemctl("daemon-reload")
        # --no-block: the start waits for network-online.target, which may take long (a
        # minute or two on a PC whose network comes up late); wait_until_serving watches it
        self._systemctl("enable", "--now", "--no-block", UNIT_NAME)

    def uninstall(self) -> None:
        if not self.unit_path.is_file():
            raise ServiceError(f"{UNIT_NAME} is not installed ({self.unit_path} is absent)")
        self._systemctl("disable", "--now", UNIT_NAME, check=False)
        self.unit_path.unlink()
        self._systemctl("daemon-reload")
        self._systemctl("reset-failed", UNIT_NAME, check=False)

    def start(self) -> None:
        self._require_installed()
        self._systemctl("start", "--no-block", UNIT_NAME)

    def stop(self) -> None:
        self._require_installed()
        self._systemctl("stop", UNIT_NAME)

    def _require_installed(self) -> None:
        if not self.unit_path.is_file():
            raise ServiceError(f"{UNIT_NAME} is not installed: tiktrue service install")

    def status(self) -> ServiceStatus:
        status = ServiceStatus(self.name, self.manager, installed=self.unit_path.is_file())
        if not status.installed:
            return status
        for line in self.unit_path.read_text("utf-8").splitlines():
            if line.startswith("ExecStart="):
                status.command = _unquote(line.removeprefix("ExecStart="))
            elif line.startswith("Environment="):
                word = _unquote(line.removeprefix("Environment="), dollar=False)[0]
                key, _, value = word.partition("=")
                if key == "TIKTRUE_HOME":
                    status.data_dir = Path(value)
        journal = "journalctl" + (" --user" if self.user_scope else "")
        status.manager_log = f"{journal} -u {UNIT_NAME}"
        shown = self._systemctl(
            "show", UNIT_NAME, "--property=ActiveState,SubState,MainPID,UnitFileState", check=False
        )
        props = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
        status.state = _systemd_state(props.get("ActiveState", ""), props.get("SubState", ""))
        if status.state == "stopped":  # a start queued behind network-online.target
            jobs = self._systemctl("list-jobs", "--no-legend", UNIT_NAME, check=False)
            if jobs.stdout.strip():
                status.state = "starting"
        pid = int(props.get("MainPID") or 0)
        status.pid = pid or None
        status.at_boot = props.get("UnitFileState") == "enabled"
        return status


def _systemd_state(active: str, sub: str) -> str:
    if active == "active":
        return "running"
    if active == "activating":
        return "starting" if sub != "auto-restart" else "restarting after a failure"
    if active == "deactivating":
        return "stopping"
    if active == "failed":
        return "failed"
    return "stopped" if active == "inactive" else (active or "unknown")


# --- Windows: the service manager (SCM) through pywin32 ------------------------------------------


class WindowsManager(ServiceManager):
    def __init__(self, scm: ScmApi | None = None) -> None:
        self.name = WINDOWS_SERVICE_NAME
        self._scm = scm

    @property
    def scm(self) -> ScmApi:
        if self._scm is None:
            from tiktrue.service.windows_scm import Pywin32Scm

            self._scm = Pywin32Scm()
        return self._scm

    @staticmethod
    def host_command() -> tuple[str, str]:
        """The executable the service manager starts, and its arguments."""
        if getattr(sys, "frozen", False):
            return node_command([])[0], WINDOWS_SERVICE_ARG
        if sys.prefix != sys.base_prefix:
            # a venv's python.exe is a launcher that starts the real one as a child: the
            # service manager would watch the launcher, which cannot host the service
            raise ServiceError(
                "the Windows service runs from the installer's bundle (TikTrueSetup.exe) or a "
                "Python outside a virtual environment, not from a venv"
            )
        return sys.executable, "-m tiktrue.service.windows_service"

    def install(self, spec: ServiceSpec) -> None:
        exe, args = self.host_command()
        if self.scm.query(self.name) is not None:
            raise ServiceError(f"{self.name} is installed already: tiktrue service uninstall first")
        self.scm.install(self.name, DISPLAY_NAME, DESCRIPTION, exe, args)
        self.scm.set_option(self.name, "data_dir", str(spec.data_dir))
        self.scm.set_option(self.name, "node_options", json.dumps(asdict(spec.options)))
        self.scm.set_recovery(self.name, WINDOWS_RESTART_DELAYS_S, WINDOWS_FAILURE_RESET_S)
        self.scm.start(self.name)

    def uninstall(self) -> None:
        state = self.scm.query(self.name)
        if state is None:
            raise ServiceError(f"{self.name} is not installed")
        if state["state"] != "stopped":
            self.scm.stop(self.name)
        self.scm.remove(self.name)

    def start(self) -> None:
        self._require_installed()
        self.scm.start(self.name)

    def stop(self) -> None:
        self._require_installed()
        self.scm.stop(self.name)

    def _require_installed(self) -> None:
        if self.scm.query(self.name) is None:
            raise ServiceError(f"{self.name} is not installed: tiktrue service install")

    def status(self) -> ServiceStatus:
        status = ServiceStatus(self.name, "Windows service manager", installed=False)
        found = self.scm.query(self.name)
        if found is None:
            return status
        status.installed = True
        status.state, status.pid = found["state"], found.get("pid") or None
        status.at_boot = bool(found.get("auto_start"))
        status.command = found.get("command") or []
        data = self.scm.get_option(self.name, "data_dir")
        status.data_dir = Path(data) if data else None
        status.manager_log = f"Event Viewer > Windows Logs > Application, source {self.name}"
        return status

    def options(self) -> tuple[Path, NodeOptions]:
        """The data dir and node options the service was installed with (read by its host)."""
        data = self.scm.get_option(self.name, "data_dir")
        if not data:
            raise ServiceError(f"{self.name} has no data dir: install it again")
        saved = json.loads(self.scm.get_option(self.name, "node_options") or "{}")
        return Path(data), NodeOptions(**saved)


# --- the node it runs ---------------------------------------------------------------------------


def running_node(data_dir: Path) -> dict | None:
    """What the node running from ``data_dir`` says of itself (``<data>/run/node.json``: pid,
    node id, control channel, API, UI, networks), if it runs."""
    try:
        info = json.loads(run_file(data_dir).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    pid = int(info.get("pid") or 0)
    return info if pid and psutil.pid_exists(pid) else None


def wait_until_serving(manager: ServiceManager, *, timeout: float, poll_s: float = 0.5) -> dict:
    """Wait until the service's node listens; what it says of itself. A service that fails or
    stops meanwhile is reported with where its log is."""
    deadline = time.monotonic() + timeout
    while True:
        status = manager.status()
        node = running_node(status.data_dir) if status.data_dir else None
        if status.state == "running" and node is not None:
            return node
        if status.state in ("failed", "stopped", "not installed"):
            raise ServiceError(
                f"{status.name} is {status.state}: see {status.node_log()} and {status.manager_log}"
            )
        if time.monotonic() > deadline:
            raise ServiceError(
                f"{status.name} did not start listening in {timeout:.0f} s ({status.state}): "
                f"see {status.node_log()}"
            )
        time.sleep(poll_s)


# --- choosing ------------------------------------------------------------------------------------


def service_manager(*, user_scope: bool = False) -> ServiceManager:
    """This OS's service manager (``user_scope``: systemd's per-user instance)."""
    if sys.platform == "win32":
        if user_scope:
            raise ServiceError("--user is for Linux; on Windows the service is system-wide")
        return WindowsManager()
    if sys.platform.startswith("linux"):
        if not systemd_running():
            raise ServiceError(
                "systemd does not run on this PC (it is not PID 1), so there is no service "
                "manager to install into: run the node with `tiktrue node`"
            )
        return SystemdManager(user_scope=user_scope)
    raise ServiceError(f"no service manager for {sys.platform}: run the node with `tiktrue node`")


def installed_service() -> ServiceStatus | None:
    """The node service installed on this PC (the user's own first), if any; never raises."""
    scopes = (True, False) if sys.platform.startswith("linux") else (False,)
    for user_scope in scopes:
        try:
            status = service_manager(user_scope=user_scope).status()
        except (ServiceError, OSError, ImportError):  # ImportError: Windows without pywin32
            return None
        if status.installed:
            return status
    return None


def default_spec(
    options: NodeOptions,
    *,
    data_dir: Path | None = None,
    run_as: str | None = None,
    user_scope: bool = False,
) -> ServiceSpec:
    """What ``tiktrue service install`` installs: the node runs as the person installing it
    (under sudo, the one who called sudo) with that person's data dir, unless told otherwise."""
    if sys.platform == "win32" or user_scope:
        return ServiceSpec(Path(data_dir or default_data_dir()), options)
    import pwd

    me = pwd.getpwuid(os.geteuid()).pw_name
    run_as = run_as or os.environ.get("SUDO_USER") or me
    try:
        account = pwd.getpwnam(run_as)
    except KeyError:
        raise ServiceError(f"no account {run_as!r} on this PC") from None
    if data_dir is None:
        if os.environ.get("TIKTRUE_HOME") or run_as == me:
            data_dir = default_data_dir()
        else:  # platformdirs' default for that account
            data_dir = Path(account.pw_dir) / ".local" / "share" / "tiktrue"
    return ServiceSpec(Path(data_dir).resolve(), options, run_as=run_as)
