"""Lanes: independent pieces of work on one model, run side by side in threads that share its weights.

A stacked inner-loop step on a CPU keeps every core busy only inside its large matrix
multiplies; the rest (thousands of small elementwise and indexing operations, the autograd
engine, Python) runs on one core while the others wait. Two lanes, each a thread with its
share of the cores as intra-op threads and its own module tree over the same weight tensors,
fill that idle time with the other lane's work (benchmarks/README.md, "Stacked groups"). The
weights are not copied: a replica costs its module objects only.

Work on different lanes never shares state: each replica has its own modules (so its own
LoRA layers and routing), its own config (so its own attention implementation), and each lane
gets its own tokenizer (a fast tokenizer is not safe to call from two threads at once).

    replicas = model_replicas(model, 2)  # [model, a copy sharing model's weights]
    results = run_lanes([lambda: work(replicas[0]), lambda: work(replicas[1])])
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


def model_replicas(model: nn.Module, count: int) -> list[nn.Module]:
    """``model`` followed by ``count - 1`` copies of it that share its parameters and buffers.

    A copy's modules (and a transformers model's config) are its own: changing them, e.g.
    wrapping a linear layer with LoRA, leaves the others as they are. Its tensors are the
    original's: no weight memory is added, and a change to one weight changes every replica.
    Make replicas of a model without adapters attached, as the copies share every parameter.
    """
    if count < 1:
        raise ValueError(f"a model needs at least one lane, got {count}")
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return [model] + [copy.deepcopy(model, dict(shared)) for _ in range(count - 1)]


def run_lanes(work: Sequence[Callable[[], T]], threads: int | None = None) -> list[T]:
    """Call each of ``work`` in its own thread with ``threads // len(work)`` intra-op threads
    (at least 1; ``threads`` defaults to ``torch.get_num_threads()``), and return their
    results in order. A single piece of work runs in the calling thread, as it is.

    Every piece runs to its end before anything is raised: results already computed by the
    other lanes are not lost to the exception, which is raised after all have joined (the
    first in order, if several lanes failed).
    """
    if len(work) == 1:
        return [work[0]()]
    total = threads or torch.get_num_threads()
    per_lane = max(1, total // len(work))
    results: list = [None] * len(work)
    errors: list[BaseException | None] = [None] * len(work)

    def lane(index: int) -> None:
        # Intra-op thread counts are per thread (OpenMP's are): set in the lane, for the lane.
        torch.set_num_threads(per_lane)
        try:
            results[index] = work[index]()
        except BaseException as exc:  # re-raised in the caller's thread below
            errors[index] = exc

    lanes = [threading.Thread(target=lane, args=(i,), name=f"seal-lane-{i}") for i in range(len(work))]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    torch.set_num_threads(total)  # libraries whose thread count is global (MKL) follow the last call
    for error in errors:
        if error is not None:
            raise error
    return results


def balance(costs: Sequence[float], lanes: int) -> list[list[int]]:
    """Indices of ``costs`` split into at most ``lanes`` lists of near-equal total cost and at most
    ``ceil(len(costs) / lanes)`` items each: costliest first, each to the cheapest lane with room
    (ties: the lower lane). Each list is in index order; lanes left empty are dropped."""
    if lanes < 1:
        raise ValueError(f"need at least one lane, got {lanes}")
    room = -(-len(costs) // lanes)
    assigned: list[list[int]] = [[] for _ in range(lanes)]
    loads = [0.0] * lanes
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        lane = min((j for j in range(lanes) if len(assigned[j]) < room), key=lambda j: (loads[j], j))
        assigned[lane].append(index)
        loads[lane] += costs[index]
    return [sorted(items) for items in assigned if items]
