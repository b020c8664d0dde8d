"""The admin dashboard's pages (nodes, join approvals, caps and plans, events, models, users and
keys), under ``/admin``; every page starts with ``require_admin()``.

``register_admin_pages(context)`` is called once by ``main_app`` when the UI is mounted.
"""

from __future__ import annotations

from nicegui import ui

from tiktrue.ui.context import UiContext
from tiktrue.ui.layout import page_frame, require_admin


def register_admin_pages(context: UiContext) -> None:
    """Register the ``/admin`` pages (they read the node through ``context``)."""

    @ui.page("/admin")
    def admin_home() -> None:
        if require_admin() is None:
            return
        with page_frame("Admin"):
            ui.label("The dashboard of this node's networks.").classes("tt-muted")
