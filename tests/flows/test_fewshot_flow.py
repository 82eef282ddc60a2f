"""The few-shot (ARC) domain through the same training flow, at tiny size: self-edit configs
sampled, test-time training, rewards, a policy update, Table 1 in MLflow, a cached rerun; the
label-free reward on a held-out demonstration."""

import json
from pathlib import Path

import datasets

ROOT = Path(__file__).parents[2]
FEWSHOT_TINY = ROOT / "deployments" / "configs" / "fewshot-tiny.yaml"
# What the stand-in policy writes: a valid config the tiny model can learn from, or no config.
CONFIG_TEXT = json.dumps(
    {
        "data_generation": {
            "use_basic_augmentations": False,
            "use_size_augmentations": False,
            "use_chain_augmentations": False,
            "use_repeat_augmentations": False,
        },
        "training": {"strategy": "train_using_output_tokens", "learning_rate": 1e-2, "num_train_epochs": 10},
    }
)
OVERRIDES = [
    "data.num_train_contexts=2",
    "data.num_eval_contexts=2",
    "fewshot.max_steps=64",
    "fewshot.train_task_ids=[]",
    "fewshot.eval_task_ids=[]",
    "data.seed=7",
    "tracking.experiment=fewshot-flow",
    "tracking.registered_model=fewshot-flow-policy",
]


def constant_tasks(split, task_ids=(), max_grid_size=30):
    """Tasks whose every output is the 1x1 grid "1": learnable by the tiny model in a few steps."""
    from models.fewshot.data import FEATURES

    rows = [
        {
            "id": f"{split[:5]}-{n}",
            "train_inputs": [[[n + 1, 0]], [[0, 2]], [[3, 3]]],
            "train_outputs": [[[1]]] * 3,
            "test_inputs": [[[4, n]]],
            "test_outputs": [[[1]]],
        }
        for n in range(2)
    ]
    return datasets.Dataset.from_list(rows, features=FEATURES)


def stand_in_policy(model, tokenizer, prompts, *, num_return_sequences, **kwargs):
    """Of two samples the first is a valid config and the second never is (nor its retry)."""
    if num_return_sequences == 2:
        return [CONFIG_TEXT, "I would rotate the grids."]
    return ["still no config"] * num_return_sequences


def test_fewshot_flow_rewards_solving_configs_updates_the_policy_and_reruns_from_cache(
    prefect_env, monkeypatch, capsys
):
    from mlflow import MlflowClient

    import tasks.fewshot
    from flows.cli import main
    from flows.held_out import format_held_out
    from flows.training import seal_training
    from models.config import load_config
    from models.fewshot import self_edit, ttt

    monkeypatch.setattr(tasks.fewshot, "load_arc_tasks", constant_tasks)
    monkeypatch.setattr(self_edit, "generate", stand_in_policy)
    config = load_config(FEWSHOT_TINY, OVERRIDES)
    first = seal_training(config)

    (iteration,) = first.iterations
    rows = {(r["context_id"], r["self_edit"]): r for r in iteration.rows}
    for task in ("train-0", "train-1"):
        solved, invalid = rows[(task, 0)], rows[(task, 1)]
        assert solved["reward"] == 1 and solved["kept"] and solved["failure"] is None
        assert json.loads(solved["config"])["training"]["num_train_epochs"] == 10
        assert invalid["reward"] == 0 and invalid["config"] is None and invalid["attempts"] == 2
        assert invalid["failure"].startswith("invalid JSON: no '{'")
    assert iteration.metrics["kept_count"] == 2 and iteration.metrics["reward_mean"] == 0.5
    assert first.policy.name == "iteration-1"

    # Table 1: in-context learning fails, the valid configs solve, the invalid ones do not.
    base, after = (h for _, h in first.held_out)
    assert list(after.correct) == ["in_context", "ttt_self_edits", "seal", "oracle_ttt"]
    assert after.correct["in_context"] == 0 and after.total == 2
    assert after.correct["ttt_self_edits"] == 2 and after.total_of("ttt_self_edits") == 4
    assert after.correct["seal"] == 2 and after.accuracy("seal") == 0.5
    assert base.correct["ttt_self_edits"] == after.correct["ttt_self_edits"]  # the base rows are the base's
    assert "oracle ttt" in format_held_out(first.held_out)

    client = MlflowClient(f"sqlite:///{prefect_env}/mlflow.db")
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["domain"] == "fewshot"
    assert run.data.metrics["held_out/seal_correct"] == 2 and run.data.metrics["held_out/seal_total"] == 4
    for name in (
        "reward_mean",
        "kept_count",
        "held_out/in_context",
        "held_out/oracle_ttt",
        "held_out/ttt_self_edits",
        "held_out/oracle_ttt_total",
    ):
        assert name in run.data.metrics, name
    assert {"self_edits", "held_out", "curves.png"} <= {a.path for a in client.list_artifacts(first.run_id)}
    assert len(client.search_model_versions("name='fewshot-flow-policy'")) == 1

    # Same config, new flow run: nothing is sampled, trained or predicted again.
    calls = []
    for module, name in [(ttt, "train_ttt_adapter"), (ttt, "predict_outputs"), (self_edit, "sample_self_edits")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    second = seal_training(config)
    assert calls == []
    assert [h.correct for _, h in second.held_out] == [h.correct for _, h in first.held_out]

    # seal eval prints Table 1 (from the cache too).
    assert main(["eval", str(FEWSHOT_TINY), "base", *OVERRIDES]) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "in context" in out and "2/4 (50%)" in out
    assert calls == []


def unlearnable_test_pairs(split, task_ids=(), max_grid_size=30):
    """Training tasks whose real test output no demonstration teaches ("2" where every
    demonstration gives "1"); held-out tasks as in :func:`constant_tasks`."""
    tasks = constant_tasks(split, task_ids, max_grid_size)
    if split != "train":
        return tasks
    return tasks.map(lambda row: {"test_inputs": [[[9, 9]]], "test_outputs": [[[2]]]})


def test_label_free_fewshot_rewards_a_held_out_demonstration_and_never_sees_a_test_pair(prefect_env, monkeypatch):
    import tasks.fewshot
    from flows.training import seal_training
    from models.config import load_config
    from models.fewshot import self_edit, ttt

    monkeypatch.setattr(tasks.fewshot, "load_arc_tasks", unlearnable_test_pairs)
    monkeypatch.setattr(self_edit, "generate", stand_in_policy)
    seen = []  # every grid test-time training learns from or the adapted model answers
    for name in ("train_ttt_adapter", "predict_outputs"):
        real = getattr(ttt, name)

        def recording(model, tokenizer, pairs, *args, _real=real, **kwargs):
            tests = args[0] if args and isinstance(args[0], list) else []
            seen.extend([grid for pair in pairs for grid in pair] + tests)
            return _real(model, tokenizer, pairs, *args, **kwargs)

        monkeypatch.setattr(ttt, name, recording)
    overrides = [
        *OVERRIDES,
        "reward.source=demonstrations",
        "tracking.experiment=fewshot-label-free",
        "tracking.registered_model=fewshot-label-free-policy",
    ]
    result = seal_training(load_config(FEWSHOT_TINY, overrides))

    (iteration,) = result.iterations
    rewards = {(r["context_id"], r["self_edit"]): r["reward"] for r in iteration.rows}
    # The valid config solves each task's held-out demonstration ("1"); the real test pair ("2")
    # would have rewarded nothing.
    assert rewards == {
        ("train-0-demo3", 0): 1,
        ("train-0-demo3", 1): 0,
        ("train-1-demo3", 0): 1,
        ("train-1-demo3", 1): 0,
    }
    assert iteration.metrics["kept_count"] == 2 and result.policy.name == "iteration-1"
    assert ((4, 0),) in seen  # a held-out task's test input: the recorder sees test grids
    assert ((9, 9),) not in seen and ((2,),) not in seen
    # Held-out evaluation still asks the real test pairs.
    assert result.held_out[-1][1].correct["seal"] == 2
