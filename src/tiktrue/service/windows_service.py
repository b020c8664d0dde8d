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
import win32api
import win32con
import win32service
import win32serviceutil
import winerror

from tiktrue.service.os_service import (
    DESCRIPTION,
    DISPLAY_NAME,
    STOP_TIMEOUT_S,
    WINDOWS_SERVICE_NAME,
    ScmApi,
    WindowsManager,
)
from tiktrue.service.service_host import ServiceHost

_STATES = {
    win32service.SERVICE_STOPPED: "stopped",
    win32service.SERVICE_START_PENDING: "starting",
    win32service.SERVICE_STOP_PENDING: "stopping",
    win32service.SERVICE_RUNNING: "running",
    win32service.SERVICE_CONTINUE_PENDING: "starting",
    win32service.SERVICE_PAUSE_PENDING: "stopping",
    win32service.SERVICE_PAUSED: "paused",
}


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


class Pywin32Scm(ScmApi):
    def install(self, name: str, display: str, description: str, exe: str, args: str) -> None:
        win32serviceutil.InstallService(
            None,  # no PythonClass key: the host is our own executable
            name,
            display,
            startType=win32service.SERVICE_AUTO_START,
            exeName=exe,
            exeArgs=args,
            description=description,
            delayedstart=True,  # after boot's rush: the LAN is up when the node binds to it
        )

    def set_recovery(self, name: str, delays_s: tuple[int, ...], reset_s: int) -> None:
        actions = [(win32service.SC_ACTION_RESTART, delay * 1000) for delay in delays_s]
        with _service(name, win32service.SERVICE_ALL_ACCESS) as handle:
            win32service.ChangeServiceConfig2(
                handle,
                win32service.SERVICE_CONFIG_FAILURE_ACTIONS,
                {"ResetPeriod": reset_s, "RebootMsg": None, "Command": None, "Actions": actions},
            )
            # also when the service stops with an error (SvcDoRun raised), not only on a crash
            win32service.ChangeServiceConfig2(
                handle, win32service.SERVICE_CONFIG_FAILURE_ACTIONS_FLAG, True
            )

    def set_option(self, name: str, option: str, value: str) -> None:
        win32serviceutil.SetServiceCustomOption(name, option, value)

    def get_option(self, name: str, option: str) -> str | None:
        # read-only (pywin32's GetServiceCustomOption asks for write access): the app of a
        # person without admin rights reads where the service keeps its data
        path = f"SYSTEM\\CurrentControlSet\\Services\\{name}\\Parameters"
        try:
            key = win32api.RegOpenKeyEx(win32con.HKEY_LOCAL_MACHINE, path, 0, win32con.KEY_READ)
        except win32api.error:
            return None
        try:
            return win32api.RegQueryValueEx(key, option)[0]
        except win32api.error:
            return None
        finally:
            win32api.RegCloseKey(key)

    def remove(self, name: str) -> None:
        win32serviceutil.RemoveService(name)

    def start(self, name: str) -> None:
        win32serviceutil.StartService(name)
        win32serviceutil.WaitForServiceStatus(name, win32service.SERVICE_RUNNING, 60)

    def stop(self, name: str) -> None:
        win32serviceutil.StopServiceWithDeps(name, waitSecs=STOP_TIMEOUT_S)

    def query(self, name: str) -> dict | None:
        try:
            access = win32service.SERVICE_QUERY_STATUS | win32service.SERVICE_QUERY_CONFIG
            with _service(name, access, win32service.SC_MANAGER_CONNECT) as handle:
                status = win32service.QueryServiceStatusEx(handle)
                config = win32service.QueryServiceConfig(handle)
        except win32service.error as exc:
            if exc.winerror == winerror.ERROR_SERVICE_DOES_NOT_EXIST:
                return None
            raise
        return {
            "state": _STATES.get(status["CurrentState"], "unknown"),
            "pid": status["ProcessId"],
            "auto_start": config[1] == win32service.SERVICE_AUTO_START,
            "command": [config[3]],
        }


class _service:  # noqa: N801 (a context manager over a service handle)
    def __init__(
        self, name: str, access: int, manager_access: int = win32service.SC_MANAGER_ALL_ACCESS
    ) -> None:
        self.name, self.access, self.manager_access = name, access, manager_access

    def __enter__(self):
        self.scm = win32service.OpenSCManager(None, None, self.manager_access)
        try:
            self.handle = win32service.OpenService(self.scm, self.name, self.access)
        except BaseException:
            win32service.CloseServiceHandle(self.scm)
            raise
        return self.handle

    def __exit__(self, *exc) -> None:
        win32service.CloseServiceHandle(self.handle)
        win32service.CloseServiceHandle(self.scm)


if __name__ == "__main__":  # python -m tiktrue.service.windows_service (outside the bundle)
    host_service()
