"""The node service's monitoring: its metrics (read at scrape time from the parts the node
already has), the answer listener every gateway calls once per answer (metrics, history, token
quotas), and the background work that keeps history, alerts and Prometheus targets current.

The node service builds one ``NodeMonitoring`` and calls ``start``/``stop``; nothing here runs
on the per-token path: an answer's figures come from its ``GenerationResult`` when it ends,
and every database write goes to one worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from tiktrue.gateway.auth import current_caller
from tiktrue.monitoring.metrics import NodeMetrics
from tiktrue.node.resources import heartbeat_stats
from tiktrue.protocol.network_config import list_configs
from tiktrue.security.users import Principal, UserStore

if TYPE_CHECKING:
    from tiktrue.gateway.api_client import Gateway
    from tiktrue.model.generation import GenerationResult
    from tiktrue.service.service_runner import NodeService

log = logging.getLogger("tiktrue.monitoring")


def principal_of(owner: str | None) -> Principal | None:
    """The account an answer's owner names (``user:<id>``), when no request told its caller
    (the web chat)."""
    if owner and owner.startswith("user:") and owner[5:].isdigit():
        return Principal(user_id=int(owner[5:]))
    return None


class NodeMonitoring:
    def __init__(self, service: NodeService) -> None:
        self.service = service
        self.data_dir = service.data_dir
        self.node_id = service.identity.node_id
        self.metrics = NodeMetrics(self.node_id, figures=self.figures)
        service.events.add_listener(self.metrics.on_event)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="monitoring")
        self._users: UserStore | None = None

    # --- figures read at scrape time ---------------------------------------------------------

    def figures(self) -> dict:
        """What the metrics collector reads (see ``FiguresCollector``)."""
        service = self.service
        networks = {}
        for config in list_configs(self.data_dir):
            if self.node_id not in config.node_ids:
                continue
            server = service.servers.get(config.network_id)
            entry = {
                "version": config.version,
                "role": config.node(self.node_id).role,
                "serving": server is not None and server.engine is not None,
            }
            if server is not None:
                entry |= server.health_stats()
            networks[config.network_id] = entry
        gateways = {
            network_id: {
                "model": gateway.model_id,
                "running": sum(1 for s in list(gateway.sessions.values()) if s.lock.locked()),
                "healthy": gateway.healthy,
                "sessions": len(gateway.sessions),
            }
            for network_id, gateway in list(service.gateways.items())
        }
        health = {
            network_id: {
                node.node_id: {"state": node.state, "rtt_ms": node.rtt_ms}
                for node in list(monitor.nodes.values())
            }
            for network_id, monitor in list(service.health.items())
        }
        return {
            "node": heartbeat_stats(self.data_dir),
            "networks": networks,
            "gateways": gateways,
            "health": health,
        }

    # --- each answer -------------------------------------------------------------------------

    async def answered(
        self, gateway: Gateway, result: GenerationResult, owner: str | None, completed: bool
    ) -> None:
        """A gateway's answer ended (``Gateway.on_answer``): the counters here, the writes on
        the worker thread, awaited so that the caller's next request sees its tokens counted
        (a cancelled caller does not cancel the write)."""
        try:
            self.metrics.record_answer(gateway.network_id, gateway.model_id, result, not completed)
            caller = current_caller() or principal_of(owner)
            write = self._writer.submit(self._record, gateway.network_id, result, caller)
        except Exception:  # the answer is given; its figures must not break it
            log.exception("network %s: cannot record an answer", gateway.network_id)
            return
        await asyncio.shield(asyncio.wrap_future(write))

    def _record(self, network_id: str, result: GenerationResult, caller: Principal | None):
        """On the worker thread: the answer's tokens against its caller's quotas."""
        try:
            tokens = result.prompt_tokens + len(result.token_ids)
            if caller is not None and not caller.anonymous:
                self._count_tokens(caller, tokens)
        except Exception:  # logged; the answer was given
            log.exception("network %s: cannot record an answer", network_id)

    def _count_tokens(self, caller: Principal, tokens: int) -> None:
        try:
            if self._users is None:
                self._users = UserStore(self.data_dir)
            self._users.count_tokens(caller, tokens)
        except Exception:
            log.exception("cannot count %d tokens of account %s", tokens, caller.user_id)

    def flush(self) -> None:
        """Wait for the writes handed to the worker so far (tests, stop)."""
        self._writer.submit(lambda: None).result()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self._writer.shutdown(wait=True)
        if self._users is not None:
            self._users.close()
