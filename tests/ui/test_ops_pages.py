"""The dashboard's Reports and Tasks pages in a real browser, on real node processes: after a
chat the report's charts (SVG drawn by the node) and tables show its tokens; a task run on a
worker shows its output and is listed; a worker's log lines are shown."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.helpers.browser import shoot
from tests.helpers.cluster import openai_client
from tiktrue.security.node_tls import node_identity
from tiktrue.security.users import UserStore

pytestmark = pytest.mark.integration
ADMIN = "ops pages admin"


def log_in(page, homes, base: str, target: str) -> None:
    """As an admin account of this module's own (which account a shared cluster's first,
    admin, is depends on which module ran first)."""
    users = UserStore(homes[0], rounds=4)
    if ADMIN not in {u.name for u in users.list_users()}:
        users.add_user(ADMIN, "a long password", "admin")
    page.goto(f"{base}/login?next={target}")
    page.get_by_label("Account name").fill(ADMIN)
    page.get_by_label("Password").fill("a long password")
    page.get_by_role("button", name="Log in").click()


def test_the_reports_page_shows_the_chats_tokens(tiny_cluster, new_page):
    cluster, homes, config = tiny_cluster
    answer = openai_client(cluster, homes[0]).chat.completions.create(
        model=config.model_id, messages=[{"role": "user", "content": "Hello"}], max_tokens=7
    )
    assert answer.usage.completion_tokens > 0
    base = cluster.api_url.removesuffix("/v1")
    page = new_page()
    log_in(page, homes, base, "/admin/reports")
    expect(page.get_by_role("figure", name="Generated tokens per network")).to_be_visible()
    expect(
        page.get_by_role("figure", name="Tokens per second per PC (its compute)")
    ).to_be_visible()
    chart = page.get_by_role("figure", name="Generated tokens per network").locator("svg")
    expect(chart).to_be_visible()
    row = page.get_by_role("row").filter(has_text=re.compile(r"^testnet"))
    expect(row.first).to_be_visible()
    expect(page.get_by_text("Usage per account and key")).to_be_visible()
    shoot(page, "admin-reports")
    page.get_by_role("combobox", name="Window").click()
    page.get_by_role("option", name="Last 7 days").click()
    expect(page.get_by_role("figure", name="Generated tokens per network")).to_be_visible()


def test_the_tasks_page_runs_a_task_and_shows_a_log(tiny_cluster, new_page):
    cluster, homes, config = tiny_cluster
    worker = node_identity(homes[1]).node_id
    page = new_page()
    log_in(page, homes, cluster.api_url.removesuffix("/v1"), "/admin/tasks")
    page.get_by_role("combobox", name="PC", exact=True).click()
    page.get_by_role("option", name=re.compile(f"^{worker}")).click()
    page.get_by_role("combobox", name="Task").click()
    page.get_by_role("option", name=re.compile("^verify_blocks")).click()
    page.get_by_role("button", name="Run").click()
    expect(page.get_by_test_id("task-status")).to_have_text(f"verify_blocks on {worker}: done")
    expect(page.get_by_text(re.compile(r"\d+ of \d+ blocks of .* verified"))).to_be_visible()
    row = page.get_by_role("row").filter(has_text="verify_blocks").filter(has_text=worker)
    expect(row.first).to_contain_text("done")
    page.get_by_role("combobox", name="PC whose log").click()
    page.get_by_role("option", name=re.compile(f"^{worker}")).last.click()
    page.get_by_role("button", name="Show log").click()
    expect(page.get_by_label("Log lines").get_by_text("tiktrue").first).to_be_visible()
    shoot(page, "admin-tasks")
