"""The admin dashboard's pages under ``/admin``."""

from __future__ import annotations

from nicegui import ui

from tiktrue.ui.context import UiContext
from tiktrue.ui.layout import page_frame, require_admin


def register(context: UiContext) -> None:
    @ui.page("/admin")
    def admin_home() -> None:
        if require_admin() is None:
            return
        with page_frame("Admin"):
            ui.label("The dashboard of this node's networks.").classes("tt-muted")
