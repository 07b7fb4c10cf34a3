"""One exporter per cache entry, across processes and hosts sharing `ONNX_CACHE_DIR`, and no
leftovers of dead exports.

Replicas on one cache volume (docs/DEPLOY.md's RWX volume) used to export the same checkpoint
together, each into its own temporary folder, and throw away all but one (issue 20). Now the first
to come holds a lock file in the cache folder, `.lock-<entry>`, made with O_CREAT|O_EXCL (atomic on
local filesystems and on NFSv3+), and exports; the others wait, then find its export and use it.

The rule for a dead holder: the holder touches its lock file every `stale_after / 6` seconds (a
heartbeat thread); a lock whose file has not changed for `stale_after` seconds
(EXPORT_LOCK_STALE_SECONDS) belongs to a dead process, and a waiter breaks it: it renames the file
away (one of several breakers wins the rename), removes the dead holder's temporary folder and
takes the lock. The clocks of the hosts sharing the volume must agree within a few seconds (NTP),
since the lock file's time is compared with the local clock. The lock only saves work: an export
is still written to a temporary folder and renamed into place, so a holder thought dead that
comes back cannot corrupt the cache (its rename loses, or its folder is gone and its export fails).

Leftovers: a temporary folder `.tmp-<entry>-<token>` belongs to the holder whose lock names its
token; any other (the holder was killed, by `kill -9` or a killed container) is removed by the
next process that takes a lock in the cache, and so are `.trash-*` folders. A live replica's work
in progress is never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

STALE_AFTER_S = 30.0
_TMP = re.compile(r"^\.tmp-(?P<entry>.+)-(?P<token>[0-9a-f]{32})$")
_MOVED_LOCK = re.compile(r"^\.lock-.+\.(stale|release)-[0-9a-f]{32}$")  # left by a process killed mid-release


def _lock_path(cache_dir: Path, entry: str) -> Path:
    return cache_dir / f".lock-{entry}"


def _read(path: Path) -> tuple[dict, float] | None:
    """(the holder's record, the file's mtime), or None when there is no lock. A record being
    written is read as {} (held, by whom is not known yet)."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}, time.time()
    try:
        record = json.loads(text)
    except ValueError:
        record = {}
    return (record if isinstance(record, dict) else {}), mtime


def _stale(mtime: float, stale_after: float) -> bool:
    return time.time() - mtime > stale_after


def _remove_folder(folder: Path) -> bool:
    """Move a dead export's `folder` out of the way, then delete it (a half-deleted folder never
    keeps its name). False if it was not there."""
    trash = folder.with_name(f".trash-{uuid.uuid4().hex}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return False  # never made, or another process took it first
    logger.warning("removed %s, left by an export that did not finish", folder)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def remove_leftovers(cache_dir: Path, stale_after: float = STALE_AFTER_S) -> list[Path]:
    """Remove what dead exports left in `cache_dir`: temporary folders no live lock names, and
    `.trash-*` folders. Returns the temporary folders removed."""
    removed: list[Path] = []
    try:
        names = os.listdir(cache_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        path = cache_dir / name
        if name.startswith(".trash-"):
            shutil.rmtree(path, ignore_errors=True)
            continue
        if _MOVED_LOCK.match(name):
            path.unlink(missing_ok=True)
            continue
        m = _TMP.match(name)
        if m is None:
            continue
        held = _read(_lock_path(cache_dir, m["entry"]))
        if held is not None and held[0].get("token") in (m["token"], None) and not _stale(held[1], stale_after):
            continue  # a live export's folder (or a lock being written: left for the next start)
        if _remove_folder(path):
            removed.append(path)
    return removed


class ExportLock:
    """The right to export `entry` into `cache_dir`. `acquire` waits while another process holds
    it; `tmp` is the folder this holder exports into."""

    def __init__(self, cache_dir: Path, entry: str, stale_after: float = STALE_AFTER_S) -> None:
        self.cache_dir, self.entry, self.stale_after = Path(cache_dir), entry, stale_after
        self.path = _lock_path(self.cache_dir, entry)
        self.token = uuid.uuid4().hex
        self.tmp = self.cache_dir / f".tmp-{entry}-{self.token}"
        self.waited_s = 0.0
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self, cancel: threading.Event | None = None, poll: float = 0.5) -> bool:
        """Take the lock, waiting for a live holder and breaking a dead one's; False if `cancel`
        was set while waiting. Leftovers of dead exports are removed first."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.cache_dir, self.stale_after)
        t0, told = time.monotonic(), -1e9
        while not self._create():
            held = _read(self.path)
            if held is not None and _stale(held[1], self.stale_after):
                self._break(held)
                continue
            if held is not None and time.monotonic() - told >= 30:
                who = held[0]
                logger.info("waiting for %s (pid %s on %s, exporting since %s) to export %s", self.path.name,
                            who.get("pid", "?"), who.get("host", "?"), who.get("since", "?"), self.entry)
                told = time.monotonic()
            if cancel is not None and cancel.wait(poll):
                return False
            if cancel is None:
                time.sleep(poll)
        self.waited_s = time.monotonic() - t0
        self._beat = threading.Thread(target=self._heartbeat, name="export-lock", daemon=True)
        self._beat.start()
        return True

    def still_held(self) -> bool:
        """Whether the lock file is still this holder's (False once another process took it over:
        its export may have failed because the new holder removed this one's folder)."""
        held = _read(self.path)
        return not self.lost and held is not None and held[0].get("token") == self.token

    def release(self) -> None:
        """Give the lock up (only if it is still this holder's)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(5)
        mine = self.path.with_name(f"{self.path.name}.release-{self.token}")
        try:
            os.rename(self.path, mine)
        except FileNotFoundError:
            return
        held = _read(mine)
        if held is not None and held[0].get("token") not in (self.token, None):
            # Someone broke this lock and took it: put theirs back (unless a newer one is there).
            with contextlib.suppress(OSError):
                os.link(mine, self.path)
        mine.unlink(missing_ok=True)

    # ---- internals -------------------------------------------------------------------------------
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        record = {"token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record))
        return True

    def _break(self, held: tuple[dict, float]) -> None:
        """Take a dead holder's lock away; the rename makes one breaker win."""
        stale = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            return
        now = _read(stale)
        if now is not None and not _stale(now[1], self.stale_after):
            # Its holder touched it after all: give it back.
            with contextlib.suppress(OSError):
                os.link(stale, self.path)
            stale.unlink(missing_ok=True)
            return
        record = (now or held)[0]
        logger.warning("export lock %s of pid %s on %s has had no heartbeat for %.0f s: taking it over",
                       self.path.name, record.get("pid", "?"), record.get("host", "?"), self.stale_after)
        token = record.get("token")
        if isinstance(token, str) and re.fullmatch(r"[0-9a-f]{32}", token):
            _remove_folder(self.cache_dir / f".tmp-{self.entry}-{token}")
        stale.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        every = max(0.2, self.stale_after / 6)
        while not self._stop.wait(every):
            held = _read(self.path)
            if held is None or held[0].get("token") != self.token:
                self.lost = True
                logger.warning("export lock %s was taken over (no heartbeat seen for %.0f s); exporting on",
                               self.path.name, self.stale_after)
                return
            try:
                os.utime(self.path)
            except OSError as e:
                logger.warning("cannot touch export lock %s: %s", self.path, e)
