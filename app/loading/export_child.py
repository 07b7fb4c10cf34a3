"""`python -m app.loading.export_child ARGS`: `python -m export ARGS` that dies with its parent.

The server exports in a child process (app.loading.loader). Killed with SIGKILL, the server could
not stop it: the export ran on as an orphan for 80 s with 2 GB (issue 20). On Linux this child asks
the kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), then checks that the parent
did not die before that took effect. The signal follows the thread that started the child: the
loader's thread waits for the child, so it outlives it. Its unfinished folder is removed at the
next start (app.loading.export_lock).
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PARENT_ENV = "GPT2_EXPORT_PARENT_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            sys.stderr.write(f"export_child: prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}\n")
    parent = os.environ.get(PARENT_ENV)
    if parent and parent.isdigit() and os.getppid() != int(parent):
        sys.exit("export_child: the server that started this export is gone")


if __name__ == "__main__":
    die_with_parent()
    sys.argv[0] = "python -m export"
    runpy.run_module("export", run_name="__main__", alter_sys=True)
