"""``Pywin32Scm``: the calls into Windows' service manager (pywin32's ``win32serviceutil`` and
``win32service``), the only place they are made; behind ``os_service.ScmApi``.

Windows only: it imports pywin32, which exists there alone. Written to pywin32's documented
API; not run here (the logic around it is tested with a recorded service manager).
"""

from __future__ import annotations

import win32api
import win32con
import win32service
import win32serviceutil
import winerror

from tiktrue.service.scm_api import STOP_TIMEOUT_S, ScmApi

_STATES = {
    win32service.SERVICE_STOPPED: "stopped",
    win32service.SERVICE_START_PENDING: "starting",
    win32service.SERVICE_STOP_PENDING: "stopping",
    win32service.SERVICE_RUNNING: "running",
    win32service.SERVICE_CONTINUE_PENDING: "starting",
    win32service.SERVICE_PAUSE_PENDING: "stopping",
    win32service.SERVICE_PAUSED: "paused",
}


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
