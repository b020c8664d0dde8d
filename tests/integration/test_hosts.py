"""Hosts of our own: three PCs in network namespaces on a bridge, each running ``tiktrue node``
with no ``--host``, as a user starts it. Each takes its LAN address and is found there; a
network is created, discovered and joined by token, planned and applied; another PC chats
with the admin's gateway over HTTPS (nothing answers in clear on the LAN); a PC is unplugged
and the chat goes on. Skipped, saying why, where namespaces cannot be made (not root, no
``ip``). Addresses: only the test's own 10.77.0.0/24, inside its namespaces."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import warnings
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.helpers.browser import CHROMIUM_ARGS, WAIT_MS, browser_problem, chromium_path
from tests.helpers.cluster import api_key
from tests.helpers.netns import VirtualLan, lan_problem
from tests.helpers.network import import_model_from_store, wait_until
from tiktrue.paths import run_file
from tiktrue.security.gateway_tls import fingerprint
from tiktrue.security.node_tls import node_identity

pytestmark = pytest.mark.integration
NET = "office"
API_PORT = 8000  # each host has its own ports: the defaults, as on real PCs
CONTROL_PORT = 7470


@pytest.fixture
def lan():
    problem = lan_problem()
    if problem:
        pytest.skip(f"no hosts of our own here: {problem}")
    with VirtualLan(3) as made:
        yield made


class Hosts:
    """A node process per host of ``lan``, each with its home; the first runs the gateway."""

    def __init__(self, lan: VirtualLan, homes) -> None:
        self.lan, self.homes = lan, homes
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        for i, home in enumerate(self.homes):
            args = ["-m", "tiktrue", "node", "--kv-budget-mb", "16", "-v"]
            args += ["--api-port", str(API_PORT)] if i == 0 else []
            log = (home / "node.log").open("ab")
            self.processes.append(
                self.lan.popen(
                    i, *args, env=self.env(i, GOMP_SPINCOUNT="30000"), stdout=log, stderr=log
                )
            )
        for home, process in zip(self.homes, self.processes, strict=True):
            wait_until(
                lambda h=home, p=process: run_file(h).is_file() or p.poll() is not None,
                f"the node in {home.name} to listen",
            )
            assert process.poll() is None, (home / "node.log").read_text()[-3000:]

    def env(self, i: int, **more: str) -> dict:
        return {"TIKTRUE_HOME": str(self.homes[i]), **more}

    def cli(self, i: int, *args: str, stdin: str | None = None) -> str:
        done = self.lan.run(i, "-m", "tiktrue", *args, env=self.env(i), input=stdin)
        assert done.returncode == 0, f"tiktrue {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def client(self, i: int, *args: str) -> dict:
        done = self.lan.run(i, "-m", "tests.helpers.lan_client", *args, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _browse(lan: VirtualLan, i: int, base: str, admin_home, tmp_path) -> None:
    """Chromium on host ``i`` (its binary run through ``ip netns exec``), trusting the admin's
    key the way a browser that imported the network's CA trusts its certificate (an SPKI pin:
    no certificate store to edit here): ``/trust`` shows the CA's fingerprint and gives the CA;
    the login page is served over HTTPS and a login works; the dashboard says where other PCs
    reach the admin; ``http://`` on the same port gets no page."""
    if browser_problem():
        warnings.warn(f"browser part skipped: {browser_problem()}", stacklevel=1)
        return
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    spki = node_identity(admin_home).public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    wrapper = tmp_path / "chromium-on-host"
    wrapper.write_text(f'#!/bin/sh\nexec {" ".join(lan.command(i, chromium_path()))} "$@"\n')
    wrapper.chmod(0o755)
    ca = (admin_home / "networks" / NET / "ca_cert.pem").read_bytes()
    with sync_playwright() as playwright:
        args = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={pin}"]
        browser = playwright.chromium.launch(executable_path=str(wrapper), args=args)
        try:
            page = browser.new_context(accept_downloads=True).new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(f"{base}/trust")
            expect(page.locator('[data-reach="SHA-256 fingerprint"]')).to_have_text(fingerprint(ca))
            with page.expect_download() as download:
                page.get_by_label("Download the CA certificate").click()
            assert Path(download.value.path()).read_bytes() == ca
            page.goto(f"{base}/login")
            page.get_by_label("Account name").fill("tests")
            page.get_by_label("Password").fill("a long password")
            page.get_by_label("Log in").click()
            page.wait_for_url(f"{base}/chat")
            page.goto(f"{base}/admin")
            expect(page.locator('[data-reach="Web UI and API"]')).to_have_text(f"{base}/")
            with pytest.raises(PlaywrightError, match="ERR_EMPTY_RESPONSE|ERR_CONNECTION"):
                page.goto(base.replace("https://", "http://") + "/login")
        finally:
            browser.close()


def test_three_hosts_discover_join_chat_over_https_and_survive_an_unplugged_one(
    lan, tiny_llama, tmp_path
):
    homes = [tmp_path / f"pc{i + 1}" for i in range(3)]
    for home in homes:
        home.mkdir()
    import_model_from_store(tiny_llama.root, homes[0] / "models")
    hosts = Hosts(lan, homes)
    hosts.start()
    try:
        # no --host: every node listens on its host's LAN address
        for home, address in zip(homes, lan.addresses, strict=True):
            assert json.loads(run_file(home).read_text())["control"] == f"{address}:{CONTROL_PORT}"
        admin = lan.addresses[0]
        base = f"https://{admin}:{API_PORT}"
        where = json.loads(run_file(homes[0]).read_text())
        # other PCs: https on the LAN address; this PC's own programs: http on its loopback
        assert (where["lan_api"], where["api"]) == (f"{base}/v1", f"http://127.0.0.1:{API_PORT}/v1")

        hosts.cli(0, "network", "create", "Office", "--model", tiny_llama.model_id,
                  "--id", NET, "--manual-plan")  # fmt: skip

        # the second PC finds the admin on the LAN (mDNS over the bridge) and joins by token
        def found():
            listed = json.loads(hosts.cli(1, "network", "discover", "--json", "--timeout", "3"))
            return next((n for n in listed if NET in n["networks"]), None)

        seen = wait_until(found, "the network announced on the LAN", timeout=60, every=0)
        assert (seen["host"], seen["control_port"]) == (admin, CONTROL_PORT)
        assert seen["networks"][NET]["role"] == "admin"
        for i in (1, 2):
            token = hosts.cli(0, "network", "token", NET).split()[0]
            joined = hosts.cli(i, "network", "join", f"{admin}:{CONTROL_PORT}", "--token", token)
            assert f"joined network {NET}" in joined
        ids = [node_identity(h).node_id for h in homes]
        overrides = [
            a for n, c in zip(ids, (3, 3, 2), strict=True) for a in ("--override", f"{n}={c}")
        ]
        assert "now runs config v" in hosts.cli(0, "network", "apply", NET, *overrides)

        # another PC over HTTPS, trusting the network's CA (which it got when it joined)
        cafile = str(homes[1] / "networks" / NET / "ca_cert.pem")
        probe = hosts.client(1, "probe", base, cafile)
        assert probe["health"]["networks"] == {NET: tiny_llama.model_id}
        # nothing in clear on the LAN: no health, no login page, no API
        assert all(isinstance(v, str) for v in probe["clear"].values()), probe["clear"]
        key = api_key(homes[0])
        messages = [{"role": "user", "content": "Hello from the second PC"}]
        first = hosts.client(1, "chat", base, cafile, key, json.dumps(messages))
        assert first["text"], first
        # a person on that PC, in a real browser: the trust page, a login, the dashboard
        _browse(lan, 1, base, homes[0], tmp_path)
        # tiktrue chat from that PC: https, trusting its networks' CAs by default
        said = hosts.cli(1, "chat", "--url", f"{base}/v1", "--api-key", key, "--max-tokens",
                         "8", stdin="Hello again\n/exit\n")  # fmt: skip
        assert f"via {base}/v1" in said and "model> " in said

        # the third PC's cable is pulled: the admin finds it lost, and the chat goes on
        lan.unplug(2)
        messages += [{"role": "assistant", "content": first["text"]},
                     {"role": "user", "content": "And after the unplug?"}]  # fmt: skip
        later = hosts.client(1, "chat", base, cafile, key, json.dumps(messages),
                             "--until-answered", "180")  # fmt: skip
        assert later["text"], later
        events = (homes[0] / "logs" / "events.jsonl").read_text()
        assert ids[2] in events and "node_dead" in events
    finally:
        hosts.stop()
