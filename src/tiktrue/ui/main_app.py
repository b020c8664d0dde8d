"""The web UI (seed ``main_app``): NiceGUI pages served by the gateway's own FastAPI app.

Every node that runs a gateway serves the UI at ``/`` on the gateway's port, beside the OpenAI
API and ``/ws`` (one ASGI app, one port): anyone on the LAN with an account opens it in a
browser. ``tiktrue app`` shows the same pages in a native window (pywebview, the ``app`` extra)
or the default browser. Everything the pages load comes from this node (NiceGUI bundles Vue,
Quasar, Tailwind and the Roboto font; ``static/`` holds the Persian font): nothing is fetched
from the internet.

NiceGUI keeps one app per process, so :class:`WebUi` mounts once per process; the node service
builds it with a :class:`~tiktrue.ui.context.UiContext` and hands it to ``create_app``.
"""

from __future__ import annotations

import contextlib
import secrets
import webbrowser
from pathlib import Path

from fastapi import FastAPI
from fastapi.routing import APIRoute

from tiktrue.security.auth_manager import _write_private_file, private_dir
from tiktrue.ui.context import UiContext, set_ui_context
from tiktrue.ui.i18n import N_
from tiktrue.ui.static_files import STATIC_DIR, STATIC_PATH

SECRET_FILE = "ui_secret"  # signs the browser's session cookie (which names its server storage)
STORAGE_DIR = "ui"  # <data>/ui/: per-browser storage (the login's JWT), server side
FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    '<rect width="32" height="32" rx="7" fill="#4f46e5"/>'
    '<circle cx="10" cy="11" r="3.2" fill="#fff"/><circle cx="22" cy="11" r="3.2" fill="#fff"/>'
    '<circle cx="16" cy="22" r="3.2" fill="#fff"/>'
    '<path d="M10 11L22 11L16 22Z" stroke="#fff" stroke-width="1.6" fill="none"/></svg>'
)
RECONNECT_TIMEOUT_S = 15.0  # a browser away this long (a busy PC, a sleeping tab) starts over

_mounted: FastAPI | None = None


class UiError(Exception):
    """The UI cannot be served (mounted twice in one process)."""


def _secret(data_dir: Path) -> str:
    path = Path(data_dir) / SECRET_FILE
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process made it first
            _write_private_file(path, secrets.token_hex(32).encode("ascii"))
    return path.read_text("ascii").strip()


class WebUi:
    """The web UI of one node: ``mount`` puts it on the gateway's app; ``serves`` tells the
    gateway's auth middleware which paths are the UI's (its pages ask for a login
    themselves; the API's routes keep needing a key)."""

    def __init__(self, context: UiContext) -> None:
        self.context = context

    def serves(self, path: str) -> bool:
        """Whether ``path`` is the UI's: NiceGUI's assets and socket, and every page."""
        if path.startswith(("/_nicegui", f"{STATIC_PATH}/")) or path == "/favicon.ico":
            return True
        from nicegui import core

        return any(
            isinstance(route, APIRoute) and route.path_regex.match(path)
            for route in core.app.routes
        )

    def mount(self, app: FastAPI) -> None:
        global _mounted
        if _mounted is not None and _mounted is not app:
            raise UiError("the web UI is served by one app per process (NiceGUI is global)")
        if _mounted is app:
            return
        from nicegui import app as nicegui_app
        from nicegui import ui
        from nicegui.storage import Storage

        from tiktrue.ui import admin, auth_pages, chat_page, setup_pages, trust_page
        from tiktrue.ui.layout import BRAND

        set_ui_context(self.context)
        # the logins' JWTs live there: owner-only, like every secret of the node
        Storage.path = private_dir(self.context.data_dir / STORAGE_DIR)
        nicegui_app.add_static_files(STATIC_PATH, STATIC_DIR)
        _translate_nicegui_popups()
        auth_pages.register()
        setup_pages.register()
        trust_page.register()
        chat_page.register()
        admin.register_admin_pages(self.context)
        ui.run_with(
            app,
            title=BRAND,
            favicon=FAVICON,
            storage_secret=_secret(self.context.data_dir),
            show_welcome_message=False,
            reconnect_timeout=RECONNECT_TIMEOUT_S,
            binding_refresh_interval=None,  # no bindings to poll: the pages push changes
        )
        _mounted = app


def _translate_nicegui_popups() -> None:
    """NiceGUI's own popups ("Connection lost. Trying to reconnect...") in our languages it
    does not ship, from our catalogs: its texts are kept per Quasar language."""
    from nicegui.translations import translations

    from tiktrue.ui import i18n

    texts = {
        "connection_lost": N_("Connection lost."),
        "trying_to_reconnect": N_("Trying to reconnect..."),
        "message_too_long": N_("Message too long"),
        "message_too_long_body": N_("The message is too large for WebSocket transmission."),
    }
    for language in i18n.LANGUAGES.values():
        if language.quasar not in translations:
            with i18n.using(language):
                translations[language.quasar] = {k: i18n.translate(v) for k, v in texts.items()}


def open_app(url: str, *, native: bool | None = None, title: str = "TikTrue") -> bool:
    """Show the UI at ``url``: in a native window when pywebview is installed (blocks until
    the window closes; ``native=False`` never tries it), else in the default browser (returns
    at once). Returns whether a native window was shown."""
    if native is not False:
        try:
            import webview  # pywebview, the `app` extra
        except ImportError:
            webview = None
        if webview is not None:
            try:
                webview.create_window(title, url, width=1280, height=800, min_size=(380, 600))
                webview.start()
                return True
            except Exception:  # no GUI toolkit on this PC: the browser does as well
                if native:
                    raise
    webbrowser.open(url)
    return False
