"""The admin dashboard's pages under ``/admin``, one module each; each acts through the
node's one ``AdminOperations`` (``context.admin``)."""

from __future__ import annotations

from tiktrue.ui.admin import (
    events_page,
    models_page,
    nodes_page,
    people_page,
    plan_page,
    reports_page,
    tasks_page,
)
from tiktrue.ui.context import UiContext


def register(context: UiContext) -> None:
    for page in (
        nodes_page,
        plan_page,
        events_page,
        models_page,
        people_page,
        reports_page,
        tasks_page,
    ):
        page.register(context)
