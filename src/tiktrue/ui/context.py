"""What the web UI sees of the node it runs in.

The UI sits below the node service in the layering (``service`` wires everything), so it
cannot reach into ``NodeService``: the service builds one :class:`UiContext` from its live
parts and hands it to :func:`tiktrue.ui.main_app.mount_ui`. The dicts are the service's own
(networks joined or left while the UI runs show up at once); the callables are the service's
methods. A page never keeps its own copy of these.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tiktrue.gateway.session_store import SessionStore
from tiktrue.security.users import UserStore

if TYPE_CHECKING:
    from tiktrue.control.health_monitor import HealthMonitor
    from tiktrue.gateway.api_client import Gateway
    from tiktrue.monitoring.monitoring_system import EventLog


async def _nothing() -> None:
    return None


@dataclass
class UiContext:
    """The node's parts the UI uses.

    - ``data_dir``: the node's data dir (configs, models, ``tiktrue.db``);
    - ``gateways``: network id -> the gateway answering for it (chat calls it in-process);
    - ``health``: network id -> the health monitor of a network this node administers;
    - ``events``: the node's event log (alerts, failovers), None where there is none;
    - ``node_info``: the node's own report (id, addresses, resources, networks), as its
      control channel gives it;
    - ``reload``: bring the node's servers in line with the configs on disk (after a network
      was created or joined from the UI).
    """

    data_dir: Path
    gateways: dict[str, Gateway] = field(default_factory=dict)
    health: dict[str, HealthMonitor] = field(default_factory=dict)
    events: EventLog | None = None
    node_info: Callable[[], dict] = dict
    reload: Callable[[], Awaitable[None]] = _nothing
    users: UserStore | None = None
    sessions: SessionStore | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.users is None:
            self.users = UserStore(self.data_dir)
        if self.sessions is None:
            self.sessions = SessionStore.open(self.data_dir)


_current: UiContext | None = None


def set_ui_context(context: UiContext) -> None:
    """The context of the UI served by this process (NiceGUI serves one UI per process)."""
    global _current
    _current = context


def ui_context() -> UiContext:
    """The context the pages of this process use."""
    if _current is None:
        raise RuntimeError("the web UI is not mounted in this process (mount_ui)")
    return _current
