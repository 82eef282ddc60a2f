"""The knowledge tasks' own behaviour, called directly (``task.fn``), without a Prefect server."""

from pathlib import Path

import pytest
import torch

from models import inner_loop
from models.config import EvalConfig, InnerLoopConfig, LoraConfig, ModelConfig, RewardConfig
from tasks import knowledge
from tasks.policy import resolve_base_policy
from tasks.records import Context, SelfEditRecord

MODEL = ModelConfig(name="tiny-random", device="cpu")
CONTEXT = Context(
    id="ctx1",
    title="Kelthrop",
    context="Orvanne Kelthrop founded the guild in 1873.",
    questions=["Who founded the guild?", "When?"],
    answers=[["Orvanne Kelthrop"], ["1873"]],
)
EDIT = SelfEditRecord(
    index=0, text="1. Kelthrop founded it in 1873.", documents=["Kelthrop founded it in 1873."], prompt="p"
)
LORA, TRAIN, EVAL = LoraConfig(rank=4, alpha=8), InnerLoopConfig(epochs=1, max_length=64), EvalConfig(max_new_tokens=4)


@pytest.fixture
def base(seal_home):
    return resolve_base_policy.fn(MODEL)


def _train(base, edits, labels=None, lora=LORA, config=TRAIN):
    labels = labels or [f"edit{i}" for i in range(len(edits))]
    return knowledge.train_adapters.fn(base, MODEL, [(CONTEXT, e) for e in edits], "ctx1", labels, lora, config)


def _evaluate(base, adapters):
    labels = [f"edit{i}" for i in range(len(adapters))]
    return knowledge.evaluate_adapters.fn(base, MODEL, [CONTEXT] * len(adapters), adapters, "ctx1", labels, EVAL)


def test_adapters_are_saved_and_scored(base):
    adapters = _train(base, [EDIT, None])
    assert all(a.failure is None for a in adapters)
    assert adapters[0].steps == 2 and adapters[1].steps == 1  # self-edit + passage, passage alone
    for adapter in adapters:
        assert (knowledge.seal_home() / "adapters") in Path(adapter.path).parents
        assert (Path(adapter.path) / "adapter_model.safetensors").exists()
    scores = _evaluate(base, adapters)
    assert [len(s.predictions) for s in scores] == [2, 2] and all(s.failure is None for s in scores)


def test_a_group_trains_the_same_adapters_as_one_at_a_time(base):
    together = _train(base, [EDIT, None])
    alone = [_train(base, [EDIT])[0], _train(base, [None])[0]]
    for a, b in zip(together, alone):
        assert a.path == b.path and a.steps == b.steps
        assert a.mean_loss == pytest.approx(b.mean_loss, rel=1e-5)


def test_a_group_in_two_lanes_trains_and_scores_what_one_lane_does(base):
    edits = [
        EDIT,
        None,
        SelfEditRecord(index=2, text="x", documents=["The guild met in 1873.", "Kelthrop."], prompt="p"),
    ]
    one = _train(base, edits)
    two = _train(base, edits, config=TRAIN.model_copy(update={"lanes": 2}))
    for a, b in zip(one, two):
        assert a.steps == b.steps and a.tokens == b.tokens and Path(b.path).exists()
        assert a.mean_loss == pytest.approx(b.mean_loss, rel=1e-5)
    labels = [f"edit{i}" for i in range(len(two))]
    scored = [
        knowledge.evaluate_adapters.fn(base, MODEL, [CONTEXT] * len(two), two, "ctx1", labels, EVAL, lanes)
        for lanes in (1, 2)
    ]
    assert [s.predictions for s in scored[0]] == [s.predictions for s in scored[1]]


def test_a_group_larger_than_its_slots_trains_and_scores_what_all_at_once_does(base):
    edits = [
        EDIT,
        None,
        SelfEditRecord(index=2, text="x", documents=["The guild met in 1873.", "Kelthrop."], prompt="p"),
    ]
    at_once = _train(base, edits)
    queued = _train(base, edits, config=TRAIN.model_copy(update={"slots": 1, "lanes": 2}))  # one slot a lane
    for a, b in zip(at_once, queued):
        assert a.steps == b.steps and a.tokens == b.tokens and Path(b.path).exists()
        assert a.mean_loss == pytest.approx(b.mean_loss, rel=1e-5)
    labels = [f"edit{i}" for i in range(len(queued))]
    scored = [
        knowledge.evaluate_adapters.fn(base, MODEL, [CONTEXT] * 3, queued, "ctx1", labels, config, 2)
        for config in (EVAL, EVAL.model_copy(update={"batch_size": 4}))
    ]  # one generation; two
    assert [s.predictions for s in scored[0]] == [s.predictions for s in scored[1]]


def test_a_non_finite_loss_is_recorded_and_scores_zero(base, monkeypatch):
    from models.stacked_lora import lanes

    train_slots = lanes.train_slots

    def first_blows_up(stack, tokenizer, take, config, finished):  # as train_slots reports a NaN loss
        def report(job, slot, result):
            failed = inner_loop.NonFiniteLossError("loss became nan at step 3")
            finished(job, slot, failed if job.index == 0 else result)

        train_slots(stack, tokenizer, take, config, report)

    monkeypatch.setattr(lanes, "train_slots", first_blows_up)
    adapters = _train(base, [EDIT, None])
    assert adapters[0].path is None and adapters[0].failure.startswith("non-finite loss")
    assert adapters[1].failure is None and Path(adapters[1].path).exists()
    scores = _evaluate(base, adapters)
    assert scores[0].correct == [False, False] and scores[0].failure == adapters[0].failure
    assert scores[1].failure is None and len(scores[1].predictions) == 2
    selection = knowledge.select_self_edits.fn("ctx1", scores[1], scores[:1], [EDIT], RewardConfig())
    assert selection.rewards == [0] and selection.kept is None and selection.outcome == "no-valid-self-edit"


def test_out_of_memory_is_raised_so_the_task_run_fails_and_is_not_cached(base, monkeypatch):
    from models.stacked_lora import lanes
    from tasks.records import InnerLoopOutOfMemory

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(lanes, "train_slots", fail)
    with pytest.raises(InnerLoopOutOfMemory, match="ctx1: CUDA out of memory"):
        _train(base, [EDIT])


def test_a_missing_or_altered_adapter_is_stale_not_loaded(base):
    from tasks.records import StaleArtifact

    (adapter,) = _train(base, [EDIT])
    assert adapter.digest
    weights = Path(adapter.path) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    with pytest.raises(StaleArtifact, match="missing or altered"):
        _evaluate(base, [adapter])
    weights.unlink()
    with pytest.raises(StaleArtifact, match="missing or altered"):
        _evaluate(base, [adapter])


def test_an_empty_self_edit_trains_on_the_passage_and_is_never_kept(base):
    from tasks.records import EvalRecord

    empty = SelfEditRecord(index=1, text="!!!", documents=[], prompt="p")
    adapters = _train(base, [empty, EDIT, None])
    assert adapters[0].failure is None and adapters[0].steps == 1  # the passage, as passage-only trains
    assert adapters[0].mean_loss == pytest.approx(adapters[2].mean_loss, rel=1e-5)
    assert adapters[1].failure is None and adapters[1].steps == 2
    perfect = EvalRecord(predictions=["a"], correct=[True], f1=[1.0])
    none = EvalRecord(predictions=["b"], correct=[False], f1=[0.0])
    selection = knowledge.select_self_edits.fn("ctx1", none, [perfect, perfect], [empty, EDIT], RewardConfig())
    assert selection.rewards == [0.0, 1.0] and selection.kept == 1
    assert selection.failures[0].startswith("empty self-edit")


def test_training_seeds_give_their_own_adapters(base):
    seeds = [_train(base, [EDIT], config=TRAIN.model_copy(update={"seed": seed}))[0] for seed in (0, 1)]
    assert seeds[0].path != seeds[1].path and seeds[0].digest != seeds[1].digest
    assert _train(base, [EDIT])[0].digest == seeds[0].digest  # cached by content: the same folder


def test_a_failed_eval_record_scores_every_question_zero():
    from tasks.records import EvalRecord

    record = EvalRecord.failed(3, "out of memory: CUDA")
    assert record.correct == [False] * 3 and record.f1 == [0.0] * 3 and record.accuracy == 0.0
    assert record.failure == "out of memory: CUDA"
