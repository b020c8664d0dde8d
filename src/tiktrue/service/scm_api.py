"""``ScmApi``: the few calls into Windows' service manager that the service needs, as an
interface (``windows_scm.Pywin32Scm`` makes them on Windows; tests record them here)."""

from __future__ import annotations

from abc import ABC, abstractmethod

STOP_TIMEOUT_S = 60  # the node saves what it keeps and closes its sockets in a few seconds


class ScmApi(ABC):
    """The few calls into Windows' service manager that the service needs (pywin32's
    ``win32serviceutil`` and ``win32service``): the only place they are made."""

    @abstractmethod
    def install(self, name: str, display: str, description: str, exe: str, args: str) -> None:
        """Create the service: own process, automatic start (delayed), LocalSystem."""

    @abstractmethod
    def set_recovery(self, name: str, delays_s: tuple[int, ...], reset_s: int) -> None:
        """``sc failure`` and ``sc failureflag 1``: restart after a crash and after a stop
        with an error."""

    @abstractmethod
    def set_option(self, name: str, option: str, value: str) -> None: ...

    @abstractmethod
    def get_option(self, name: str, option: str) -> str | None: ...

    @abstractmethod
    def remove(self, name: str) -> None: ...

    @abstractmethod
    def start(self, name: str) -> None: ...

    @abstractmethod
    def stop(self, name: str) -> None: ...

    @abstractmethod
    def query(self, name: str) -> dict | None:
        """``{"state": ..., "pid": ..., "auto_start": ..., "command": ...}``; None if absent."""
