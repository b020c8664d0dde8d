"""The node service hosted by another program's thread: the Windows service's ``SvcDoRun``
runs it, the service manager's stop request (another thread) ends it.

Kept apart from :mod:`tiktrue.service.windows_service` (which needs pywin32) so that what the
Windows service does is tested on any PC: options in, a node that answers, a stop from another
thread, an exit status that tells a crash from a stop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from tiktrue.service.service_runner import run_node

log = logging.getLogger("tiktrue.node")


class ServiceHost:
    def __init__(self, data_dir: Path, node_options: dict[str, Any]) -> None:
        self.data_dir = Path(data_dir)
        self.node_options = node_options
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = False

    def run(self) -> int:
        """Serve until :meth:`stop`; 0 after a stop, 1 when the node failed (the service
        manager's recovery actions then start it again)."""
        try:
            asyncio.run(self._serve())
        except (Exception, SystemExit):  # uvicorn exits when it cannot bind its port
            log.exception("the node service stopped on an error")
            return 1
        return 0

    async def _serve(self) -> None:
        stop = asyncio.Event()
        with self._lock:
            self._loop, self._stop = asyncio.get_running_loop(), stop
            if self._stop_requested:
                stop.set()
        await run_node(self.data_dir, stop=stop, **self.node_options)

    def stop(self) -> None:
        """Ask the node to stop (from any thread); :meth:`run` returns once it has."""
        with self._lock:
            self._stop_requested = True
            if self._loop is not None and self._stop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)
