"""Starting the node process again (the ``restart_node`` task), the one OS-specific step.

POSIX: ``execv`` the same interpreter with the same command line (``sys.orig_argv``): the
process keeps its pid, so systemd and the launcher that started it see the same process come
back. Windows has no ``exec`` that keeps the process (``os.execv`` starts a new one and ends
this one): the node ends with ``RESTART_EXIT_CODE`` and the service manager's recovery action
(the Windows service restarts on failure) starts it again. Only the POSIX path is run here.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

RESTART_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"


def restart_process() -> NoReturn:
    if os.name == "nt":
        os._exit(RESTART_EXIT_CODE)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
