"""First run of a PC in no network: "Create new network" or "Join network"."""

from __future__ import annotations

from nicegui import ui

from tiktrue.ui.layout import page_frame, require_admin


def register() -> None:
    @ui.page("/setup")
    def setup() -> None:
        if require_admin() is None:
            return
        with page_frame("Set up this PC"):
            ui.label("Create a new network, or join one on your LAN.")
