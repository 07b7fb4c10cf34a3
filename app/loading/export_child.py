"""`python -m app.loading.export_child ARGS`: `python -m export ARGS` that dies with its parent.

The server exports in a child process (app.loading.loader). Killed with SIGKILL, the server could
not stop it: the export ran on as an orphan for 80 s with 2 GB (issue 20). On Linux this child asks
the kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), then checks that the parent
did not die before that took effect. The signal follows the thread that started the child: the
loader's thread waits for the child, so it outlives it. Its unfinished folder is removed at the
next start (app.loading.export_lock).

A failure that may not recur (a full or failing disk, memory exhausted) exits with
`EXIT_TRANSIENT` and a last line `TRANSIENT_TAG` + JSON (`kind`, `errno`, `path`, `error`), so
the loader does not remember it as a failed export (app.loading.export_memory) and the next
start tries again. Every other failure keeps `python -m export`'s exit code.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import runpy
import signal
import sys
import traceback
from typing import Any

PARENT_ENV = "GPT2_EXPORT_PARENT_PID"
PR_SET_PDEATHSIG = 1
EXIT_TRANSIENT = 75  # EX_TEMPFAIL (sysexits.h): try again later
TRANSIENT_TAG = "export_child: transient failure: "
# errno of a disk that is full or failing, or of memory exhausted: not the checkpoint's fault.
_TRANSIENT_ERRNO = {errno.ENOSPC: "no_space", errno.EDQUOT: "no_space", errno.EIO: "io_error",
                    errno.ENOMEM: "memory"}
# The same from writers that do not raise OSError (C++ file writers put strerror in the message).
_TRANSIENT_TEXT = {"No space left on device": "no_space", "Disk quota exceeded": "no_space"}


def die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            sys.stderr.write(f"export_child: prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}\n")
    parent = os.environ.get(PARENT_ENV)
    if parent and parent.isdigit() and os.getppid() != int(parent):
        sys.exit("export_child: the server that started this export is gone")


def transient_failure(e: BaseException | None) -> dict[str, Any] | None:
    """What makes `e`, or an exception it was raised from, a failure that may not recur (a full
    disk, an I/O error, memory exhausted), or None when it is the export's own failure."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        kind = None
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            kind = _TRANSIENT_ERRNO[e.errno]
        elif isinstance(e, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__):
            kind = "memory"  # MemoryError, torch.cuda.OutOfMemoryError
        else:
            kind = next((k for text, k in _TRANSIENT_TEXT.items() if text in str(e)), None)
        if kind is not None:
            code = getattr(e, "errno", None)
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
            return {"kind": kind, "errno": errno.errorcode.get(code) if isinstance(code, int) else None,
                    "path": getattr(e, "filename", None), "error": f"{type(e).__name__}: {first}"[:300]}
        e = e.__cause__ or e.__context__
    return None


def main() -> int:
    die_with_parent()
    sys.argv[0] = "python -m export"
    try:
        runpy.run_module("export", run_name="__main__", alter_sys=True)
    except Exception as e:
        info = transient_failure(e)
        if info is None:
            raise
        traceback.print_exc()
        sys.stderr.write(TRANSIENT_TAG + json.dumps(info, default=str) + "\n")
        return EXIT_TRANSIENT
    return 0


if __name__ == "__main__":
    sys.exit(main())
