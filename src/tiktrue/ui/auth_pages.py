"""Entry pages: ``/`` (sends each person where they belong), ``/welcome`` (the first run: the
first account, which becomes the admin) and ``/login``.

The first account can be made only from this PC's own browser (or ``tiktrue app``): while no
account exists, a stranger on the LAN must not be able to make himself the admin.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from nicegui import ui

from tiktrue.control.network_manager import list_joined_networks
from tiktrue.gateway.auth import is_local
from tiktrue.security.users import MIN_PASSWORD_CHARS, UserError
from tiktrue.ui.context import ui_context
from tiktrue.ui.i18n import _
from tiktrue.ui.layout import (
    BRAND,
    accounts_exist,
    apply_theme,
    current_user,
    language_menu,
    log_in,
    login_target,
)
from tiktrue.ui.refusals import account_refusal, password_problem


def home_target() -> str:
    """Where ``/`` leads: the first run's welcome, the login, the network set-up (an admin on
    a PC in no network yet), else the chat."""
    user = current_user()
    if user is None:
        return login_target("/")
    if user.role == "admin" and not list_joined_networks(ui_context().data_dir):
        return "/setup"
    return "/chat"


def _card(title: str, subtitle: str):
    """The centred card of the pages shown before anyone is logged in."""
    apply_theme()
    ui.page_title(f"{title} · {BRAND}")
    outer = ui.column().classes("w-full min-h-screen items-center justify-center p-4")
    with outer, ui.column().classes("tt-card w-full max-w-md p-8 gap-4"):
        with ui.row().classes("w-full items-center gap-2"):
            ui.icon("hub", color="primary").classes("text-3xl")
            ui.label(BRAND).classes("tt-brand text-2xl")
            ui.space()
            language_menu()
        ui.label(title).classes("text-xl font-semibold")
        ui.label(subtitle).classes("tt-muted")
        return ui.column().classes("w-full gap-3")


def register() -> None:
    @ui.page("/")
    def home() -> None:
        ui.navigate.to(home_target())

    @ui.page("/welcome")
    def welcome(request: Request) -> None:
        if accounts_exist():
            ui.navigate.to("/login")
            return
        body = _card(
            _("Welcome to TikTrue"),
            _(
                "Run one language model across the PCs of your network, privately. First, "
                "make the administrator account of this PC."
            ),
        )
        with body:
            if not is_local(request.client.host if request.client else None):
                ui.label(
                    _(
                        "The first account is made on this PC itself: open TikTrue there "
                        "({command}, or {address} in its browser).",
                        command="tiktrue app",
                        address="http://127.0.0.1",
                    )
                ).classes("text-negative")
                return
            name = ui.input(_("Account name"), value="admin").props("outlined autofocus")
            password = ui.input(_("Password"), password=True)
            hint = _("{n} characters or more", n=MIN_PASSWORD_CHARS)
            password.props(f'outlined hint="{hint}"')
            again = ui.input(_("Repeat the password"), password=True).props("outlined")
            error = ui.label().classes("text-negative")

            async def create() -> None:
                if password.value != again.value:
                    error.set_text(_("The two passwords differ."))
                    return
                problem = password_problem(password.value or "")
                if problem:
                    error.set_text(problem)
                    return
                users = ui_context().users
                try:
                    if accounts_exist():  # made meanwhile in another tab: log in instead
                        error.set_text(_("An account exists already: log in."))
                        return
                    await asyncio.to_thread(users.add_user, name.value, password.value, "admin")
                    await log_in(name.value, password.value)
                except UserError as exc:
                    error.set_text(account_refusal(exc))
                    return
                ui.navigate.to(home_target())

            label = _("Create admin account")
            ui.button(label, on_click=create).props(
                f'unelevated no-caps aria-label="{label}"'
            ).classes("w-full")
            again.on("keydown.enter", create)

    @ui.page("/login")
    def login(next: str = "") -> None:  # noqa: A002 (the query parameter's name)
        if not accounts_exist():
            ui.navigate.to("/welcome")
            return
        if current_user() is not None:
            ui.navigate.to(_safe(next) or home_target())
            return
        body = _card(_("Log in"), _("Use the account your TikTrue administrator gave you."))
        with body:
            name = ui.input(_("Account name")).props("outlined autofocus")
            password = ui.input(_("Password"), password=True).props("outlined")
            error = ui.label().classes("text-negative")

            async def submit() -> None:
                try:
                    await log_in(name.value or "", password.value or "")
                except UserError as exc:
                    error.set_text(account_refusal(exc))
                    return
                ui.navigate.to(_safe(next) or home_target())

            label = _("Log in")
            ui.button(label, on_click=submit).props(
                f'unelevated no-caps aria-label="{label}"'
            ).classes("w-full")
            password.on("keydown.enter", submit)
            ui.link(_("This PC's certificate (HTTPS)"), "/trust").classes("text-sm tt-muted")


def _safe(target: str) -> str:
    """A ``next`` that stays on this site (no ``//host`` or ``http://``)."""
    return target if target.startswith("/") and not target.startswith("//") else ""
