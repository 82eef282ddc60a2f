"""Lanes: independent pieces of work on one model, run side by side in threads that share its weights,
and a group's adapters spread over them.

A stacked inner-loop step on a CPU keeps every core busy only inside its large matrix
multiplies; the rest (thousands of small elementwise and indexing operations, the autograd
engine, Python) runs on one core while the others wait. Two lanes, each a thread with its
share of the cores as intra-op threads and its own module tree over the same weight tensors,
fill that idle time with the other lane's work (benchmarks/README.md, "Stacked groups"). The
weights are not copied: a replica costs its module objects only.

Work on different lanes never shares state: each replica has its own modules (so its own
LoRA layers and routing), its own config (so its own attention implementation), and each lane
gets its own tokenizer (a fast tokenizer is not safe to call from two threads at once).
:class:`AdapterLanes` keeps an :class:`AdapterStack` on each replica and trains each stack's
share of a group in its own lane.

    replicas = model_replicas(model, 2)  # [model, a copy sharing model's weights]
    results = run_lanes([lambda: work(replicas[0]), lambda: work(replicas[1])])
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.config import EvalConfig, InnerLoopConfig, LoraConfig
from models.errors import NonFiniteLossError
from models.inner_loop import EvalResult, TrainResult
from models.stacked_lora.evaluation import adapter_chunks, evaluate_stacked
from models.stacked_lora.stack import AdapterStack
from models.stacked_lora.scheduler import TrainJob, train_slots

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
    lane_threads = max(1, total // len(work))
    results: list = [None] * len(work)
    errors: list[BaseException | None] = [None] * len(work)

    def lane(index: int) -> None:
        # Intra-op thread counts are per thread (OpenMP's are): set in the lane, for the lane.
        torch.set_num_threads(lane_threads)
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


_STEP_CHARS = 120


class AdapterLanes:
    """Adapters spread over :class:`AdapterStack` s on replicas of one model (:func:`model_replicas`),
    each stack's share trained in its own lane (a thread with its share of the cores); with one
    lane, a single stack on the model itself, in the calling thread. Evaluation loads saved
    adapters into lane 0's stack: generation gains from one batch over many of them.

    Adapter i of a group that fits lives in slot ``placement[i]`` = ``(lane, slot)``, where
    :meth:`train` placed it by its documents' length (lanes of near-equal work); :meth:`save`
    follows the placement. A larger group trains as a queue over the slots, each adapter saved
    to its folder as it finishes. Either way a group is evaluated from its folders
    (:meth:`evaluate_saved`). Results do not depend on the lanes or the slots: each adapter
    trains exactly as alone (see :func:`train_slots`).

        lanes = AdapterLanes.attach(model, tokenizer, lora, slots=4, lanes=2)
        results = lanes.train(documents, config, seeds=[0] * len(documents), folders=folders)
        scores = lanes.evaluate_saved(folders, questions, answers, eval_config)
        lanes.close()
    """

    def __init__(self, stacks: Sequence[AdapterStack], tokenizers: Sequence[PreTrainedTokenizerBase]):
        self.stacks, self.tokenizers = list(stacks), list(tokenizers)
        self.groups: list[list[int]] = []  # the group's adapter indices in each lane, lane 0 first

    @classmethod
    def attach(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lora: LoraConfig, slots: int, lanes: int = 1
    ) -> AdapterLanes:
        """A stack on each of ``lanes`` replicas of ``model`` (the first is ``model`` itself),
        ``slots`` in all (each lane's share rounded up). ``model`` must have no adapters attached."""
        replicas = model_replicas(model, lanes)
        slots_per_lane = -(-slots // lanes)
        stacks = [AdapterStack.attach(replica, lora, slots_per_lane) for replica in replicas]
        return cls(stacks, [tokenizer] + [copy.deepcopy(tokenizer) for _ in range(lanes - 1)])

    @property
    def slots(self) -> int:
        """Adapters training at once: every lane's slots."""
        return sum(stack.slots for stack in self.stacks)

    def matches(self, lora: LoraConfig) -> bool:
        return self.stacks[0].matches(lora)

    @property
    def placement(self) -> list[tuple[int, int]]:
        """``(lane, slot)`` of each adapter of the group, in order (none after a group that
        did not fit: its adapters went to their folders)."""
        where = {index: (lane, slot) for lane, items in enumerate(self.groups) for slot, index in enumerate(items)}
        return [where[index] for index in range(len(where))]

    def train(
        self,
        documents: Sequence[Sequence[str]],
        config: InnerLoopConfig,
        seeds: Sequence[int],
        folders: Sequence[Path] | None = None,
    ) -> list[TrainResult | NonFiniteLossError]:
        """Fresh adapters (adapter i from ``seeds[i]``), adapter i trained on ``documents[i]``
        (:func:`train_slots` in each lane); one result per adapter, in order, its ``seconds``
        from its first step to its last.

        Adapters start longest first. With ``folders``, adapter i is saved to ``folders[i]`` as
        soon as it finishes (unless its loss became non-finite) and its slot takes the next
        adapter not yet started, whichever lane frees first: the group may be larger than the
        lanes hold, and every slot stays busy until the last adapters. Without ``folders`` the
        group must fit; its adapters stay in place for :meth:`save`.

        Raises:
            ValueError: if the group does not fit without ``folders``, or the lists differ in length.
        """
        if len(seeds) != len(documents) or (folders is not None and len(folders) != len(documents)):
            given = f"{len(seeds)} seeds" + ("" if folders is None else f" and {len(folders)} folders")
            raise ValueError(f"{given} for {len(documents)} adapters")
        if not documents or (folders is None and len(documents) > self.slots):
            raise ValueError(
                f"a group of {len(documents)} adapters does not fit {len(self.stacks)} lane(s) "
                f"of {self.stacks[0].slots}"
            )
        # An adapter's work: its characters (tokens) plus, per document (a step each epoch), what
        # a step costs besides its rows (benchmarks/README.md: a step's fixed cost, in characters).
        costs = [sum(len(d) + _STEP_CHARS for d in docs) for docs in documents]
        order = sorted(range(len(documents)), key=lambda i: (-costs[i], i))
        first, rest = order[: self.slots], order[self.slots :]
        lanes = [sorted(first[j] for j in items) for items in balance([costs[i] for i in first], len(self.stacks))]
        self.groups = [] if rest else lanes  # slot j of lane l holds lanes[l][j] at the start
        queue, lock = iter(rest), threading.Lock()
        results: list[TrainResult | NonFiniteLossError | None] = [None] * len(documents)

        def lane_work(lane: int) -> None:
            own = iter(lanes[lane])

            def take() -> TrainJob | None:
                index = next(own, None)
                if index is None:
                    with lock:
                        index = next(queue, None)
                return None if index is None else TrainJob(index, documents[index], seeds[index])

            def finished(job: TrainJob, slot: int, result: TrainResult | NonFiniteLossError) -> None:
                if folders is not None and not isinstance(result, NonFiniteLossError):
                    self.stacks[lane].save(slot, folders[job.index])
                results[job.index] = result

            train_slots(self.stacks[lane], self.tokenizers[lane], take, config, finished)
            self.stacks[lane].count = max(1, len(lanes[lane]))

        run_lanes([partial(lane_work, lane) for lane in range(len(lanes))])
        return results

    def evaluate_saved(
        self,
        folders: Sequence[Path],
        questions: Sequence[Sequence[str]],
        answers: Sequence[Sequence[Sequence[str]]],
        config: EvalConfig,
    ) -> list[EvalResult]:
        """:func:`evaluate_stacked` of saved adapters (``questions[i]`` for the one in
        ``folders[i]``), in the calling thread with all its threads: as many adapters at a time
        as one generation of ``config.batch_size`` rows takes, loaded straight into lane 0's
        stack, enlarged for the call (:meth:`AdapterStack.resized`). The lanes' own adapters
        are as they were afterwards."""
        if not len(folders) == len(questions) == len(answers):
            raise ValueError(f"{len(folders)} adapters, questions for {len(questions)}, answers for {len(answers)}")
        if not folders:
            return []
        chunks = adapter_chunks([len(q) for q in questions], config.batch_size)
        stack, results = self.stacks[0], []
        with stack.resized(max(stop - first for first, stop in chunks)):
            for first, stop in chunks:
                stack.load(folders[first:stop])
                results += evaluate_stacked(
                    stack, self.tokenizers[0], questions[first:stop], answers[first:stop], config
                )
        return results

    def save(self, index: int, folder: Path) -> Path:
        """Adapter ``index`` of the group in PEFT's format (see :meth:`AdapterStack.save`).

        Raises:
            ValueError: if the adapter is not in a slot (a group that did not fit was saved to its
                folders as it trained)."""
        placement = self.placement
        if index >= len(placement):
            raise ValueError(
                f"adapter {index} is not in the lanes' slots: a group larger than they hold "
                "is saved to its folders while it trains"
            )
        lane, slot = placement[index]
        return self.stacks[lane].save(slot, folder)

    def close(self) -> None:
        """Put the original layers back on every replica."""
        for stack in self.stacks:
            stack.close()
