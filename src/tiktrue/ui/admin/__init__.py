"""The admin dashboard: its operations (``operations``, shared with ``/api/admin`` in ``api``)
and its pages under ``/admin`` (nodes and join requests, caps and the plan preview, events and
alerts, models, users and keys); every page starts with ``require_admin()``.

``register_admin_pages(context)`` is called once by ``main_app`` when the UI is mounted. The
package itself imports no NiceGUI: the node service builds the operations and the JSON API
also when it serves no UI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tiktrue.ui.context import UiContext


def register_admin_pages(context: UiContext) -> None:
    """Register the ``/admin`` pages (they act through ``context.admin``)."""
    from tiktrue.ui.admin.pages import register

    register(context)
