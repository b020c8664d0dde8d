"""The OS service's logic on any PC: the systemd unit it writes (checked by systemd's own
``systemd-analyze verify``), what it asks of Windows' service manager (the calls isolated
behind ``ScmApi``; not run on Windows here), the host that runs the Windows service's node
(a real node, stopped from another thread), and ``tiktrue app`` finding the service's UI.
The real systemd round trip is tests/service/test_systemd_service.py."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tiktrue.paths import run_file
from tiktrue.service import os_service
from tiktrue.service.app_runner import service_ui
from tiktrue.service.os_service import (
    WINDOWS_SERVICE_ARG,
    NodeOptions,
    ScmApi,
    ServiceError,
    ServiceSpec,
    ServiceStatus,
    WindowsManager,
    running_node,
    systemd_unit,
)
from tiktrue.service.service_host import ServiceHost

ROOT = Path(__file__).resolve().parents[2]
ODD = '/srv/my data/100%/$HOME\'s "tiktrue"'  # spaces, a specifier, a variable, quotes


def test_unit_words_survive_systemd_quoting(tmp_path):
    spec = ServiceSpec(Path(ODD), NodeOptions(host="10.0.0.5"), run_as="alice")
    command = ["/opt/tik true/service_runner", "--host", "10.0.0.5", "--x", ODD]
    manager = os_service.SystemdManager(run=None, unit_dir=tmp_path)
    manager.unit_path.write_text(systemd_unit(spec, command))
    manager._systemctl = lambda *args, check=True: subprocess.CompletedProcess(args, 0, "", "")
    status = manager.status()
    assert status.command == command
    assert status.data_dir == Path(ODD)
    assert "User=alice" in manager.unit_path.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("user_scope", [False, True])
def test_systemd_analyze_verifies_the_unit(tmp_path, user_scope):
    spec = ServiceSpec(tmp_path / "data dir", NodeOptions(api_port=8000), run_as="root")
    unit = tmp_path / os_service.UNIT_NAME
    command = os_service.node_command(spec.options.as_args())
    unit.write_text(systemd_unit(spec, command, user_scope=user_scope))
    scope = ["--user"] if user_scope else []
    done = subprocess.run(
        ["systemd-analyze", *scope, "verify", str(unit)], capture_output=True, text=True
    )
    # verify also lints the units it pulls in (network-online.target's): only ours counts
    ours = [line for line in done.stderr.splitlines() if os_service.UNIT_NAME in line]
    assert not ours, done.stderr
    text = unit.read_text()
    assert "Restart=on-failure" in text and "After=network-online.target" in text
    assert ("WantedBy=default.target" in text) == user_scope
    assert ("User=root" in text) == (not user_scope)


def test_the_deploy_unit_is_the_one_the_command_writes():
    """deploy/systemd/tiktrue-node.service, for the bundle unpacked in /opt/tiktrue, is what
    `tiktrue service install` writes there: one definition of the unit."""
    spec = ServiceSpec(Path("/var/lib/tiktrue"), NodeOptions(), run_as="tiktrue")
    command = ["/opt/tiktrue/service_runner", *spec.options.as_args()]
    deployed = (ROOT / "deploy/systemd/tiktrue-node.service").read_text()
    assert deployed == systemd_unit(spec, command)


class MemoryScm(ScmApi):
    """Windows' service manager as a record of what was asked of it."""

    def __init__(self) -> None:
        self.services: dict[str, dict] = {}
        self.calls: list[tuple] = []

    def install(self, name, display, description, exe, args):
        self.calls.append(("install", name, exe, args))
        self.services[name] = {"state": "stopped", "options": {}, "command": [f'"{exe}" {args}']}

    def set_recovery(self, name, delays_s, reset_s):
        self.calls.append(("recovery", name, delays_s, reset_s))

    def set_option(self, name, option, value):
        self.services[name]["options"][option] = value

    def get_option(self, name, option):
        return self.services.get(name, {}).get("options", {}).get(option)

    def remove(self, name):
        self.calls.append(("remove", name))
        del self.services[name]

    def start(self, name):
        self.calls.append(("start", name))
        self.services[name]["state"] = "running"

    def stop(self, name):
        self.calls.append(("stop", name))
        self.services[name]["state"] = "stopped"

    def query(self, name):
        found = self.services.get(name)
        return None if found is None else {**found, "auto_start": True, "pid": 4242}


def test_windows_service_install_as_the_installer_runs_it(tmp_path, monkeypatch):
    bundle = tmp_path / "Program Files" / "TikTrue"
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(bundle / "tiktrue.exe"))
    monkeypatch.setattr(sys, "platform", "win32")
    scm = MemoryScm()
    manager = WindowsManager(scm)
    options = NodeOptions(host="192.168.1.10", control_port=7470)
    manager.install(ServiceSpec(tmp_path / "ProgramData" / "TikTrue", options))

    assert scm.calls[0] == (
        "install",
        "TiktrueWorkerService",
        str(bundle.resolve() / "service_runner.exe"),
        WINDOWS_SERVICE_ARG,
    )
    # `sc failure`: restart after 5 s, 10 s, 30 s; the count starts again after a day
    assert ("recovery", "TiktrueWorkerService", (5, 10, 30), 86400) in scm.calls
    assert scm.calls[-1] == ("start", "TiktrueWorkerService")
    data, saved = manager.options()  # what the service reads when it starts
    assert data == tmp_path / "ProgramData" / "TikTrue" and saved == options
    assert saved.as_kwargs() == {
        "host": "192.168.1.10",
        "control_port": 7470,
        "api_port": 8000,
        "web_ui": True,
    }
    status = manager.status()
    assert status.running and status.at_boot and status.data_dir == data
    assert status.node_log() == data / "logs" / "node.log"

    with pytest.raises(ServiceError, match="installed already"):
        manager.install(ServiceSpec(data, options))
    manager.uninstall()
    assert scm.calls[-2:] == [("stop", "TiktrueWorkerService"), ("remove", "TiktrueWorkerService")]
    assert not manager.status().installed
    with pytest.raises(ServiceError, match="not installed"):
        manager.start()


def test_windows_service_is_not_hosted_by_a_venv_launcher(monkeypatch):
    monkeypatch.delattr(sys, "frozen", raising=False)
    monkeypatch.setattr(sys, "base_prefix", "/somewhere/else")
    with pytest.raises(ServiceError, match="virtual environment"):
        WindowsManager(MemoryScm()).install(ServiceSpec(Path("x"), NodeOptions()))


def test_service_host_runs_a_node_until_stopped_from_another_thread(tmp_path):
    """What SvcDoRun/SvcStop do: the node runs in the service's thread, a stop request from
    the service manager's thread ends it cleanly (exit 0)."""
    host = ServiceHost(tmp_path, NodeOptions(control_port=0, api_port=0).as_kwargs())
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(host.run()))
    thread.start()
    try:
        import time

        deadline = time.monotonic() + 120
        while running_node(tmp_path) is None and thread.is_alive():
            assert time.monotonic() < deadline, "the node did not start"
            time.sleep(0.1)
        node = running_node(tmp_path)
        assert node is not None and node["ui"].startswith("http://127.0.0.1:")
    finally:
        host.stop()
        thread.join(60)
    assert result == [0]
    assert not run_file(tmp_path).exists()  # stopped cleanly


def test_service_host_reports_a_node_that_cannot_start(tmp_path):
    """A failure is exit status 1, which SvcDoRun turns into a stop with an error: Windows'
    recovery actions start it again."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        host = ServiceHost(
            tmp_path, NodeOptions(host="127.0.0.1", control_port=port, api_port=None).as_kwargs()
        )
        assert host.run() == 1


def _status(tmp_path, state: str) -> ServiceStatus:
    return ServiceStatus("tiktrue-node.service", "systemd", True, state, data_dir=tmp_path)


def test_app_opens_the_ui_of_the_installed_service(tmp_path):
    assert service_ui(lambda: None) is None  # nothing installed: the app runs its own node
    with pytest.raises(ServiceError, match="is stopped: start it"):
        service_ui(lambda: _status(tmp_path, "stopped"))
    # starting (after a boot): the app waits until the node says where its UI is
    calls = []

    def starting():
        calls.append(1)
        if len(calls) == 2:
            run_file(tmp_path).parent.mkdir(parents=True, exist_ok=True)
            run_file(tmp_path).write_text(
                f'{{"pid": {_own_pid()}, "ui": "http://192.168.1.10:8000/"}}'
            )
        return _status(tmp_path, "starting")

    assert service_ui(starting, log=lambda _: None) == "http://192.168.1.10:8000/"


def _own_pid() -> int:
    import os

    return os.getpid()


def test_bundle_executables_run_their_command(monkeypatch, capsys):
    """The bundle's service_runner is `tiktrue node`, its main_app `tiktrue app`."""
    from tiktrue.cli import bundle_main

    for command, name, expected in (
        ("node", "service_runner", "--control-port"),
        ("app", "main_app", "--browser"),
    ):
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as done:
            bundle_main(command)
        assert done.value.code == 0
        assert expected in capsys.readouterr().out


def test_installer_script_names_what_the_code_has():
    """Inno Setup's compiler runs on Windows only: here, the script is held to the names and
    numbers of the code it installs (executables of the spec, the service's commands, the
    node's default ports, the data dir the service is given)."""
    from tiktrue.cli import node as node_command

    script = (ROOT / "deploy/windows/tiktrue.iss").read_text()
    spec = (ROOT / "deploy/pyinstaller/tiktrue.spec").read_text()
    for exe in ("tiktrue", "service_runner", "main_app"):
        assert f'"{exe}": HERE / "entry_{exe}.py"' in spec
        assert f"{{app}}\\{exe}.exe" in script
    assert "RunTiktrue('service install --data-dir" in script
    assert 'Parameters: "service uninstall"' in script
    defaults = {p.default.param_decls[0]: p.default.default for p in _params(node_command)}
    assert f'#define ControlPort "{defaults["--control-port"]}"' in script
    assert f'#define GatewayPort "{os_service.DEFAULT_API_PORT}"' in script
    # two rules: deleted before they are added (an upgrade) and at uninstall
    assert script.count("advfirewall firewall delete rule") == 4


def _params(function):
    import inspect

    return [p for p in inspect.signature(function).parameters.values() if p.default.param_decls]
