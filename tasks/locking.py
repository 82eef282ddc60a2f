"""Cross-process task locks for Prefect's SERIALIZABLE isolation, released when a holder dies.

Two runs on the same ``SEAL_HOME`` that reach the same task (same cache key) must not both
compute it and write the same result and adapter files: with serializable isolation the second
waits for the first, then reads its cached result. Prefect's own ``FileSystemLockManager``
stores a lock as a file that outlives a killed holder, so a run resumed after a SIGKILL would
wait forever on its own dead lock. This one holds an ``fcntl.flock`` on a lock file instead;
the operating system releases it when the holder's process exits, however it exits.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from pathlib import Path

from models.paths import seal_home

_POLL_SECONDS = 0.1


class FlockLockManager:
    """Implements ``prefect.locking.protocol.LockManager`` with ``flock`` on one file per key.

    Lock files live under ``directory`` (default: ``$SEAL_HOME/locks``, resolved at each call so
    tests and processes that set ``SEAL_HOME`` later are honoured). Locks are exclusive between
    processes and between threads of one process (each acquisition opens its own descriptor).
    ``hold_timeout`` is not needed: a lock lives exactly as long as its holder.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self._directory = directory
        self._held: dict[str, tuple[str, int]] = {}  # key -> (holder, file descriptor)
        self._guard = threading.Lock()

    def __reduce__(self):
        # Tasks travel to Ray workers pickled, their cache policy with them: a worker gets a
        # manager of its own (locks belong to the process that holds them).
        return type(self), (self._directory,)

    def _path(self, key: str) -> Path:
        directory = self._directory or seal_home() / "locks"
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{key}.lock"

    def _try_lock(self, key: str, mode: int) -> int | None:
        fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        with self._guard:
            held = self._held.get(key)
            if held is not None and held[0] == holder:
                return True
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            fd = self._try_lock(key, fcntl.LOCK_EX)
            if fd is not None:
                with self._guard:
                    self._held[key] = (holder, fd)
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SECONDS)

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        return await asyncio.to_thread(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        with self._guard:
            held = self._held.get(key)
            if held is None or held[0] != holder:
                raise ValueError(f"no lock on {key!r} held by {holder!r}")
            del self._held[key]
        fcntl.flock(held[1], fcntl.LOCK_UN)
        os.close(held[1])

    def is_locked(self, key: str) -> bool:
        with self._guard:
            if key in self._held:
                return True
        fd = self._try_lock(key, fcntl.LOCK_SH)
        if fd is None:
            return True
        os.close(fd)
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with self._guard:
            held = self._held.get(key)
        return held is not None and held[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SECONDS)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.wait_for_lock, key, timeout)
