"""The web UI in a real browser, the way a person goes through it: the first run (welcome,
admin account, a new network), the chat streaming an answer from the tiny model, a plain
user kept out of the admin pages, stop, and a conversation that survives a restart."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.helpers.browser import shoot
from tests.ui.conftest import ui_base

pytestmark = pytest.mark.integration
PASSWORD = "correct horse"


def test_first_run_to_a_streamed_answer(ui_node, new_page, tmp_path):
    cluster = ui_node(tmp_path / "pc")
    page = new_page()
    page.goto(ui_base(cluster) + "/")
    expect(page.get_by_text("Welcome to TikTrue")).to_be_visible()
    shoot(page, "welcome")
    page.get_by_label("Password (8 characters or more)").fill(PASSWORD)
    page.get_by_label("Repeat the password").fill(PASSWORD)
    page.get_by_role("button", name="Create admin account").click()
    expect(page.get_by_text("Set up this PC")).to_be_visible()
    shoot(page, "setup")

    page.get_by_role("button", name="Create new network").click()
    expect(page.get_by_label("Network name")).to_be_visible()
    page.get_by_label("Network name").fill("Office")
    shoot(page, "create-network")
    page.get_by_role("button", name="Create network").click()
    expect(page.get_by_text("Network “Office” is ready")).to_be_visible()
    shoot(page, "network-ready")

    page.get_by_role("button", name="Open the chat").click()
    expect(page.get_by_text("How can I help?")).to_be_visible()
    page.get_by_label("Message").fill("Hello there")
    page.get_by_label("Message").press("Enter")
    expect(page.get_by_text("tokens/s")).to_be_visible()
    shoot(page, "chat")
