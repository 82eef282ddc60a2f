"""How every SEAL task is cached and retried: the settings the tasks of each domain share.

Results are persisted and keyed by their inputs and the task's source (not the run id), so a new
run of the same config reuses every finished task and a changed setting recomputes only what
depends on it. The key holds no module name: a task moved to another module, its decorator and
body unchanged, keeps its key and its cached results.
"""

from __future__ import annotations

from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.tasks import exponential_backoff

from tasks.locking import FlockLockManager

# Keys from content and code, not the run id; "label(s)" only name task runs in the UI.
# Serializable: when two runs on one SEAL_HOME reach the same key, the second waits for the
# first's result instead of computing and writing the same files at the same time.
CACHED = (TASK_SOURCE + (INPUTS - "label" - "labels")).configure(
    isolation_level="SERIALIZABLE", lock_manager=FlockLockManager()
)
# Tasks that only read (files, the model hub) retry with backoff: 2, 4, 8 s. Training and
# evaluation do not retry: their failures are recorded, or mean a bug or a lack of memory.
TRANSIENT_BACKOFF = exponential_backoff(backoff_factor=2)
