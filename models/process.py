"""Settings of a process that runs the models, and giving freed memory back to the OS.

Nothing here happens on import: :func:`configure_process` applies the settings, called where a
process starts to run our code (the ``seal`` command, a worker before it loads a model in
``tasks.runtime.use_model``, a benchmark, the test session). Calling it again does no harm.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# oneDNN, PyTorch's CPU path for bf16 matrix multiplies, caches a primitive per shape (1,024 by
# default), each with its own scratch memory; packed training batches of ever new lengths fill it.
# 128 keeps resident memory flat at the same speed; no cache is far slower (benchmarks/README.md,
# "Memory on a CPU").
ONEDNN_CACHE_CAPACITY = 128
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter


def configure_process() -> None:
    """Apply the process settings the models are measured with; call it before the first model is
    loaded (both settings govern allocations that come after them). A no-op where already applied.
    """
    # Bounds oneDNN's per-shape cache (see ONEDNN_CACHE_CAPACITY); read at its first primitive; the environment wins.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    # Caps glibc's per-thread heaps, which Prefect's many threads would otherwise multiply.
    limit_malloc_arenas(MALLOC_ARENAS)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # musl has none
    except OSError:
        return None


_LIBC = _glibc()


def limit_malloc_arenas(count: int = MALLOC_ARENAS) -> None:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would).

    glibc gives threads their own 64 MB arenas, up to 8 per core, and memory freed in one cannot
    serve another: a flow run's many Prefect threads hold gigabytes spread over hundreds of
    mappings (benchmarks/README.md, "Memory on a CPU"). Call it before the model tasks' threads
    allocate (:func:`configure_process` does); a no-op off glibc.
    """
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_ARENA_MAX, count)


def release_freed_memory() -> None:
    """Give the heap memory that tensors freed back to the OS.

    glibc keeps freed memory for reuse: after a stacked group of inner loops the process holds
    far more than it uses, growing from task to task (benchmarks/README.md, "Memory on a CPU").
    Called after every model task; a no-op off glibc.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
