"""The PyInstaller bundle's own executables, with no Python of ours: the command line and its
help, the journey's first steps (import the demo model, run a node with ``service_runner``,
create a network, answer a chat, a report with charts), the web UI in Persian in a real
browser, and the node as a systemd service running the bundle's ``service_runner`` (in a
container booted under systemd, tests/helpers/systemd_container.py).

Run by ``make bundle-test`` after ``make bundle`` (TIKTRUE_BUNDLE=dist/tiktrue); skipped in
``make test``, which builds no bundle. The node listens on loopback (``--local``): a test's
node is never announced on the LAN of the machine that runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.helpers.browser import CHROMIUM_ARGS, WAIT_MS, browser_problem, chromium_path
from tests.helpers.systemd_container import booted_or_skip
from tiktrue.model.demo_model import GGUF_NAME
from tiktrue.paths import run_file
from tiktrue.service.os_service import UNIT_NAME, systemd_running

pytestmark = pytest.mark.integration
BUNDLE = os.environ.get("TIKTRUE_BUNDLE")
START_TIMEOUT_S = 180.0  # a ceiling for the node's start (torch's import, a busy machine)
COMMAND_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def bundle() -> Path:
    if not BUNDLE:
        pytest.skip("no bundle given: `make bundle-test` builds one and runs this")
    path = Path(BUNDLE).resolve()
    assert (path / "tiktrue").is_file(), f"{path} holds no bundle: make bundle"
    return path


@pytest.fixture(scope="module")
def demo_gguf(demo_store) -> Path:
    """The demo's GGUF file, as `make demo` fetches it (cached beside the demo_store)."""
    cache = Path(os.environ.get("TIKTRUE_TEST_CACHE", Path.home() / ".cache" / "tiktrue-tests"))
    path = cache / "cache" / "demo" / GGUF_NAME
    assert path.is_file()
    return path


class BundleCommands:
    """The bundle's executables, run with one data dir and none of this Python's paths."""

    def __init__(self, bundle: Path, home: Path) -> None:
        self.bundle, self.home = bundle, home
        self.env = {**os.environ, "TIKTRUE_HOME": str(home)}
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            self.env.pop(name, None)

    def __call__(
        self, *args: str, exe: str = "tiktrue", check: bool = True, **kwargs
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(self.bundle / exe), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            **kwargs,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{exe} {args} failed ({done.returncode}):\n{done.stderr}")
        return done


@pytest.fixture(scope="module")
def bundle_node(bundle, demo_gguf, tmp_path_factory):
    """The demo model imported by the bundle's ``tiktrue``, a node run by its
    ``service_runner`` on loopback, a network of that one node serving the model."""
    tmp = tmp_path_factory.mktemp("bundle")
    home = tmp / "home"
    tiktrue = BundleCommands(bundle, home)
    imported = tiktrue("models", "import", str(demo_gguf), "--id", "smollm2").stdout
    assert "imported smollm2: llama, 30 layers" in imported

    log_path = tmp / "node.log"
    with log_path.open("wb") as log:
        node = subprocess.Popen(
            [str(bundle / "service_runner"), "--local", "--control-port", "0", "--api-port", "0"],
            env=tiktrue.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not run_file(home).is_file():
            assert node.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the bundle's node did not start"
            time.sleep(0.2)
        info = json.loads(run_file(home).read_text())
        api = info["api"]
        assert info["control"].startswith("127.0.0.1:"), info  # --local: loopback only
        tiktrue("network", "create", "Office", "--model", "smollm2")
        # the network is served once its block server runs
        while not all(httpx.get(api.removesuffix("/v1") + "/health").json()["healthy"].values()):
            assert node.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the network did not come up"
            time.sleep(0.5)
        yield SimpleNamespace(tiktrue=tiktrue, api=api, ui=info["ui"], log=log_path)
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(60) == 0, log_path.read_text()[-3000:]  # the service stops cleanly


def test_the_bundles_commands_run(bundle, tmp_path):
    tiktrue = BundleCommands(bundle, tmp_path / "home")
    assert tiktrue("--version").stdout.strip() == "0.1.0"
    app_help = tiktrue("app", "--help").stdout
    assert "Usage: tiktrue app" in app_help and "--local" in app_help
    assert "Usage: main_app app" in tiktrue("--help", exe="main_app").stdout
    assert "Usage: service_runner node" in tiktrue("--help", exe="service_runner").stdout
    status = tiktrue("service", "status", check=False)
    if systemd_running():  # a PC booted by systemd, without the service
        assert status.returncode == 3 and "not installed" in status.stdout, status
    else:  # this machine: no service manager to ask, said plainly (no traceback)
        assert status.returncode == 1, status
        assert "systemd does not run on this PC" in status.stderr
        assert "Traceback" not in status.stderr


def test_the_bundle_imports_the_demo_model_runs_a_node_and_answers(bundle_node):
    tiktrue = bundle_node.tiktrue
    answered = tiktrue(
        "chat",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        input="What is the capital of France?\n/exit\n",
    )
    answer = answered.stdout.split("model> ", 1)[1].split("\nyou> ", 1)[0].strip()
    assert len(answer.split()) >= 3, answered.stdout  # words from the model
    assert "error" not in answered.stdout
    models = httpx.get(f"{bundle_node.api}/models").json()["data"]
    assert [m["id"] for m in models] == ["smollm2"]
    # the node's Prometheus metrics (prometheus_client), counting the answer
    metrics = httpx.get(bundle_node.api.removesuffix("/v1") + "/metrics").text
    generated = re.search(
        r'^tiktrue_generation_tokens_total\{[^}]*model="smollm2"[^}]*\} (\S+)$', metrics, re.M
    )
    assert generated and float(generated[1]) > 0, metrics[:2000]
    # the report's charts (pygal reads its stylesheets from its package data)
    report = tiktrue("report", "--since", "1h", "--format", "html").stdout
    assert "Generated tokens per network" in report and "<svg" in report


PAGE_FONTS = """async () => {
  await document.fonts.ready;
  return [...document.fonts].filter(f => f.family.includes('Vazirmatn')).map(f => f.status);
}"""


def test_the_bundle_serves_the_ui_in_persian(bundle_node):
    """A browser asking for Persian gets the first run in Persian, right-to-left, in the
    bundled font, and a chat answer's figures in Persian digits and separators: the bundle
    holds the compiled catalog, the font and Babel's Persian data."""
    problem = browser_problem()
    if problem:
        pytest.skip(f"the browser check needs chromium: {problem}")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_context(locale="fa-IR").new_page()  # Accept-Language: fa-IR
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            page.goto(bundle_node.ui)
            expect(page.get_by_text("به TikTrue خوش آمدید")).to_be_visible()
            html = page.locator("html")
            expect(html).to_have_attribute("lang", "fa-IR")
            expect(html).to_have_attribute("dir", "rtl")
            assert "loaded" in page.evaluate(PAGE_FONTS)  # Vazirmatn, from the bundle

            page.get_by_label("نام حساب").fill("مدیر")  # the first account: the admin
            page.get_by_label("رمز عبور", exact=True).fill("correct horse")
            page.get_by_label("تکرار رمز عبور").fill("correct horse")
            page.get_by_role("button", name="ساخت حساب مدیر").click()
            expect(page.get_by_text("چه کمکی از من برمی‌آید؟")).to_be_visible()  # the chat
            page.get_by_label("پیام", exact=True).fill("سلام! پایتخت فرانسه کجاست؟")
            page.get_by_label("پیام", exact=True).press("Enter")
            # the answer's figures: Persian digits, and Babel's Persian decimal separator
            expect(page.get_by_text(re.compile(r"[۰-۹]+٫[۰-۹] توکن بر ثانیه"))).to_be_visible()
            expect(page.locator(".tt-answer").last).not_to_be_empty()
        finally:
            browser.close()


DATA = "/var/lib/tiktrue"  # the service's data dir inside the container
OPT = "/opt/tiktrue"  # the bundle, unpacked there (bound read-only)
API_PORT, CONTROL_PORT = 18000, 17470  # the container has its own loopback: no clash


def test_the_bundle_runs_as_a_systemd_service(bundle, tmp_path):
    """``tiktrue service install`` from the bundle: systemd runs the bundle's
    ``service_runner``, starts it again after a crash; uninstall keeps the data."""
    with booted_or_skip(tmp_path, binds={DATA: tmp_path / "data"}, read_only={OPT: bundle}) as box:

        def tiktrue(*args: str, check: bool = True):
            return box.run([f"{OPT}/tiktrue", *args], env={"TIKTRUE_HOME": DATA}, check=check)

        installed = tiktrue(
            "service", "install", "--api-port", str(API_PORT), "--control-port", str(CONTROL_PORT)
        )
        assert "starts at boot, restarts after a crash" in installed.stdout
        assert f"web UI    http://127.0.0.1:{API_PORT}/" in installed.stdout
        status = json.loads(tiktrue("service", "status", "--json").stdout)
        assert status["state"] == "running" and status["starts_at_boot"], status
        assert status["command"][0] == f"{OPT}/service_runner", status
        assert status["data_dir"] == DATA and status["log"] == f"{DATA}/logs/node.log"
        assert box.get_json(f"http://127.0.0.1:{API_PORT}/health")["status"] == "ok"

        first = status["pid"]
        box.run(["kill", "-9", str(first)])  # a crash: systemd starts service_runner again
        tiktrue("service", "start")  # waits until it listens (the restart or this)
        again = json.loads(tiktrue("service", "status", "--json").stdout)
        assert again["state"] == "running" and again["pid"] not in (None, first), again
        assert box.get_json(f"http://127.0.0.1:{API_PORT}/health")["status"] == "ok"

        assert f"the data stays in {DATA}" in tiktrue("service", "uninstall").stdout
        assert not (tmp_path / "units" / UNIT_NAME).exists()
        assert (tmp_path / "data" / "identity").is_dir()
