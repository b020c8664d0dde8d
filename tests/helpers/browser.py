"""Driving the web UI in a real browser: Playwright's driver with Debian's chromium.

Playwright's own browser download cannot work on an offline machine, so the tests launch the
system's ``/usr/bin/chromium`` (the Makefile's test set-up installs it where it can). Every
context records the URLs its pages request: the UI must never reach beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = Path(os.environ.get("TIKTRUE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
ROOT = Path(__file__).resolve().parents[2]
# The tests' screenshots (to look at what a test's browser saw); the README's come from a run
# with a real model: bench/screenshots.py (`make screenshots`) writes docs/screenshots/.
SCREENSHOTS = ROOT / "build" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 150_000  # a ceiling for a busy 2-core machine, never a pace


def browser_problem() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        found = shutil.which("chromium")
        if found is None:
            return (
                f"no chromium at {CHROMIUM} (Debian: apt-get install chromium; "
                "`make test` installs it when run as root or with sudo)"
            )
    return None


def chromium_path() -> str:
    return str(CHROMIUM) if CHROMIUM.is_file() else shutil.which("chromium")


class RequestLog:
    """Every URL a browser context asked for; ``outside()``: those not on 127.0.0.1."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def record(self, request) -> None:
        self.urls.append(request.url)

    def outside(self) -> list[str]:
        local = {"127.0.0.1"}
        return [
            u
            for u in self.urls
            if urlsplit(u).scheme in ("http", "https", "ws", "wss")
            and urlsplit(u).hostname not in local
        ]


def shoot(page, name: str, *, phone: bool = True, directory: Path = SCREENSHOTS) -> None:
    """Screenshots of the page as it is: ``<name>.png`` at 1280x800 and, with ``phone``,
    ``<name>-phone.png`` at 390x844 (the viewport is put back afterwards)."""
    directory.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    page.set_viewport_size(DESKTOP)
    page.wait_for_timeout(300)  # a layout pass after the resize (a screenshot, no assertion)
    page.screenshot(path=str(directory / f"{name}.png"))
    if phone:
        page.set_viewport_size(PHONE)
        page.wait_for_timeout(300)
        page.screenshot(path=str(directory / f"{name}-phone.png"))
    page.set_viewport_size(size or DESKTOP)


def wait_connected(page) -> None:
    """Until the page's NiceGUI socket has done its handshake with the server: what is typed or
    clicked before waits in the browser, and a page whose handshake fails reloads (what was
    typed is gone). An event, with the generous ceiling every wait has here."""
    page.wait_for_function("window.did_handshake === true", timeout=WAIT_MS)


def slide(page, label: str, fraction: float, value: str) -> None:
    """Set the slider ``label`` by clicking its track near ``fraction`` of its length until
    its caption (``"<label>: <value>"``) says ``value`` (a click during a dialog's animation,
    or a pixel off, sets another value; Quasar's sliders take no Home/End keys)."""
    caption = page.get_by_text(f"{label}: {value}", exact=True)
    for attempt in range(12):
        box = page.get_by_label(label).bounding_box()
        near = max(0.0, fraction + (attempt // 2) * 0.01 * (-1) ** attempt)
        page.mouse.click(box["x"] + box["width"] * near, box["y"] + box["height"] / 2)
        try:
            caption.wait_for(timeout=2000)  # the caption comes back from the server
            return
        except Exception:  # Playwright's TimeoutError: click again
            continue
    raise AssertionError(f"could not set the {label} slider to {value}")
