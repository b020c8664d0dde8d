"""The dashboard's Reports page in a real browser, on real node processes after a chat: its
charts (SVG drawn by the node) and tables show the chat's tokens."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.helpers.browser import shoot
from tests.helpers.cluster import api_key, openai_client
from tiktrue.security.users import UserStore

pytestmark = pytest.mark.integration


def test_the_reports_page_shows_the_chats_tokens(tiny_cluster, new_page):
    cluster, homes, config = tiny_cluster
    api_key(homes[0])  # the node's first account, its admin ("a long password")
    admin = next(u for u in UserStore(homes[0], rounds=4).list_users() if u.role == "admin")
    answer = openai_client(cluster, homes[0]).chat.completions.create(
        model=config.model_id, messages=[{"role": "user", "content": "Hello"}], max_tokens=7
    )
    assert answer.usage.completion_tokens > 0
    base = cluster.api_url.removesuffix("/v1")
    page = new_page()
    page.goto(base + "/login?next=/admin/reports")
    page.get_by_label("Account name").fill(admin.name)
    page.get_by_label("Password").fill("a long password")
    page.get_by_role("button", name="Log in").click()
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
