"""The admin dashboard in a real browser, on real node processes, as an admin goes through it:
the nodes with their resources and health, a cap slider that changes the plan's verdict, a
join request approved, an API key created (shown once) and revoked. Screenshots of each page
at 1280x800 and at phone width go to build/screenshots/ (the README's: ``make screenshots``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from playwright.sync_api import expect

from tests.helpers.browser import shoot
from tests.helpers.network import control_address
from tiktrue.security.node_tls import node_identity
from tiktrue.security.users import UserStore
from tiktrue.service.local_network import LocalCluster

pytestmark = pytest.mark.integration
NET = "testnet"
PASSWORD = "the admin's password"


def log_in(page, base: str) -> None:
    page.goto(base + "/login?next=/admin")
    page.get_by_label("Account name").fill("boss")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("button", name="Nodes")).to_be_visible()


@contextmanager
def asking_to_join(admin_home, home):
    """A PC that asks to join the network and waits for approval, as `tiktrue network join
    ADMIN --network NET` does on it: its node starts and its request goes out in the
    background (the dashboard's first steps go on meanwhile); yields a future of the join
    command's (exit code, stdout, stderr)."""
    late = LocalCluster([home], kv_budget_mb=16, gateway=False, own_control_ports=False)
    admin_id = node_identity(admin_home).node_id

    def ask():
        late.start()
        done = subprocess.run(
            [
                *(sys.executable, "-m", "tiktrue", "network", "join", control_address(admin_home)),
                *("--network", NET, "--admin-node", admin_id, "--wait", "300"),
            ],
            env={**os.environ, "TIKTRUE_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=400,
        )
        return done.returncode, done.stdout, done.stderr

    with ThreadPoolExecutor(1) as pool:
        try:
            yield pool.submit(ask)
        finally:
            late.stop()


def test_an_admin_runs_the_network_from_the_dashboard(own_tiny_cluster, new_page, tmp_path):
    cluster, homes, _ = own_tiny_cluster
    UserStore(homes[0], rounds=4).add_user("boss", PASSWORD, "admin")
    base = cluster.api_url.removesuffix("/v1")
    with asking_to_join(homes[0], tmp_path / "late") as joined:
        page = new_page()
        log_in(page, base)

        # every PC of the network, with its resources and live health
        cards = page.locator(".tt-card[data-node]")
        expect(cards).to_have_count(3)
        for card in cards.all():
            expect(card.get_by_text(re.compile(r"GB free of .* GB")).first).to_be_visible()
            expect(card.get_by_text("online", exact=True)).to_be_visible()
        expect(page.get_by_text(re.compile(r"RTT \d+\.\d ms")).first).to_be_visible()

        # caps: every node down to the least RAM, and the verdict says what is missing
        page.get_by_role("button", name="Plan").click()
        verdict = page.get_by_test_id("verdict")
        expect(verdict).to_contain_text("fits:")
        shoot(page, "admin-plan")
        for slider in page.get_by_role("slider", name=re.compile("^RAM for")).all():
            height = slider.bounding_box()["height"]
            slider.click(position={"x": 1, "y": height / 2})  # the left end: the least RAM
        expect(verdict).to_contain_text("more RAM")
        expect(page.get_by_role("button", name="Apply")).to_be_disabled()

        # the caps as they are: apply the plan, and follow its job to the end
        page.reload()
        expect(verdict).to_contain_text("fits:")
        page.get_by_role("button", name="Apply").click()
        expect(page.get_by_text(re.compile(r"^done 100%$"))).to_be_visible()
        expect(page.get_by_text(re.compile(r"the network runs config v\d+")).first).to_be_visible()
        # the rebalancing card reads the history of this new plan: nothing measured yet
        page.get_by_role("button", name="Analyse the load").click()
        rebalanced = page.get_by_test_id("rebalance-verdict")
        expect(rebalanced).to_contain_text("decode steps per node")
        expect(page.get_by_role("button", name="Rebalance now")).to_be_disabled()

        # the PC asking to join is approved, and joins
        page.get_by_role("button", name="Nodes").click()
        approve = page.get_by_role("button", name=re.compile("^Approve"))
        expect(approve).to_be_visible()
        expect(cards).to_have_count(3)
        shoot(page, "admin-join-request")
        approve.click()
        expect(cards).to_have_count(4)
        code, out, err = joined.result(timeout=400)
        assert code == 0, err
        assert f"joined network {NET}" in out
        expect(page.get_by_text("Asking to join")).to_be_hidden()
        online = page.get_by_text(re.compile(r"^online"))  # serving, or idle in this plan
        expect(cards.filter(has=online)).to_have_count(4)
        expect(cards.filter(has_text=re.compile(r"GB free of .* GB"))).to_have_count(4)
        expect(page.locator(".q-notification")).to_have_count(0)  # "approved" has faded
        shoot(page, "admin-nodes")

        # an API key: shown once, works, revoked, refused
        page.get_by_role("button", name="People").click()
        page.get_by_label("Account", exact=True).click()
        page.get_by_role("option", name="boss").click()
        page.get_by_label("What it is for (optional)").fill("laptop")
        page.get_by_role("button", name="Create key").click()
        shown = page.get_by_label("New API key")
        expect(shown).to_have_value(re.compile("^tt-"))
        key = shown.input_value()
        bearer = {"Authorization": f"Bearer {key}"}
        models = f"{cluster.api_url}/models"
        assert httpx.get(models, headers=bearer, timeout=120).status_code == 200
        row = page.get_by_role("row").filter(has_text="laptop")
        expect(row).to_contain_text("active")
        # the account's default priority class
        page.get_by_label("Account or key").click()
        page.get_by_role("option", name="account boss").click()
        page.get_by_label("New class").click()
        page.get_by_role("option", name="quick", exact=True).click()
        page.get_by_role("button", name="Set class").click()
        account = page.get_by_role("row").filter(has_text="boss").filter(has_text="admin")
        expect(account.first).to_contain_text("quick")
        shoot(page, "admin-people")
        row.get_by_role("button", name=re.compile("^Revoke")).click()
        expect(row).to_contain_text("revoked")
        assert httpx.get(models, headers=bearer, timeout=120).status_code == 401

        page.get_by_role("button", name="Events").click()
        expect(page.get_by_role("cell", name="node_online").first).to_be_visible()
        shoot(page, "admin-events")
        page.get_by_role("button", name="Models").click()
        page.get_by_role("button", name=re.compile("^Verify")).click()
        expect(page.get_by_text(re.compile(r"^done 100%$"))).to_be_visible()
        expect(page.get_by_text("all 8 blocks match the manifest")).to_be_visible()
        shoot(page, "admin-models")
