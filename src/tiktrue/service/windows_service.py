"""The Windows service ``TiktrueWorkerService`` (pywin32), and the calls into Windows' service
manager that :class:`~tiktrue.service.os_service.WindowsManager` makes.

Windows only: it imports pywin32, which exists there alone. Written to pywin32's documented
API (``win32serviceutil.ServiceFramework``, ``servicemanager``, ``win32service``) and not run
here; what it does on top of that API is in :mod:`tiktrue.service.service_host` and
:mod:`tiktrue.service.os_service`, tested on Linux.

Hosting: the service manager starts the bundle's ``service_runner.exe --windows-service`` (or
``python -m tiktrue.service.windows_service`` outside the bundle), which hands the process to
the service dispatcher (:func:`host_service`). The node runs in the service's thread; a stop
request sets its stop event; a node that fails raises out of ``SvcDoRun``, which pywin32
reports as a stop with an error, and the recovery actions (set at install, with the flag
for such stops) start it again.
"""

from __future__ import annotations

import servicemanager
import win32service
import win32serviceutil

from tiktrue.service.os_service import (
    DESCRIPTION,
    DISPLAY_NAME,
    STOP_TIMEOUT_S,
    WINDOWS_SERVICE_NAME,
    WindowsManager,
)
from tiktrue.service.service_host import ServiceHost
from tiktrue.service.windows_scm import Pywin32Scm


class NodeFailed(Exception):
    """Raised out of SvcDoRun so that the service manager sees a failure."""


class TiktrueWorkerService(win32serviceutil.ServiceFramework):
    _svc_name_ = WINDOWS_SERVICE_NAME
    _svc_display_name_ = DISPLAY_NAME
    _svc_description_ = DESCRIPTION

    def __init__(self, args) -> None:
        super().__init__(args)
        data_dir, options = WindowsManager(Pywin32Scm()).options()
        self.host = ServiceHost(data_dir, options.as_kwargs())

    def SvcStop(self) -> None:  # noqa: N802 (pywin32's name)
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=STOP_TIMEOUT_S * 1000)
        self.host.stop()

    def SvcShutdown(self) -> None:  # noqa: N802 (the PC shuts down: stop as on a stop request)
        self.SvcStop()

    def SvcDoRun(self) -> None:  # noqa: N802
        if self.host.run() != 0:
            raise NodeFailed("the node service stopped on an error (see <data>\\logs\\node.log)")


def host_service() -> None:
    """Hand this process to the service dispatcher (the service manager started it)."""
    servicemanager.Initialize()
    servicemanager.PrepareToHostSingle(TiktrueWorkerService)
    servicemanager.StartServiceCtrlDispatcher()


if __name__ == "__main__":  # python -m tiktrue.service.windows_service (outside the bundle)
    host_service()
