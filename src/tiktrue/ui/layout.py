"""The frame every page of the web UI shares, and who is logged in.

A login is the account's JWT (``security.users``), kept on the server in NiceGUI's user
storage (``<data>/ui/``); the browser holds only the signed, HttpOnly session cookie that names
that storage. Every page asks :func:`require_user` or :func:`require_admin` first: the gateway's
middleware lets the UI's pages through without an API key precisely because they do this.

``page_frame(title)`` draws the header (the product, the nav with Chat and, for admins, Admin;
the account menu with the languages and Log out) and yields the page's main column; at phone
width the nav keeps its icons and the account menu its initial. Every page is served in its
person's language (``tiktrue.ui.i18n``): ``<html lang dir>`` and Quasar's own labels follow it.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote

from nicegui import app, ui

from tiktrue.security.users import Principal, UserError
from tiktrue.ui import i18n
from tiktrue.ui.context import ui_context
from tiktrue.ui.i18n import _
from tiktrue.ui.static_files import STATIC_PATH

TOKEN_KEY = "tiktrue_token"
BRAND = "TikTrue"
PRIMARY = "#4f46e5"

# Small, global touches on top of Quasar/Tailwind: the page background, readable chat text,
# and scrollable code blocks in answers. Persian script comes in Vazirmatn (shipped in
# static/fonts, OFL), Latin stays in NiceGUI's Roboto: the font covers only the Arabic
# script's ranges. Each paragraph of an answer takes the direction of its own text
# (``unicode-bidi: plaintext``: a Persian paragraph runs right-to-left in an English page, an
# English one left-to-right in a Persian page); code stays left-to-right, and so do the
# fields that hold addresses, ids, tokens and paths (``tt-ltr``), and so does a value shown on
# its own (``tt-value``: an address, a fingerprint; beside its label); in a field a person writes
# in (``tt-plain``) each paragraph, and the placeholder, take the direction of their text.
FONT_STYLE = f"""
@font-face {{ font-family: "Vazirmatn"; font-weight: 100 900; font-display: swap;
  src: url("{STATIC_PATH}/fonts/Vazirmatn-Variable.woff2") format("woff2");
  unicode-range: U+0600-06FF, U+0750-077F, U+08A0-08FF, U+200C-200F, U+FB50-FDFF, U+FE70-FEFF; }}
body {{ font-family: Vazirmatn, Roboto, -apple-system, "Helvetica Neue", Helvetica, Arial,
       sans-serif; }}
"""
STYLE = """
body { background: #f7f7f8; }
.tt-header { background: #ffffff !important; color: #111827 !important;
             border-bottom: 1px solid #e5e7eb; }
.tt-brand { font-weight: 700; letter-spacing: 0.02em; }
.tt-card { background: #ffffff; border: 1px solid #e5e7eb; border-radius: 12px; }
.tt-card .q-field { width: 100%; }
.q-avatar__content { font-family: Vazirmatn, Roboto, sans-serif; font-size: 0.8em;
                     font-weight: 500; }
.tt-muted { color: #6b7280; }
.tt-answer pre, .tt-answer code { font-size: 0.85rem; }
.tt-answer pre { overflow-x: auto; padding: 0.75rem; border-radius: 8px; background: #f3f4f6; }
.tt-answer p { margin: 0.25rem 0; }
.tt-answer { overflow-wrap: anywhere; }
.tt-answer :is(p, li, h1, h2, h3, h4, h5, h6, blockquote, td, th) {
  unicode-bidi: plaintext; text-align: start; }
.tt-answer pre, .tt-answer code { direction: ltr; unicode-bidi: isolate; text-align: left; }
.tt-stream { white-space: pre-wrap; }
.tt-ltr input, .tt-ltr textarea { direction: ltr; }
.tt-log { direction: ltr; unicode-bidi: isolate; }
.tt-value { direction: ltr; unicode-bidi: isolate; text-align: left; }
[dir=rtl] .tt-value { text-align: right; }
.tt-plain textarea, .tt-plain input { unicode-bidi: plaintext; text-align: start; }
[dir=rtl] .tt-ltr input, [dir=rtl] .tt-ltr textarea { text-align: right; }
"""


def current_user() -> Principal | None:
    """The account logged in in this browser, or None (never logged in, logged out, or its
    JWT expired or was invalidated by a password change)."""
    token = app.storage.user.get(TOKEN_KEY)
    if not token:
        return None
    try:
        return ui_context().users.verify_token(token)
    except UserError:
        app.storage.user.pop(TOKEN_KEY, None)
        return None


def accounts_exist() -> bool:
    return bool(ui_context().users.list_users())


def _here() -> str:
    request = ui.context.client.request
    if request is None:
        return "/"
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{request.url.path}{query}"


def login_target(back_to: str | None = None) -> str:
    """Where someone not logged in goes: the welcome page while no account exists (the first
    one becomes the admin), else the login page, which comes back to ``back_to``."""
    if not accounts_exist():
        return "/welcome"
    back_to = back_to or _here()
    return "/login" if back_to in ("/", "/login") else f"/login?next={quote(back_to, safe='')}"


def require_user() -> Principal | None:
    """The logged-in account; None after sending the browser to log in (the page builds
    nothing then)."""
    user = current_user()
    if user is None:
        ui.navigate.to(login_target())
    return user


def require_admin() -> Principal | None:
    """The logged-in admin; None after sending anyone else away (to log in, or to the chat
    with a notice: the admin pages are the admin's only)."""
    user = require_user()
    if user is not None and user.role != "admin":
        ui.navigate.to("/chat?denied=admin")
        return None
    return user


async def log_in(name: str, password: str) -> Principal:
    """Check the password (bcrypt, off the event loop) and keep the account's JWT for this
    browser. Raises ``UserError`` (wrong name or password)."""
    users = ui_context().users
    token = await asyncio.to_thread(users.login, name.strip(), password)
    app.storage.user[TOKEN_KEY] = token
    return users.verify_token(token)


def log_out() -> None:
    app.storage.user.pop(TOKEN_KEY, None)
    ui.navigate.to("/login")


def copy_text(text: str, what: str = "") -> None:
    """Put ``text`` on the clipboard and say so."""
    ui.clipboard.write(text)
    ui.notify(_("{what} copied", what=what) if what else _("Copied"), type="positive", timeout=1500)


def apply_theme() -> None:
    """Colours, styles and language of every TikTrue page (also those without the frame:
    login)."""
    _serve_in(i18n.current())
    ui.colors(primary=PRIMARY)
    ui.add_css(FONT_STYLE + STYLE)


def _serve_in(language: i18n.Language) -> None:
    """Serve this page as ``<html lang=…>`` with Quasar's language pack of ``language`` (its
    own labels; right-to-left for Persian: Quasar sets ``dir`` from the pack). NiceGUI takes
    a page's language from its ``ui.page``, shared by everyone; this client gets a copy of
    it with its person's language, as NiceGUI's own error pages get a page of their own."""
    client = ui.context.client
    if client.page.language != language.quasar:
        client.page = copy.copy(client.page)
        client.page.language = language.quasar


def language_menu() -> None:
    """A button with the language's name that opens the list of languages, each in itself
    (the pages before a login; after it, the account menu lists them)."""
    here, label = i18n.current(), _("Language")
    button = ui.button(icon="translate").props(f'flat no-caps dense aria-label="{label}"')
    with button.classes("text-grey-8"):
        ui.label(here.name).classes("gt-xs ms-1")
        with ui.menu():
            _language_items()


def _language_items() -> None:
    """One menu item per language, named in itself; a choice is kept for this browser's
    person and the page comes again in it."""
    here = i18n.current()
    for language in i18n.LANGUAGES.values():
        item = ui.menu_item(language.name, on_click=lambda c=language: _switch(c))
        item.props(f'lang="{language.quasar}" dir="{language.direction}"')
        if language is here:
            item.classes("text-primary font-medium")


def _switch(language: i18n.Language) -> None:
    i18n.choose(language)
    ui.navigate.reload()


@dataclass
class Frame:
    """The parts of a framed page: its main column, and its left drawer when it asked for
    one (the chat's conversation list)."""

    main: ui.column
    drawer: ui.left_drawer | None = None


@contextmanager
def page_frame(title: str, *, drawer: bool = False) -> Iterator[Frame]:
    """Header, nav and account menu around a page; yields the page's :class:`Frame` (build
    inside ``frame.main``). Call :func:`require_user` or :func:`require_admin` first."""
    user = current_user()
    apply_theme()
    ui.page_title(f"{title} · {BRAND}")
    side = None
    with ui.header(elevated=False).classes("tt-header items-center px-3 py-2 gap-2"):
        if drawer:
            conversations = _("Conversations")
            ui.button(icon="menu", on_click=lambda: side.toggle()).props(
                f'flat round dense aria-label="{conversations}"'
            ).classes("text-grey-8")
        with ui.link(target="/").classes("no-underline text-inherit flex items-center gap-2"):
            ui.icon("hub", color="primary").classes("text-2xl")
            ui.label(BRAND).classes("tt-brand text-lg")
        ui.space()
        with ui.row().classes("items-center gap-1 no-wrap"):
            _nav_link(_("Chat"), "chat", "/chat")
            if user is not None and user.role == "admin":
                _nav_link(_("Admin"), "admin_panel_settings", "/admin")
        if user is not None:
            _account_menu(user)
    if drawer:
        # open beside the page on a wide screen, closed (a tap on the menu away) on a phone
        side = ui.left_drawer(value=None, bordered=True).props("width=290 breakpoint=760")
        side.classes("bg-white p-0")
    with ui.column().classes("w-full max-w-5xl mx-auto p-4 gap-4") as main:
        if title:
            ui.label(title).classes("text-2xl font-semibold")
        yield Frame(main, side)


def _nav_link(text: str, icon: str, target: str) -> None:
    path = ui.context.client.page.path
    active = path == target or path.startswith(f"{target}/")
    button = ui.button(text, icon=icon, on_click=lambda: ui.navigate.to(target))
    button.props(f'flat no-caps dense aria-label="{text}"').classes(
        "px-2 " + ("text-primary" if active else "text-grey-8")
    )


def _account_menu(user: Principal) -> None:
    name = user.user_name or "?"
    account = _("Account {name}", name=name)
    with ui.button().props(f'flat no-caps dense aria-label="{account}"').classes("text-grey-9"):
        with ui.avatar(color="primary", text_color="white", size="sm"):
            ui.label(name[:1].upper())
        ui.label(name).classes("gt-xs ms-2")
        with ui.menu().props("anchor='bottom right' self='top right'"):
            with ui.column().classes("px-4 py-2 gap-0"):
                ui.label(name).classes("font-medium")
                ui.label(_("Administrator") if user.role == "admin" else _("User")).classes(
                    "tt-muted text-sm"
                )
            ui.separator()
            _language_items()
            ui.separator()
            leave = _("Log out")
            ui.menu_item(leave, on_click=log_out).props(f'aria-label="{leave}"')
