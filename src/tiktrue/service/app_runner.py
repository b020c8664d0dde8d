"""``tiktrue app``: this PC's TikTrue in a window.

When the node service already runs from this data dir with its web UI (installed as a
service, or ``tiktrue node --api-port``), the app opens that UI. Otherwise the app runs the
node service itself, in this process, with the gateway and the UI on ``api_port``, so a PC in
no network yet (the first run) gets its welcome page; the node stops when the window closes
(or on Ctrl-C when the UI opened in the browser).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from pathlib import Path

import psutil

from tiktrue.monitoring.node_logging import setup_node_logging
from tiktrue.paths import run_file
from tiktrue.service.service_runner import NodeService
from tiktrue.ui.main_app import open_app

START_TIMEOUT_S = 120.0


def running_ui(data_dir: Path) -> str | None:
    """The UI of the node service running from ``data_dir``, if one runs with a UI."""
    path = run_file(data_dir)
    try:
        info = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not info.get("ui") or not psutil.pid_exists(int(info.get("pid", 0))):
        return None
    return info["ui"]


class NodeThread(threading.Thread):
    """A node service on its own event loop in a thread of this process (the main thread is
    the window's: GUI toolkits want it)."""

    def __init__(self, data_dir: Path, **options) -> None:
        super().__init__(name="tiktrue-node", daemon=True)
        setup_node_logging(data_dir)  # <data>/logs/node.log, as `tiktrue node` does
        self.service = NodeService(data_dir, web_ui=True, **options)
        self.port_text = f"{options.get('api_host', '127.0.0.1')}:{options.get('api_port')}"
        self.started = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._quit: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # uvicorn exits the loop when it cannot bind
            self.error = self.error or exc
            self.started.set()

    async def _main(self) -> None:
        self._loop, self._quit = asyncio.get_running_loop(), asyncio.Event()
        try:
            await self.service.start()
        except BaseException as exc:  # reported to the caller (a port in use, ...)
            self.error = exc
            self.started.set()
            return
        self.started.set()
        try:
            await self._quit.wait()
        finally:
            await self.service.stop()

    def wait_started(self, timeout: float = START_TIMEOUT_S) -> str:
        """The UI's URL once the node listens; raises what stopped it from starting."""
        if not self.started.wait(timeout):
            raise TimeoutError(f"the node service did not start in {timeout:.0f} s")
        if isinstance(self.error, SystemExit):  # uvicorn's way of saying it cannot bind
            raise OSError(f"the UI's address cannot be used (is {self.port_text} taken?)")
        if self.error is not None:
            raise self.error
        return self.service.ui_url

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._quit is not None and self.is_alive():
            self._loop.call_soon_threadsafe(self._quit.set)
        self.join(timeout)


def _check_free(host: str, port: int | None) -> None:
    """Fail clearly, before starting anything, when the UI's port is taken."""
    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        if os.name != "nt":  # as uvicorn binds: a port in TIME_WAIT is free
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(
                f"{host}:{port} is in use ({exc.strerror}); pick another with --port"
            ) from None


def run_app(data_dir: Path, *, native: bool | None = None, log=print, **node_options) -> None:
    """Open this PC's UI, running the node service here when none runs (see the module)."""
    url = running_ui(data_dir)
    if url is not None:
        log(f"TikTrue runs on this PC: {url}")
        open_app(url, native=native)
        return
    _check_free(node_options.get("api_host", "127.0.0.1"), node_options.get("api_port"))
    node = NodeThread(data_dir, **node_options)
    node.start()
    try:
        url = node.wait_started()
        log(f"TikTrue: {url} (this window's node service stops when it closes)")
        if not open_app(url, native=native):
            log("opened in the browser; press Ctrl-C to stop this PC's node service")
            while node.is_alive():  # until Ctrl-C (a join with a timeout: Windows too)
                node.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
