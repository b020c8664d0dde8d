"""The chat."""

from __future__ import annotations

from nicegui import ui

from tiktrue.ui.layout import page_frame, require_user


def register() -> None:
    @ui.page("/chat")
    def chat() -> None:
        if require_user() is None:
            return
        with page_frame("", drawer=True):
            ui.label("Chat")
