"""The web UI in a real browser, the way a person goes through it: the first run (welcome,
admin account, a new network from a model repository), the chat streaming an answer from the
tiny model, other PCs joining by token and by approval, `tiktrue app`, a plain user kept out
of the admin pages, stop, and a conversation that survives a restart."""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.helpers.browser import shoot, slide, wait_connected
from tests.helpers.network import wait_until
from tests.ui.conftest import ui_base
from tiktrue.paths import HOME_ENV

pytestmark = pytest.mark.integration
PASSWORD = "correct horse"


def first_account(page, base: str, screenshot: str | None = None) -> None:
    """The welcome page of a PC with no account yet: its admin account; ends on the set-up."""
    page.goto(base + "/")
    expect(page.get_by_text("Welcome to TikTrue")).to_be_visible()
    if screenshot:
        shoot(page, screenshot)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Repeat the password").fill(PASSWORD)
    page.get_by_role("button", name="Create admin account").click()
    expect(page.get_by_text("Set up this PC")).to_be_visible()


def create_network(page, name: str, repository: str | None = None, model_id: str = "") -> None:
    """From the set-up page: a new network, its model from this PC or from ``repository``."""
    page.get_by_role("button", name="Create new network").click()
    expect(page.get_by_label("Network name")).to_be_visible()
    page.get_by_label("Network name").fill(name)
    if repository:
        page.get_by_role("button", name="A model repository").click()
        page.get_by_label("Repository address").fill(repository)
        page.get_by_label("Model id in the repository").fill(model_id)
    page.get_by_role("button", name="Create network").click()
    expect(page.get_by_text(f"Network “{name}” is ready")).to_be_visible()


def join(page, base: str, admin: str, *, token: str = "", network_id: str = "") -> None:
    """The Join page of this PC: ask the admin at ``admin`` (host:port)."""
    page.goto(base + "/setup/join")
    page.get_by_label("Admin address").fill(admin)
    if token:
        page.get_by_label("Join token").fill(token)
    else:
        page.get_by_label("Network id").fill(network_id)
    page.get_by_role("button", name="Join network").click()


@contextmanager
def app_process(home: Path, tmp: Path, *args: str):
    """``tiktrue app --browser`` for the data dir ``home``, the browser it opens being a
    recorder of the URLs it is given; yields (process, the URLs opened so far)."""
    opened = tmp / f"opened-{home.name}.txt"
    recorder = tmp / "browser.py"
    recorder.write_text("import sys\nopen(sys.argv[1], 'a').write(sys.argv[2] + '\\n')\n")
    browser = " ".join(shlex.quote(str(p)) for p in (sys.executable, recorder, opened))
    env = {**os.environ, HOME_ENV: str(home), "BROWSER": f"{browser} %s"}
    log = (tmp / f"app-{home.name}.log").open("ab")
    command = [sys.executable, "-m", "tiktrue", "app", "--browser", *args]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def urls() -> list[str]:
        if process.poll() not in (None, 0):
            raise AssertionError(f"tiktrue app exited with {process.returncode} (see {log.name})")
        return opened.read_text().split() if opened.is_file() else []

    try:
        yield process, urls
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(60)
        log.close()


def test_first_run_from_a_repository_then_pcs_join_by_token_and_by_approval(
    ui_node, repository, tiny_llama, new_page, tmp_path
):
    """PC 1's first run: its admin account, a network whose model comes from a model
    repository (with the download's progress), a streamed answer. PC 2 is opened with
    `tiktrue app` (no node runs there: it starts one) and joins that network with a join
    token made in PC 1's UI, then asks to join a second network of PC 1 and waits on screen
    until PC 1's admin approves. `tiktrue app` on PC 1, whose node runs, opens that node."""
    from tiktrue.control.join import list_join_requests
    from tiktrue.control.network_manager import list_joined_networks

    home1 = tmp_path / "pc1"
    cluster = ui_node(home1, model=False)
    base1 = ui_base(cluster)
    page = new_page()
    first_account(page, base1, screenshot="welcome")
    shoot(page, "setup")
    # the logins live on the server, owner-only like every secret of the node
    storage = home1 / "ui"
    wait_until(lambda: list(storage.glob("storage-user-*.json")), "the login's storage file")
    if os.name != "nt":
        assert stat.S_IMODE(storage.stat().st_mode) == 0o700

    create_network(page, "Office", repository, tiny_llama.model_id)
    expect(page.get_by_label("Model download")).to_be_visible()
    expect(page.get_by_text(re.compile(r"\d+\.\d / \d+\.\d MB"))).to_be_visible()
    expect(page.get_by_text("8 of 8 blocks on this PC")).to_be_visible()
    expect(page.get_by_label("Network name")).to_be_hidden()  # the form gave way
    page.get_by_role("button", name="Make a join token").click()
    shoot(page, "network-ready")
    admin = page.get_by_label("Admin address", exact=True).input_value()
    token = page.get_by_label("One-time join token", exact=True).input_value()
    assert admin.startswith("127.0.0.1:") and token

    page.get_by_role("button", name="Open the chat").click()
    expect(page.get_by_text("How can I help?")).to_be_visible()
    page.get_by_label("Message").fill("Hello there")
    page.get_by_label("Message").press("Enter")
    expect(page.get_by_text("tokens/s")).to_be_visible()
    shoot(page, "chat")

    home2 = tmp_path / "pc2"
    with app_process(home2, tmp_path, "--local", "--port", "0", "--control-port", "0") as (
        pc2,
        opened,
    ):
        [base2] = wait_until(opened, "tiktrue app to open its UI", timeout=180)
        base2 = base2.rstrip("/")
        other = new_page()
        first_account(other, base2)
        join(other, base2, admin, token=token)
        expect(other.get_by_text("This PC is in the network")).to_be_visible()
        shoot(other, "joined")

        # a second network on PC 1; PC 2 asks to join it and waits for the admin
        page.goto(base1 + "/setup")
        create_network(page, "Lab")
        [lab] = [c.network_id for c in list_joined_networks(home1) if c.name == "Lab"]
        join(other, base2, admin, network_id=lab)
        expect(other.get_by_text("Waiting for the admin to approve this PC")).to_be_visible()
        shoot(other, "join-waiting")
        [request_id] = wait_until(
            lambda: [
                r
                for r, item in list_join_requests(home1, lab).items()
                if item["state"] == "pending"
            ],
            "PC 2's join request",
        )
        approve = [sys.executable, "-m", "tiktrue", "network", "approve", lab, request_id]
        env = {**os.environ, HOME_ENV: str(home1)}  # on PC 1, to its node service
        subprocess.run(approve, env=env, check=True, capture_output=True, timeout=120)
        expect(other.get_by_text("This PC is in the network")).to_be_visible()
        assert {c.name for c in list_joined_networks(home2)} == {"Office", "Lab"}

        # tiktrue app where the node runs already: it opens that node's UI, and is done
        with app_process(home1, tmp_path) as (again, opened_again):
            assert again.wait(180) == 0
            assert opened_again() == [base1 + "/"]

        pc2.send_signal(signal.SIGINT)  # Ctrl-C: the app stops the node service it started
        assert pc2.wait(180) == 0


def _office(ui_node, store, tmp_path):
    """A PC already in a one-PC network of ``store``'s model (as after the first run), with
    an admin account and a plain user's; returns (cluster, home)."""
    from tiktrue.security.users import UserStore
    from tiktrue.service.local_network import prepare_local_network

    homes, _ = prepare_local_network(tmp_path, store, nodes=1, network_id="office")
    users = UserStore(homes[0], rounds=4)
    users.add_user("admin", PASSWORD)
    users.add_user("bob", PASSWORD, "user")
    users.close()
    return ui_node(homes[0], model=False, own_control_ports=True), homes[0]


@pytest.fixture
def office(ui_node, tiny_llama, tmp_path):
    """``_office`` with the tiny model (a context of 512 tokens)."""
    return _office(ui_node, tiny_llama, tmp_path)


@pytest.fixture
def endless_office(ui_node, endless_llama, tmp_path):
    """``_office`` with a model whose answers run to their max tokens."""
    return _office(ui_node, endless_llama, tmp_path)


def log_in(page, base: str, name: str, screenshot: str | None = None) -> None:
    """Log in as ``name`` and wait for the chat, connected (typing before its page has its
    socket could be lost to a reload)."""
    page.goto(base + "/login")
    wait_connected(page)
    if screenshot:
        expect(page.get_by_role("button", name="Log in")).to_be_visible()
        shoot(page, screenshot)
    page.get_by_label("Account name").fill(name)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    with page.expect_navigation():  # to the chat
        page.get_by_role("button", name="Log in").click()
    wait_connected(page)


def set_max_tokens(page, tokens: int) -> None:
    page.get_by_role("button", name="Settings").click()
    page.get_by_label("Max tokens per answer").fill(str(tokens))
    page.get_by_role("button", name="Save").click()


def test_stop_restart_resume_and_roles(endless_office, new_page):
    import httpx

    from tiktrue.gateway.session_store import SessionStore

    cluster, home = endless_office
    base = ui_base(cluster)
    page = new_page()
    log_in(page, base, "admin")
    expect(page.get_by_text("How can I help?")).to_be_visible()

    # the generation settings are the person's: a new chat starts with them (greedy, and
    # answers of 1,500 tokens: this model never ends one by itself, so Stop always comes
    # before the end, however fast the machine; the tiny model's own greedy answer took 0.35 s)
    page.get_by_role("button", name="Settings").click()
    slide(page, "Temperature", 0.0, "0")
    page.get_by_label("Max tokens per answer").fill("1500")
    page.get_by_role("button", name="Save").click()
    with page.expect_navigation():  # a new page: what is typed on the old one would be lost
        page.get_by_role("button", name="New chat").click()
    wait_connected(page)
    page.get_by_role("button", name="Settings").click()
    expect(page.get_by_text("Temperature: 0", exact=True)).to_be_visible()
    expect(page.get_by_label("Max tokens per answer")).to_have_value("1500")
    page.get_by_role("button", name="Cancel").click()

    # stop halts a stream: the answer keeps what came, marked as stopped
    page.get_by_label("Message").fill("Tell me a long story")
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.get_by_role("button", name="Stop", exact=True)).to_be_visible()
    expect(page.locator(".tt-answer").last).not_to_be_empty()
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_text("stopped")).to_be_visible()
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_visible()
    shoot(page, "chat-stopped")
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
    wait_connected(page)
    expect(page.get_by_role("main").get_by_text("Tell me a long story")).to_be_visible()
    expect(page.get_by_role("button", name="More for Tell me a long story")).to_be_visible()
    set_max_tokens(page, 8)  # this answer runs to its end
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


def test_the_web_chat_answers_the_demo_model_with_nothing_changed(
    demo_store, ui_node, new_page, tmp_path
):
    """A person who changes nothing asks the demo's real model (its default int4 weights) a
    simple question: the settings start from the model's own (see
    ``tiktrue.model.demo_model.DEMO_SAMPLING``), not OpenAI's, and the answer names Paris."""
    from tiktrue.security.users import UserStore
    from tiktrue.service.local_network import prepare_local_network

    homes, _ = prepare_local_network(tmp_path, demo_store, nodes=1, network_id="demo")
    users = UserStore(homes[0], rounds=4)
    users.add_user("admin", PASSWORD)
    users.close()
    cluster = ui_node(homes[0], model=False, own_control_ports=True)
    base = ui_base(cluster)
    page = new_page()
    log_in(page, base, "admin")
    expect(page.get_by_text("How can I help?")).to_be_visible()
    page.get_by_role("button", name="Settings").click()
    expect(page.get_by_text("Temperature: 0", exact=True)).to_be_visible()  # the model's
    page.get_by_role("button", name="Cancel").click()
    page.get_by_label("Message").fill("What is the capital of France?")
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.get_by_text("tokens/s")).to_be_visible()
    expect(page.locator(".tt-answer").last).to_contain_text("Paris")


def test_a_conversation_longer_than_the_context_goes_on(office, new_page):
    """The tiny model's network holds 512 tokens. Four long questions: each is answered (no
    "longer than the context" error); the oldest turns leave the model's window, and the chat
    shows where the window now starts."""
    cluster, _ = office
    base = ui_base(cluster)
    page = new_page()
    log_in(page, base, "admin")
    expect(page.get_by_text("How can I help?")).to_be_visible()
    words = "tell me more about the quick brown fox and the lazy dog in the garden " * 10
    for turn in range(1, 5):
        page.get_by_label("Message").fill(f"Question {turn}: {words}")
        page.get_by_role("button", name="Send", exact=True).click()
        expect(page.get_by_text("tokens/s")).to_have_count(turn)
        expect(page.get_by_text("The answer failed")).to_have_count(0)
    expect(page.get_by_role("separator", name="The model's window starts here")).to_be_visible()
    expect(page.get_by_text("The model no longer sees the messages above")).to_be_visible()
