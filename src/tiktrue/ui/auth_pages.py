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
from tiktrue.security.users import UserError
from tiktrue.ui.context import ui_context
from tiktrue.ui.layout import (
    BRAND,
    accounts_exist,
    apply_theme,
    current_user,
    log_in,
    login_target,
)


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
        with ui.row().classes("items-center gap-2"):
            ui.icon("hub", color="primary").classes("text-3xl")
            ui.label(BRAND).classes("tt-brand text-2xl")
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
            "Welcome to TikTrue",
            "Run one language model across the PCs of your network, privately. First, make "
            "the administrator account of this PC.",
        )
        with body:
            if not is_local(request.client.host if request.client else None):
                ui.label(
                    "The first account is made on this PC itself: open TikTrue there "
                    "(tiktrue app, or http://127.0.0.1 in its browser)."
                ).classes("text-negative")
                return
            name = ui.input("Account name", value="admin").props("outlined autofocus")
            password = ui.input("Password", password=True)
            password.props('outlined hint="8 characters or more"')
            again = ui.input("Repeat the password", password=True).props("outlined")
            error = ui.label().classes("text-negative")

            async def create() -> None:
                if password.value != again.value:
                    error.set_text("The two passwords differ.")
                    return
                users = ui_context().users
                try:
                    if accounts_exist():  # made meanwhile in another tab: log in instead
                        raise UserError("an account exists already: log in")
                    await asyncio.to_thread(users.add_user, name.value, password.value, "admin")
                    await log_in(name.value, password.value)
                except UserError as exc:
                    error.set_text(str(exc))
                    return
                ui.navigate.to(home_target())

            ui.button("Create admin account", on_click=create).props(
                'unelevated no-caps aria-label="Create admin account"'
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
        body = _card("Log in", "Use the account your TikTrue administrator gave you.")
        with body:
            name = ui.input("Account name").props("outlined autofocus")
            password = ui.input("Password", password=True).props("outlined")
            error = ui.label().classes("text-negative")

            async def submit() -> None:
                try:
                    await log_in(name.value or "", password.value or "")
                except UserError as exc:
                    error.set_text(str(exc))
                    return
                ui.navigate.to(_safe(next) or home_target())

            ui.button("Log in", on_click=submit).props(
                'unelevated no-caps aria-label="Log in"'
            ).classes("w-full")
            password.on("keydown.enter", submit)
            ui.link("This PC's certificate (HTTPS)", "/trust").classes("text-sm tt-muted")


def _safe(target: str) -> str:
    """A ``next`` that stays on this site (no ``//host`` or ``http://``)."""
    return target if target.startswith("/") and not target.startswith("//") else ""
