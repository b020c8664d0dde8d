"""``tiktrue service`` under a real systemd (PID 1 of a container booted from this machine's
OS tree, tests/helpers/systemd_container.py): install, a crash, a reboot, the app attaching,
uninstall. Skips, saying why, where no container can boot (not root, no systemd-nspawn, a CI
container without the privileges to boot one); never hangs (the container's ceiling)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.helpers.systemd_container import SystemdContainer, booted_or_skip
from tiktrue.service.os_service import UNIT_NAME

pytestmark = pytest.mark.integration

DATA = "/var/lib/tiktrue"  # the node's data dir inside (bound from the test's tmp dir)
API_PORT, CONTROL_PORT = 18000, 17470  # the container has its own loopback: no clash


NODE_START_S = 180.0  # a ceiling for the node to come back after a boot (it imports torch)


@pytest.fixture
def container(tmp_path):
    with booted_or_skip(tmp_path, binds={DATA: tmp_path / "data"}) as box:
        yield box


def tiktrue(box: SystemdContainer, *args: str, **kwargs):
    return box.run([sys.executable, "-m", "tiktrue", *args], env={"TIKTRUE_HOME": DATA}, **kwargs)


def health(box: SystemdContainer) -> dict:
    return box.get_json(f"http://127.0.0.1:{API_PORT}/health")


def main_pid(box: SystemdContainer) -> int:
    shown = box.run(["systemctl", "show", UNIT_NAME, "--property=MainPID", "--value"])
    return int(shown.stdout.strip())


def test_installed_node_survives_a_crash_and_a_reboot_and_the_app_opens_it(container, tmp_path):
    installed = tiktrue(
        container,
        "service",
        "install",
        "--api-port",
        str(API_PORT),
        "--control-port",
        str(CONTROL_PORT),
    )
    assert "starts at boot, restarts after a crash" in installed.stdout
    assert f"web UI    http://127.0.0.1:{API_PORT}/" in installed.stdout
    assert health(container)["status"] == "ok"
    node_id = json.loads((tmp_path / "data/run/node.json").read_text())["node_id"]

    status = json.loads(tiktrue(container, "service", "status", "--json").stdout)
    assert status["state"] == "running" and status["starts_at_boot"]
    assert status["data_dir"] == DATA and status["log"] == f"{DATA}/logs/node.log"
    assert status["node"]["control"] == f"127.0.0.1:{CONTROL_PORT}"
    assert status["command"][:4] == [sys.executable, "-m", "tiktrue", "node"]

    # a crash: systemd starts the node again (RestartSec=5) and it answers as the same node
    first = main_pid(container)
    container.run(["kill", "-9", str(first)])
    tiktrue(container, "service", "start")  # waits until it listens (the restart or this)
    assert main_pid(container) not in (0, first)
    assert health(container)["status"] == "ok"

    # a reboot: every unit stops, the PC starts again; nobody runs a command
    container.poweroff()
    container.boot()
    rebooted = json.loads(tiktrue(container, "service", "status", "--json").stdout)
    deadline = time.monotonic() + NODE_START_S
    while rebooted["node"] is None and time.monotonic() < deadline:  # the node imports torch
        container.run(["sleep", "1"])
        rebooted = json.loads(tiktrue(container, "service", "status", "--json").stdout)
    assert rebooted["state"] == "running" and rebooted["node"]["node_id"] == node_id
    assert health(container)["status"] == "ok"

    # `tiktrue app` from another data dir opens the service's UI instead of starting a node
    opened = container.run(
        [sys.executable, "-m", "tiktrue", "app", "--browser"],
        env={"TIKTRUE_HOME": "/root/elsewhere", "BROWSER": "echo"},
    )
    assert f"TikTrue runs on this PC: http://127.0.0.1:{API_PORT}/" in opened.stderr
    assert f"http://127.0.0.1:{API_PORT}/" in opened.stdout  # what the "browser" was given
    assert rebooted["pid"] == main_pid(container)  # the service's node, no other

    removed = tiktrue(container, "service", "uninstall")
    assert f"the data stays in {DATA}" in removed.stdout
    assert not (tmp_path / "units" / UNIT_NAME).exists()
    gone = tiktrue(container, "service", "status", check=False)
    assert gone.returncode == 3 and "not installed" in gone.stdout
    assert (tmp_path / "data/identity").is_dir()  # the node's identity and data stay
