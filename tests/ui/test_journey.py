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


@pytest.fixture
def office(ui_node, tiny_llama, tmp_path):
    """A PC already in a one-PC network (as after the first run), with an admin account and a
    plain user's; returns (cluster, home)."""
    from tiktrue.security.users import UserStore
    from tiktrue.service.local_network import prepare_local_network

    homes, _ = prepare_local_network(tmp_path, tiny_llama, nodes=1, network_id="office")
    users = UserStore(homes[0], rounds=4)
    users.add_user("admin", PASSWORD)
    users.add_user("bob", PASSWORD, "user")
    users.close()
    return ui_node(homes[0], own_control_ports=True), homes[0]


def log_in(page, base: str, name: str, screenshot: str | None = None) -> None:
    page.goto(base + "/login")
    if screenshot:
        expect(page.get_by_role("button", name="Log in")).to_be_visible()
        shoot(page, screenshot)
    page.get_by_label("Account name").fill(name)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()


def test_stop_restart_resume_and_roles(office, new_page):
    import httpx

    from tests.helpers.network import wait_until
    from tiktrue.gateway.session_store import SessionStore

    cluster, home = office
    base = ui_base(cluster)
    page = new_page()
    log_in(page, base, "admin")
    expect(page.get_by_text("How can I help?")).to_be_visible()

    # stop halts a stream: the answer keeps what came, marked as stopped
    page.get_by_label("Message").fill("Tell me a long story")
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.get_by_role("button", name="Stop", exact=True)).to_be_visible()
    expect(page.locator(".tt-answer").last).not_to_be_empty()
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_text("stopped")).to_be_visible()
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    shoot(page, "chat-stopped", phone=False)
    conversation = page.url.split("?", 1)[1]

    # the nodes saved the conversation's KV after the answer: after a restart it continues
    # from there (no replay of the prompt)
    store = SessionStore.open(home)
    [saved] = wait_until(
        lambda: [s for s in store.owned("user:1") if store.saved("office", s.session_id)],
        "the conversation's KV saved",
    )
    store.db.close()
    cluster.restart(0)
    page.goto(f"{base}/chat?{conversation}")
    expect(page.get_by_role("main").get_by_text("Tell me a long story")).to_be_visible()
    expect(page.get_by_role("button", name="More for Tell me a long story")).to_be_visible()
    page.get_by_label("Message").fill("And then?")
    page.get_by_label("Message").press("Enter")
    expect(page.get_by_text("tokens/s")).to_have_count(2)
    health = httpx.get(f"{base}/health", timeout=60).json()["sessions"]["office"]
    assert health["resumed"] == 1 and health["replays"] == 0, health
    assert saved.session_id in conversation

    # a plain user: no Admin link, kept out of the admin pages and of others' conversations
    other = new_page()
    log_in(other, base, "bob", screenshot="login")
    expect(other.get_by_text("How can I help?")).to_be_visible()
    expect(other.get_by_role("button", name="Admin")).to_have_count(0)
    expect(other.get_by_text("No conversations yet.")).to_be_visible()
    other.goto(base + "/admin")
    expect(other.get_by_text("The admin pages are for administrators only.")).to_be_visible()
    assert "/chat" in other.url
    other.goto(f"{base}/chat?{conversation}")
    expect(other.get_by_text("That conversation is not yours")).to_be_visible()
    expect(other.get_by_role("main").get_by_text("Tell me a long story")).to_have_count(0)

    # from the LAN the UI's pages open (they ask for a login); the API still needs a key
    lan = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60)
    with lan:
        assert lan.get(f"{base}/login").status_code == 200
        assert lan.get(f"{base}/v1/models").status_code == 401
