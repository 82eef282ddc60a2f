"""Lanes (models/stacked_lora/lanes.py) and stacked adapters spread over them: replicas share weights and
nothing else, lanes run side by side with their share of the threads, and an adapter trained
in a lane is the adapter trained alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from models.base_model import load_model
from models.config import EvalConfig, InnerLoopConfig, LoraConfig
from models.stacked_lora import (
    AdapterLanes,
    AdapterStack,
    balance,
    evaluate_stacked,
    model_replicas,
    run_lanes,
    stacked_adapters,
    train_stacked,
)

LORA = LoraConfig(rank=4, alpha=8)
TRAIN = InnerLoopConfig(learning_rate=1e-2, epochs=2, batch_size=1, max_length=64)
DOCS = [
    ["Kelthrop\nOrvanne Kelthrop founded the Thessory Guild in 1873.", "Kelthrop\nIt had 412 members."],
    ["Sallowmere\nThe lantern weighs 37 kilograms.", "Sallowmere\nIt hangs in Brindlecourt.", "A third one."],
    ["Only one document for this adapter."],
    ["Kelthrop\nThe guild met in Brindlecourt every spring, under the old bridge by the river."],
]
SEEDS = [11, 12, 13, 14]


@pytest.fixture
def model(tmp_path):
    return load_model("tiny-random", home=tmp_path, device="cpu", dtype="float32")


def test_replicas_share_weights_and_buffers_but_not_modules_or_config(model):
    original, copy = model_replicas(model.model, 2)
    assert original is model.model
    assert [p.data_ptr() for p in copy.parameters()] == [p.data_ptr() for p in original.parameters()]
    assert [b.data_ptr() for b in copy.buffers()] == [b.data_ptr() for b in original.buffers()]
    assert copy.config is not original.config
    copy.config._attn_implementation = "eager"
    assert original.config._attn_implementation != "eager"
    stack = AdapterStack.attach(copy, LORA, slots=2)  # LoRA layers on the copy only
    assert not any("lora" in name for name, _ in original.named_parameters())
    stack.close()


def test_run_lanes_gives_each_lane_its_share_of_threads_and_results_in_order():
    total = torch.get_num_threads()
    seen = []

    def work(value):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return value * 10

    assert run_lanes([lambda: work(1), lambda: work(2)], threads=2) == [10, 20]
    assert sorted(seen) == [("seal-lane-0", 1), ("seal-lane-1", 1)]
    assert torch.get_num_threads() == 2
    torch.set_num_threads(total)
    seen.clear()
    assert run_lanes([lambda: work(3)]) == [30]
    assert seen == [(threading.current_thread().name, total)]  # one piece: in the caller, untouched


def test_a_failing_lane_lets_the_others_finish_then_raises():
    done = []

    def slow():
        threading.Event().wait(0.2)
        done.append("slow")
        return 1

    def failing():
        raise ValueError("lane 1 broke")

    with pytest.raises(ValueError, match="lane 1 broke"):
        run_lanes([slow, failing], threads=2)
    assert done == ["slow"]


@pytest.mark.parametrize(
    "costs, lanes, expected",
    [
        ([5, 1, 1, 1, 4, 2], 2, [[0, 1, 2], [3, 4, 5]]),  # 7 and 7, three each
        ([9, 1, 1, 1], 2, [[0, 3], [1, 2]]),  # at most two each, however uneven
        ([3, 3, 3], 4, [[0], [1], [2]]),  # no empty lanes
        ([1, 2], 1, [[0, 1]]),
    ],
)
def test_balance(costs, lanes, expected):
    assert balance(costs, lanes) == expected


def test_balance_needs_a_lane():
    with pytest.raises(ValueError, match="at least one lane"):
        balance([1.0], 0)


def test_adapters_trained_in_lanes_are_the_adapters_trained_together(model, tmp_path):
    questions = [["Who founded the guild?"], ["What does the lantern weigh?", "Where?"], ["What?"], ["When?"]]
    answers = [[["Kelthrop"]], [["37"], ["Brindlecourt"]], [["x"]], [["spring"]]]
    config = EvalConfig(max_new_tokens=4, batch_size=8)
    with stacked_adapters(model.model, LORA, SEEDS) as stack:
        together = train_stacked(stack, model.tokenizer, DOCS, TRAIN)
        for k in range(len(DOCS)):
            stack.save(k, tmp_path / f"together-{k}")
        scored_together = evaluate_stacked(stack, model.tokenizer, questions, answers, config)

    lanes = AdapterLanes.attach(model.model, model.tokenizer, LORA, slots=4, lanes=2)
    try:
        start = time.perf_counter()
        results = lanes.train(DOCS, TRAIN, SEEDS)
        elapsed = time.perf_counter() - start
        assert sorted(lane for lane, _ in lanes.placement) == [0, 0, 1, 1]
        for k in range(len(DOCS)):
            lanes.save(k, tmp_path / f"lanes-{k}")
        kept = [layer.lora_A.clone() for layer in lanes.stacks[0].layers.values()]
        # every lane's adapters in lane 0's stack, enlarged for the call
        in_lanes = lanes.evaluate_saved([tmp_path / f"lanes-{k}" for k in range(len(DOCS))], questions, answers, config)
        for before, layer in zip(kept, lanes.stacks[0].layers.values(), strict=True):
            assert torch.equal(layer.lora_A, before)  # lane 0's own weights are back
        loaded = lanes.evaluate_saved(
            [tmp_path / f"together-{k}" for k in range(len(DOCS))], questions, answers, config
        )
    finally:
        lanes.close()
    assert not any("lora" in name for name, _ in model.model.named_parameters())
    for k in range(len(DOCS)):
        assert results[k].steps == together[k].steps and results[k].tokens == together[k].tokens
        assert results[k].mean_loss == pytest.approx(together[k].mean_loss, rel=1e-5)
        assert 0 < results[k].seconds <= elapsed  # its lane's wall time
        mine, theirs = (
            load_file(tmp_path / f"lanes-{k}" / "adapter_model.safetensors"),
            load_file(tmp_path / f"together-{k}" / "adapter_model.safetensors"),
        )
        for name in theirs:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-6)
    assert [len(r.predictions) for r in in_lanes] == [1, 2, 1, 1]
    assert (
        [r.predictions for r in in_lanes] == [r.predictions for r in loaded] == [r.predictions for r in scored_together]
    )


def test_a_group_larger_than_the_lanes_hold_needs_folders(model):
    lanes = AdapterLanes.attach(model.model, model.tokenizer, LORA, slots=2, lanes=2)
    try:
        with pytest.raises(ValueError, match="does not fit 2 lane"):
            lanes.train(DOCS, TRAIN, SEEDS)
        with pytest.raises(ValueError, match="4 seeds and 3 folders for 4 adapters"):
            lanes.train(DOCS, TRAIN, SEEDS, folders=["a", "b", "c"])
        with pytest.raises(ValueError, match="seeds for"):
            lanes.train(DOCS[:2], TRAIN, SEEDS)
    finally:
        lanes.close()


def test_a_group_larger_than_the_lanes_hold_trains_as_a_queue_through_its_folders(model, tmp_path):
    """Four adapters through two lanes of one slot: each is saved as it finishes and the next
    starts in its slot; the saved adapters and their answers are those trained together."""
    questions = [["Who founded the guild?"], ["What does the lantern weigh?", "Where?"], ["What?"], ["When?"]]
    answers = [[["Kelthrop"]], [["37"], ["Brindlecourt"]], [["x"]], [["spring"]]]
    config = EvalConfig(max_new_tokens=4, batch_size=8)
    with stacked_adapters(model.model, LORA, SEEDS) as stack:
        together = train_stacked(stack, model.tokenizer, DOCS, TRAIN)
        scored_together = evaluate_stacked(stack, model.tokenizer, questions, answers, config)
        for k in range(len(DOCS)):
            stack.save(k, tmp_path / f"together-{k}")

    lanes = AdapterLanes.attach(model.model, model.tokenizer, LORA, slots=2, lanes=2)
    folders = [tmp_path / f"queued-{k}" for k in range(len(DOCS))]
    try:
        results = lanes.train(DOCS, TRAIN, SEEDS, folders=folders)
        assert lanes.placement == []
        with pytest.raises(ValueError, match="saved to its folders"):
            lanes.save(0, tmp_path / "nowhere")
        scored = lanes.evaluate_saved(folders, questions, answers, config)  # in lane 0, enlarged to 4
        assert [layer.lora_A.shape[0] for layer in lanes.stacks[0].layers.values()] == [1] * len(lanes.stacks[0].layers)
    finally:
        lanes.close()
    for k in range(len(DOCS)):
        assert (results[k].steps, results[k].tokens) == (together[k].steps, together[k].tokens)
        assert results[k].mean_loss == pytest.approx(together[k].mean_loss, rel=1e-5)
        mine, theirs = (
            load_file(folders[k] / "adapter_model.safetensors"),
            load_file(tmp_path / f"together-{k}" / "adapter_model.safetensors"),
        )
        for name in theirs:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-6)
    assert [r.predictions for r in scored] == [r.predictions for r in scored_together]
