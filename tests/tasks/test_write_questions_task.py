"""The question-writing task: generated pairs become a context's questions, and a rerun is cached."""

import pytest

from models.config import ModelConfig
from tasks.records import Context

MODEL = ModelConfig(name="tiny-random", device="cpu")
CONTEXTS = [
    Context(
        id="ctx1",
        title="Kelthrop",
        context="Orvanne Kelthrop founded the guild in 1873.",
        questions=["A real question, replaced?"],
        answers=[["yes"]],
    ),
    Context(id="text-1", title="harbour", context="The harbour of Vaskmere opened in 1902.", questions=[], answers=[]),
]


# Called outside a flow on purpose (the task alone); its run logger then has no flow run to send to.
@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs':UserWarning")
def test_written_questions_replace_the_contexts_and_a_rerun_computes_nothing(prefect_env, monkeypatch):
    from models import generated_questions
    from tasks import knowledge
    from tasks.policy import resolve_base_policy

    base = resolve_base_policy.fn(MODEL)
    first = knowledge.write_questions(base, MODEL, CONTEXTS, 3, 24, "first")
    assert [r.context.id for r in first] == ["ctx1", "text-1"]
    for record, context in zip(first, CONTEXTS):
        assert record.writer == "base" and record.context.context == context.context
        # The real question never survives: the targets are the written pairs alone.
        assert "A real question, replaced?" not in record.context.questions
        assert len(record.context.questions) == len(record.context.answers) == record.kept <= 3
        assert record.parsed == record.kept + sum(record.dropped.values())
        assert set(record.dropped) == set(generated_questions.FILTERS)

    calls = []
    real = generated_questions.write_questions_batch
    monkeypatch.setattr(generated_questions, "write_questions_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert knowledge.write_questions(base, MODEL, CONTEXTS, 3, 24, "another-label") == first
    assert calls == []
    knowledge.write_questions(base, MODEL, CONTEXTS, 2, 24, "fewer")  # another count: written again
    assert calls == [1]
