"""``tiktrue app``: this PC's TikTrue in a window.

When the node service already runs from this data dir with its web UI (``tiktrue node
--api-port``), or is installed as this PC's service (``tiktrue service install``), the app
opens that UI. Otherwise the app runs the
node service itself, in this process, with the gateway and the UI on ``api_port``, so a PC in
no network yet (the first run) gets its welcome page; the node stops when the window closes
(or on Ctrl-C when the UI opened in the browser).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tiktrue.monitoring.node_logging import setup_node_logging
from tiktrue.node.lan_address import LOOPBACK, choose_host, is_loopback, reach_note
from tiktrue.service.os_service import ServiceError, ServiceStatus, installed_service, running_node
from tiktrue.service.service_runner import NodeService
from tiktrue.ui.main_app import open_app

START_TIMEOUT_S = 120.0


def running_ui(data_dir: Path) -> str | None:
    """The UI of the node service running from ``data_dir``, if one runs with a UI."""
    info = running_node(data_dir)
    return info.get("ui") if info else None


def service_ui(
    find: Callable[[], ServiceStatus | None] = installed_service,
    *,
    timeout: float = START_TIMEOUT_S,
    log=print,
) -> str | None:
    """The UI of the node installed as this PC's service (it may keep its data elsewhere: the
    Windows service's is in ProgramData), waiting while it starts (after a boot); None when
    no service is installed. An installed service that is stopped, or runs without a UI, is
    an error: a node of the app's own would fight it for the ports."""
    status = find()
    if status is None or status.data_dir is None:
        return None
    deadline = time.monotonic() + timeout
    while status.running:
        node = running_node(status.data_dir)
        if node is not None:
            if not node.get("ui"):
                raise ServiceError(
                    f"the node service {status.name} runs without the web UI: install it "
                    "again with --api-port"
                )
            return node["ui"]
        if time.monotonic() > deadline:
            raise ServiceError(f"the node service {status.name} did not start in {timeout:.0f} s")
        log(f"waiting for the node service {status.name} to start ...")
        time.sleep(1.0)
        status = find() or status
    raise ServiceError(
        f"the node service {status.name} is {status.state}: start it with "
        "`tiktrue service start` (as administrator or root)"
    )


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
    url = running_ui(data_dir) or service_ui(log=log)
    if url is not None:
        log(f"TikTrue runs on this PC: {url}")
        open_app(url, native=native)
        return
    address = choose_host(node_options.get("host"))  # the node's, said before it starts
    api_host = node_options.get("api_host") or address.host
    node_options = {**node_options, "host": address.host, "api_host": api_host}
    for host in dict.fromkeys([api_host, LOOPBACK]):  # on a LAN address: HTTPS + loopback HTTP
        _check_free(host, node_options.get("api_port"))
    node = NodeThread(data_dir, **node_options)
    node.start()
    try:
        url = node.wait_started()
        log(f"TikTrue: {url} (this window's node service stops when it closes)")
        lan = node.service.http.lan_base if node.service.http else None
        log(f"other PCs: {lan}/" if lan and not is_loopback(api_host) else reach_note(api_host))
        if not open_app(url, native=native):
            log("opened in the browser; press Ctrl-C to stop this PC's node service")
            while node.is_alive():  # until Ctrl-C (a join with a timeout: Windows too)
                node.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
