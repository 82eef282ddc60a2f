"""The knowledge tasks' own behaviour, called directly (``task.fn``), without a Prefect server."""

from pathlib import Path

import pytest
import torch

from models import inner_loop
from models.config import EvalConfig, InnerLoopConfig, LoraConfig, ModelConfig
from tasks import knowledge
from tasks.records import Context, SelfEditRecord

MODEL = ModelConfig(name="tiny-random", device="cpu")
CONTEXT = Context(id="ctx1", title="Kelthrop", context="Orvanne Kelthrop founded the guild in 1873.",
                  questions=["Who founded the guild?", "When?"], answers=[["Orvanne Kelthrop"], ["1873"]])
EDIT = SelfEditRecord(index=0, text="1. Kelthrop founded it in 1873.", documents=["Kelthrop founded it in 1873."],
                      prompt="p")
LORA, TRAIN, EVAL = LoraConfig(rank=4, alpha=8), InnerLoopConfig(epochs=1, max_length=64), EvalConfig(max_new_tokens=4)


@pytest.fixture
def base(seal_home):
    return knowledge.resolve_base_policy.fn(MODEL)


def test_adapter_is_saved_and_scored(base):
    adapter = knowledge.train_adapter.fn(base, MODEL, CONTEXT, EDIT, "edit0", LORA, TRAIN)
    assert adapter.failure is None and adapter.steps == 2
    assert (knowledge.seal_home() / "adapters") in Path(adapter.path).parents
    assert (Path(adapter.path) / "adapter_model.safetensors").exists()
    score = knowledge.evaluate_adapter.fn(base, MODEL, CONTEXT, adapter, "edit0", EVAL)
    assert len(score.predictions) == 2 and score.failure is None


def test_a_non_finite_loss_is_recorded_and_scores_zero(base, monkeypatch):
    def fail(*args, **kwargs):
        raise inner_loop.NonFiniteLossError("loss became nan")

    monkeypatch.setattr(inner_loop, "train_adapter", fail)
    adapter = knowledge.train_adapter.fn(base, MODEL, CONTEXT, EDIT, "edit0", LORA, TRAIN)
    assert adapter.path is None and adapter.failure.startswith("non-finite loss")
    score = knowledge.evaluate_adapter.fn(base, MODEL, CONTEXT, adapter, "edit0", EVAL)
    assert score.correct == [False, False] and score.failure == adapter.failure
    selection = knowledge.select_self_edits.fn("ctx1", score, [score])
    assert selection.rewards == [0] and selection.kept is None and selection.outcome == "no-valid-self-edit"


def test_out_of_memory_is_raised_so_the_task_run_fails_and_is_not_cached(base, monkeypatch):
    from tasks.records import InnerLoopOutOfMemory

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(inner_loop, "train_adapter", fail)
    with pytest.raises(InnerLoopOutOfMemory, match="ctx1 edit0: CUDA out of memory"):
        knowledge.train_adapter.fn(base, MODEL, CONTEXT, EDIT, "edit0", LORA, TRAIN)


def test_a_missing_or_altered_adapter_is_stale_not_loaded(base):
    from tasks.records import StaleArtifact

    adapter = knowledge.train_adapter.fn(base, MODEL, CONTEXT, EDIT, "edit0", LORA, TRAIN)
    assert adapter.digest
    weights = Path(adapter.path) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    with pytest.raises(StaleArtifact, match="missing or altered"):
        knowledge.evaluate_adapter.fn(base, MODEL, CONTEXT, adapter, "edit0", EVAL)
    weights.unlink()
    with pytest.raises(StaleArtifact, match="missing or altered"):
        knowledge.evaluate_adapter.fn(base, MODEL, CONTEXT, adapter, "edit0", EVAL)


def test_an_empty_self_edit_is_not_trained(base, monkeypatch):
    monkeypatch.setattr(inner_loop, "train_adapter", lambda *a, **k: pytest.fail("trained an empty self-edit"))
    empty = SelfEditRecord(index=1, text="!!!", documents=[], prompt="p")
    adapter = knowledge.train_adapter.fn(base, MODEL, CONTEXT, empty, "edit1", LORA, TRAIN)
    assert adapter.failure.startswith("empty self-edit")


def test_a_failed_eval_record_scores_every_question_zero():
    from tasks.records import EvalRecord

    record = EvalRecord.failed(3, "out of memory: CUDA")
    assert record.correct == [False] * 3 and record.f1 == [0.0] * 3 and record.accuracy == 0.0
    assert record.failure == "out of memory: CUDA"
