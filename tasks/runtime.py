"""What a worker process keeps between tasks: loaded models, one lock per model.

Each process loads a model once and reuses it across tasks: the flow's own process with the
local runner, each Ray worker with the Ray runner (Ray keeps its worker processes, and so these
module globals, for the whole flow run). Inner loops attach LoRA layers to the shared model in
place, so tasks that use a model hold its lock; on a CPU they would only compete for the same
cores anyway.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from models.base_model import LoadedModel, load_model
from models.config import LoraConfig, ModelConfig
from models.inner_loop import AdapterSlot
from models.process import configure_process, release_freed_memory
from models.stacked_lora import AdapterLanes
from tasks.records import PolicyRef

# One model at a time: a flow's tasks use one policy for long stretches (an iteration uses only
# its policy; held-out evaluation finds the base model's columns cached after the first), and
# reloading is cheap while a second resident copy is not (benchmarks/README.md, "Memory on a
# CPU"). (The few-shot held-out flow alternates: the policy writes each ARC task's configs, the
# base model is adapted.)
_MAX_LOADED = 1
_models: OrderedDict[tuple[str, str, str, str], tuple[LoadedModel, threading.Lock]] = OrderedDict()
_registry_lock = threading.Lock()
# id(model) -> its reusable LoRA layers: a peft slot (one adapter) or stacks (a group of them, in lanes)
_slots: dict[int, AdapterSlot | AdapterLanes] = {}


@contextmanager
def use_model(policy: PolicyRef, model: ModelConfig) -> Iterator[LoadedModel]:
    """The policy's model, loaded once per process, held exclusively for the block."""
    key = (policy.path, policy.digest, model.device, model.dtype)
    with _registry_lock:
        if key not in _models:
            configure_process()  # this worker's settings, before its first model (a no-op after)
            _evict(_MAX_LOADED - 1)  # before loading: the old and the new model never both resident
            start = time.perf_counter()
            loaded = load_model(policy.path, device=model.device, dtype=model.dtype)
            _logger().info(
                "loaded policy %s (%s) on %s in worker %s in %.1fs, %d torch threads",
                policy.name,
                policy.digest[:12],
                loaded.device,
                worker_id(),
                time.perf_counter() - start,
                torch.get_num_threads(),
            )
            _models[key] = (loaded, threading.Lock())
        _models.move_to_end(key)
        loaded, lock = _models[key]
    with lock:
        try:
            yield loaded
        finally:
            release_freed_memory()


def _evict(keep: int) -> None:
    """Forget the least recently used models beyond ``keep`` (hold ``_registry_lock``), and free
    them now: a model and its LoRA layers hold reference cycles, which Python's collector would
    otherwise free only when it next runs (the SmolLM2 flow's peak was the base model, still
    resident with its stacked adapters, under the next policy)."""
    if len(_models) <= keep:
        return
    while len(_models) > keep:
        _, (evicted, _) = _models.popitem(last=False)
        _slots.pop(id(evicted.model), None)
    del evicted
    gc.collect()
    release_freed_memory()


def adapter_slot(loaded: LoadedModel, lora: LoraConfig) -> AdapterSlot:
    """The reusable LoRA layers of a cached model (call inside ``use_model``, which holds its
    lock). Inner loops on this worker reset them instead of attaching new layers each time."""
    slot = _slots.get(id(loaded.model))
    if not isinstance(slot, AdapterSlot) or not slot.matches(lora):
        if slot is not None:
            slot.close()
        slot = _slots[id(loaded.model)] = AdapterSlot(loaded.model, lora)
    return slot


def adapter_lanes(loaded: LoadedModel, lora: LoraConfig, slots: int, lanes: int = 1) -> AdapterLanes:
    """The reusable stacked LoRA layers of a cached model, spread over ``lanes`` lanes with at
    least ``slots`` slots in all (call inside ``use_model``). Groups of inner loops reset them in
    place."""
    stacks = _slots.get(id(loaded.model))
    if (
        not isinstance(stacks, AdapterLanes)
        or not stacks.matches(lora)
        or len(stacks.stacks) != lanes
        or stacks.slots < slots
    ):
        if stacks is not None:
            stacks.close()
        stacks = _slots[id(loaded.model)] = AdapterLanes.attach(loaded.model, loaded.tokenizer, lora, slots, lanes)
    return stacks


def worker_id() -> str:
    """``host:pid`` of this process, as the model-load log lines name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _logger() -> logging.Logger | logging.LoggerAdapter:
    # The task run's logger, so the Prefect UI says which worker loaded what; tasks called as
    # plain functions (notebooks, tests) log to the module's logger.
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def clear_models() -> None:
    """Forget every loaded model and free it (tests, and before a policy update frees memory)."""
    with _registry_lock:
        _evict(0)
