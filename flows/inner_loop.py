"""Submitted inner loops, seen by the flows as futures: train an adapter, then evaluate it.

A domain submits its tasks (``flows/knowledge.py``, ``flows/fewshot.py``) and wraps their futures
in these classes, so the outer loop and the held-out flows wait on, and read, every inner loop
the same way: ``adapter`` and ``score`` futures, and ``result()`` -> (AdapterRecord, EvalRecord),
where a stale cached adapter is trained again and running out of memory scores zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from prefect import get_run_logger

from tasks.records import AdapterRecord, Context, EvalRecord, InnerLoopOutOfMemory, SelfEditRecord, StaleArtifact

OUT_OF_MEMORY = "out of memory"


class InnerLoop:
    """The futures of one submitted inner loop: train an adapter, then evaluate it.

    ``submit(refresh)`` submits the two tasks (``refresh``: recompute, ignoring the cache) and
    returns their futures (adapter, score); ``questions`` is how many targets a failure scores zero.
    """

    def __init__(self, submit: Callable[[bool], tuple], questions: int) -> None:
        self.questions = questions
        self._submit_loop = submit
        self._submit(refresh=False)

    def _submit(self, refresh: bool) -> None:
        self.adapter, self.score = self._submit_loop(refresh)

    def result(self) -> tuple[AdapterRecord, EvalRecord]:
        """The adapter and its score.

        A cached adapter whose folder is gone or altered is trained again. An inner loop that
        ran out of memory scores zero, with the reason (its task run stays Failed, so a rerun
        tries it again).
        """
        try:
            try:
                return self._resolve()
            except StaleArtifact as exc:
                get_run_logger().warning("%s; training that adapter again", exc)
                self._submit(refresh=True)
                return self._resolve()
        except (InnerLoopOutOfMemory, torch.OutOfMemoryError, MemoryError) as exc:
            failure = f"{OUT_OF_MEMORY}: {str(exc)[:200]}"
            return AdapterRecord(path=None, failure=failure), EvalRecord.failed(self.questions, failure)

    def _resolve(self) -> tuple[AdapterRecord, EvalRecord]:
        # The adapter first: if training raised, that is the error to report, not the
        # evaluation left pending behind it.
        return self.adapter.result(), self.score.result()


class InnerLoopGroup:
    """Inner loops trained together and evaluated together: one train task and one evaluate
    task for the group (the knowledge domain's stacked adapters), a result per member.

    ``members`` behave like :class:`InnerLoop` (``adapter``/``score`` futures, ``result()``), so
    the flows treat grouped and single inner loops alike.
    """

    def __init__(self, submit, items: list[tuple[Context, SelfEditRecord | None, str]], label: str) -> None:
        self._submit_group, self.items, self.label = submit, items, label
        self._results: list[tuple[AdapterRecord, EvalRecord]] | None = None
        self._submit(refresh=False)
        self.members = [_GroupMember(self, i) for i in range(len(items))]

    def _submit(self, refresh: bool) -> None:
        self.adapter, self.score = self._submit_group(self.items, self.label, refresh)

    def results(self) -> list[tuple[AdapterRecord, EvalRecord]]:
        """Each member's adapter and score; as :meth:`InnerLoop.result`, a stale cached adapter
        is trained again and running out of memory scores every member zero, with the reason."""
        if self._results is None:
            try:
                try:
                    self._results = list(zip(self.adapter.result(), self.score.result()))
                except StaleArtifact as exc:
                    get_run_logger().warning("%s; training group %s again", exc, self.label)
                    self._submit(refresh=True)
                    self._results = list(zip(self.adapter.result(), self.score.result()))
            except (InnerLoopOutOfMemory, torch.OutOfMemoryError, MemoryError) as exc:
                failure = f"{OUT_OF_MEMORY}: {str(exc)[:200]}"
                self._results = [
                    (AdapterRecord(path=None, failure=failure), EvalRecord.failed(context.num_targets, failure))
                    for context, _, _ in self.items
                ]
        return self._results


class _GroupMember:
    def __init__(self, group: InnerLoopGroup, index: int) -> None:
        self.group, self.index = group, index

    @property
    def adapter(self):
        return self.group.adapter

    @property
    def score(self):
        return self.group.score

    def result(self) -> tuple[AdapterRecord, EvalRecord]:
        return self.group.results()[self.index]


class SeedMean:
    """The inner loops of one self-edit under several training seeds (``inner_loop.seeds``),
    seen by the flows as one inner loop: ``adapter``/``score`` wait for all of them, and
    ``result()`` pools their scores (accuracy is the mean over seeds)."""

    def __init__(self, members: list) -> None:
        self.members = members

    @property
    def adapter(self) -> AllOf:
        return AllOf([m.adapter for m in self.members])

    @property
    def score(self) -> AllOf:
        return AllOf([m.score for m in self.members])

    def result(self) -> tuple[AdapterRecord, EvalRecord]:
        """The first seed's adapter (with every seed's training time) and the pooled score."""
        results = [m.result() for m in self.members]
        adapter = results[0][0].model_copy(update={"seconds": sum(a.seconds for a, _ in results)})
        return adapter, EvalRecord.pooled([score for _, score in results])


class AllOf:
    """Futures waited on as one: final when all are."""

    def __init__(self, futures: list) -> None:
        self.futures = futures

    def wait(self, timeout: float | None = None) -> None:
        for future in self.futures:
            future.wait(timeout)

    @property
    def state(self):
        states = [f.state for f in self.futures]
        return next((state for state in states if not state.is_final()), states[-1])
