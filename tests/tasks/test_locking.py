"""The flock lock manager behind serializable task isolation."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tasks.locking import FlockLockManager


def test_a_lock_excludes_other_holders_until_released(tmp_path):
    locks = FlockLockManager(tmp_path)
    assert locks.acquire_lock("k", holder="a")
    assert locks.acquire_lock("k", holder="a")  # re-entrant for its holder
    assert locks.is_locked("k") and locks.is_lock_holder("k", "a") and not locks.is_lock_holder("k", "b")
    other = FlockLockManager(tmp_path)  # another process's view
    assert other.is_locked("k")
    assert not other.acquire_lock("k", holder="b", acquire_timeout=0.2)
    assert not other.wait_for_lock("k", timeout=0.2)
    with pytest.raises(ValueError, match="held by 'b'"):
        locks.release_lock("k", holder="b")
    locks.release_lock("k", holder="a")
    assert not other.is_locked("k") and other.wait_for_lock("k", timeout=0)
    assert other.acquire_lock("k", holder="b", acquire_timeout=0)
    other.release_lock("k", holder="b")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from tasks.locking import FlockLockManager
        FlockLockManager(Path({str(tmp_path)!r})).acquire_lock("k", holder="doomed")
        print("held", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    locks = FlockLockManager(tmp_path)
    assert locks.is_locked("k")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    assert locks.acquire_lock("k", holder="next", acquire_timeout=5)
    assert time.monotonic() - start < 1
    locks.release_lock("k", holder="next")
