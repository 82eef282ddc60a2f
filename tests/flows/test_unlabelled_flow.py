"""SEAL on unlabelled text at tiny size: rewards from generated questions, held-out kept apart."""

import json

from conftest import TINY

from tasks.records import Context, GeneratedQuestionsRecord, SelectionRecord

PASSAGES = {
    "harbour.txt": "The harbour of Vaskmere opened in 1902.\n\nIts lighthouse was painted red in 1931.",
    "guild.txt": "Orvanne Kelthrop founded the Glassmakers' Guild in 1873.",
}


def _text_config(tmp_path, passages: dict[str, str], experiment: str, *overrides: str):
    """A one-iteration tiny run on ``passages`` written as .txt files, held out from the synthetic set."""
    from models.config import load_config

    folder = tmp_path / "passages"
    folder.mkdir()
    for name, text in passages.items():
        (folder / name).write_text(text)
    return load_config(
        TINY,
        [
            "data.source=text",
            f"data.path={folder}",
            "data.eval_source=synthetic",
            "reward.source=generated",
            "data.num_train_contexts=2",
            "data.num_eval_contexts=2",
            "rl.iterations=1",
            f"tracking.experiment={experiment}",
            f"tracking.registered_model={experiment}-policy",
            *overrides,
        ],
    )


def test_training_on_unlabelled_text_records_generated_questions_and_zero_rewards(prefect_env, tmp_path):
    from mlflow import MlflowClient

    from flows.training import seal_training
    from models.knowledge_data import load_contexts

    config = _text_config(tmp_path, PASSAGES, "unlabelled", "reward.num_questions=3", "reward.question_tokens=32")
    result = seal_training(config)

    client = MlflowClient(f"sqlite:///{prefect_env}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("unlabelled").experiment_id])
    assert run.info.status == "FINISHED"
    for name in ("kept_fraction", "mean_pairs", "contexts_without_pairs"):
        assert f"generated_questions/{name}" in run.data.metrics, name
    local = client.download_artifacts(run.info.run_id, "generated_questions/iteration-1.json", str(tmp_path))
    table = json.loads(open(local).read())
    rows = [dict(zip(table["columns"], values)) for values in table["data"]]
    passages = load_contexts(config.data, "train")
    assert {r["context_id"] for r in rows} <= set(passages["id"]) and len(rows) == 2
    for row in rows:
        assert row["parsed"] == row["kept"] + sum(v for k, v in row.items() if k.startswith("dropped_"))

    # The tiny random model writes no checkable pair: every context is skipped with reward 0,
    # no inner loop runs, and the policy is carried over, without a crash.
    (iteration,) = result.iterations
    assert all(r["kept"] == 0 and r["rewards"] == [0.0] and r["skipped"] for r in rows)
    assert iteration.rows == [] and iteration.metrics["reward_mean"] == 0.0
    assert run.data.metrics["generated_questions/contexts_without_pairs"] == 2
    assert result.policy.name == "base"
    # Held-out evaluation still asks the labelled source's real questions.
    for _, held_out in result.held_out:
        assert sum(c["questions"] for c in held_out.per_context) > 0

    # Held-out questions never reach training: not among the training contexts' targets or
    # passages, nor in any self-edit an inner loop trained on.
    held_out = load_contexts(config.data, "validation")
    held_out_questions = {q for qs in held_out["questions"] for q in qs}
    assert held_out_questions and not set(held_out["id"]) & set(passages["id"])
    trained_text = " ".join(
        [r["text"] for r in rows]
        + [p["question"] for r in rows for p in r["pairs"]]
        + [r["text"] for r in iteration.rows]
        + list(passages["context"])
    )
    assert not [q for q in held_out_questions if q in trained_text]


def test_the_questions_table_and_its_metrics():
    from flows.training import NO_GENERATED_QUESTIONS, generated_question_metrics, generated_question_rows

    def written(context_id, pairs, parsed):
        context = Context(
            id=context_id,
            title="T",
            context="Kelthrop founded it in 1873.",
            questions=[q for q, _ in pairs],
            answers=[[a] for _, a in pairs],
        )
        dropped = {"empty": parsed - len(pairs)}
        return GeneratedQuestionsRecord(context=context, writer="base", text="...", parsed=parsed, dropped=dropped)

    selection = SelectionRecord(
        context_id="a",
        baseline_accuracy=0.0,
        accuracies=[1.0, 0.0],
        rewards=[1.0, 0.0],
        failures=[None, None],
        kept=0,
        outcome="kept",
        tie=False,
    )
    records = [written("a", [("Who founded it?", "Kelthrop"), ("When?", "1873")], 4), written("b", [], 2)]
    rows = generated_question_rows(records, {"a": selection}, iteration=3)
    assert rows[0]["pairs"] == [
        {"question": "Who founded it?", "answer": "Kelthrop"},
        {"question": "When?", "answer": "1873"},
    ]
    assert rows[0]["rewards"] == [1.0, 0.0] and rows[0]["skipped"] is None and rows[0]["dropped_empty"] == 2
    assert rows[1]["rewards"] == [0.0] and rows[1]["skipped"] == NO_GENERATED_QUESTIONS
    assert generated_question_metrics(rows) == {
        "generated_questions/kept_fraction": 2 / 6,
        "generated_questions/mean_pairs": 1.0,
        "generated_questions/contexts_without_pairs": 1.0,
    }
    assert generated_question_metrics([]) == {}


# What a writer that can read would answer for each passage (the tiny random model cannot).
WRITTEN = {
    "Vaskmere": "Q: When did the harbour of Vaskmere open? A: 1902\nQ: What colour was the lighthouse? A: red\n",
    "Kelthrop": "1. Q: Who founded the Glassmakers' Guild? A: Orvanne Kelthrop\n2. Q: When? A: 1873\n"
    "Q: Why? A: money\n",
}


def test_generated_pairs_are_what_the_rewards_ask(prefect_env, tmp_path, monkeypatch):
    """With checkable pairs (a scripted writer's text, through the real parser and filters), the
    E-step trains and scores every self-edit against them, and keeps self-edits by them."""
    from flows.training import seal_training
    from models import generated_questions

    def scripted(model, tokenizer, prompts, **kwargs):
        return [next(text for name, text in WRITTEN.items() if name in prompt) for prompt in prompts]

    monkeypatch.setattr(generated_questions, "generate", scripted)
    one_each = {name: text.replace("\n\n", " ") for name, text in PASSAGES.items()}  # one passage per file
    config = _text_config(tmp_path, one_each, "unlabelled-pairs")
    result = seal_training(config)
    (iteration,) = result.iterations
    by_title = {r["title"]: r for r in iteration.questions}
    # "money" is not in the passage: dropped; the rest are kept, in order.
    assert [p["answer"] for p in by_title["guild"]["pairs"]] == ["Orvanne Kelthrop", "1873"]
    assert by_title["guild"]["dropped_answer_not_in_passage"] == 1
    assert [p["answer"] for p in by_title["harbour"]["pairs"]] == ["1902", "red"]
    # Every self-edit of both contexts went through an inner loop scored on those pairs.
    assert len(iteration.rows) == 2 * config.self_edit.num_samples
    assert {len(r["rewards"]) for r in iteration.questions} == {config.self_edit.num_samples}
    assert all(r["skipped"] is None for r in iteration.questions)
    assert {s.context_id for s in iteration.selections} == {r["context_id"] for r in iteration.questions}
