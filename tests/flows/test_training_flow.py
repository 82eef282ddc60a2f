"""The whole training flow at tiny size: MLflow records, registered policies, a cached rerun."""

from conftest import TINY, squad_file as _squad


def test_training_flow_tracks_everything_and_reruns_from_cache(prefect_env, monkeypatch):
    from mlflow import MlflowClient

    from flows.held_out import format_held_out
    from flows.knowledge import HELD_OUT_COLUMNS
    from flows.training import seal_training
    from models import inner_loop, self_edit
    from models.config import load_config
    from models.stacked_lora import lanes

    config = load_config(
        TINY,
        [
            "data.source=squad",
            f"data.path={_squad(prefect_env / 'squad.json')}",
            "data.num_train_contexts=2",
            "data.num_eval_contexts=2",
            "self_edit.num_samples=2",
            "rl.iterations=1",
            "inner_loop.epochs=8",
            "inner_loop.learning_rate=3e-2",
            "tracking.registered_model=flow-test-policy",
        ],
    )
    first = seal_training(config)

    client = MlflowClient(f"sqlite:///{prefect_env}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("seal").experiment_id])
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    assert run.data.params["lora.rank"] == "4" and run.data.params["model.name"] == "tiny-random"
    assert run.data.tags["prefect.flow_run_id"]
    for name in (
        "reward_mean",
        "positive_fraction",
        "kept_count",
        "baseline_accuracy",
        "adapted_accuracy",
        "e_step_seconds",
        *(f"held_out/{c}" for c in HELD_OUT_COLUMNS),
    ):
        assert name in run.data.metrics, name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"self_edits", "held_out", "curves.png"} <= artifacts

    # Prefect shows each phase's progress, finished, and the iteration's self-edit table.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        for key in (
            "progress-held-out-base",
            "progress-iteration-1",
            "progress-held-out-iteration-1",
            "self-edits-iteration-1",
        ):
            (artifact, *_) = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            if key.startswith("progress"):
                assert artifact.type == "progress" and float(artifact.data) == 100.0, key

    # The tiny model learns to say "zq" from the passage, so adapted beats unadapted.
    (iteration,) = first.iterations
    assert iteration.metrics["adapted_accuracy"] > iteration.metrics["baseline_accuracy"]
    assert len(first.held_out) == 2
    assert "no adaptation" in format_held_out(first.held_out)
    # The baseline columns are the base model's: computed once, the same in every evaluation.
    before, after = (h for _, h in first.held_out)
    for column in ("no_adaptation", "passage_only", "base_self_edits"):
        assert before.correct[column] == after.correct[column], column
    assert iteration.metrics["kept_count"] == 2  # the tiny model's self-edits all help
    versions = client.search_model_versions("name='flow-test-policy'")
    assert len(versions) == 1
    assert client.get_model_version_by_alias("flow-test-policy", "latest").version == versions[0].version
    assert client.get_model_version_by_alias("flow-test-policy", "best").version == versions[0].version
    assert first.policy.name == "iteration-1"

    # Same config, new flow run: no sampling, training or evaluation runs again.
    calls = []
    for module, name in [
        (lanes, "train_slots"),
        (lanes, "evaluate_stacked"),
        (inner_loop, "evaluate_contexts"),
        (self_edit, "sample_self_edits_batch"),
    ]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    second = seal_training(config)
    assert calls == []
    assert [r.metrics["reward_mean"] for r in second.iterations] == [r.metrics["reward_mean"] for r in first.iterations]
    assert [h.correct for _, h in second.held_out] == [h.correct for _, h in first.held_out]
    assert second.run_id != first.run_id

    # A changed M-step setting reuses the whole E-step and the baseline columns; only the update
    # and the new policy's column (2 contexts: both self-edits in one sampling call; train and
    # evaluate both adapters together, one group) run again.
    calls.clear()
    changed = config.model_copy(
        update={"policy_update": config.policy_update.model_copy(update={"learning_rate": 5e-3})}
    )
    third = seal_training(changed)
    assert sorted(calls) == sorted(["sample_self_edits_batch", "train_slots", "evaluate_stacked"])
    assert [r.metrics["reward_mean"] for r in third.iterations] == [r.metrics["reward_mean"] for r in first.iterations]
    assert third.held_out[0][1].correct == first.held_out[0][1].correct

    # eval.seeds set to the 1 it inherits changes no evaluation: nothing runs again.
    calls.clear()
    seal_training(changed.model_copy(update={"eval": changed.eval.model_copy(update={"seeds": 1})}))
    assert calls == []


def test_seal_run_then_eval_a_registered_policy(prefect_env, capsys):
    from flows.cli import main

    data = [
        f"data.path={_squad(prefect_env / 'squad-cli.json')}",
        "data.source=squad",
        "data.num_train_contexts=2",
        "data.num_eval_contexts=2",
        "rl.iterations=1",
        "inner_loop.epochs=8",
        "inner_loop.learning_rate=3e-2",
        "tracking.experiment=cli",
    ]
    assert main(["run", str(TINY), *data]) == 0
    out = capsys.readouterr().out
    assert "held-out closed-book accuracy" in out and "no adaptation" in out
    assert "mlflow ui --backend-store-uri" in out and "prefect server start" in out

    # Every documented form of POLICY evaluates: base, a folder, a registry URI (whose name is no
    # valid Prefect artifact key as it is).
    folder = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("final policy: "))
    tables = {}
    for policy in ("base", folder, "models:/seal-policy@best", "models:/seal-policy@latest"):
        assert main(["eval", str(TINY), policy, *data]) == 0, policy
        printed = capsys.readouterr().out
        assert "policy self edits" in printed and "[" in printed and "policy self edits - passage only" in printed
        tables[policy] = printed.split("\n", 1)[1]

    # The registered policy is the folder the run trained.
    def scores(policy):  # the table's row, less its label
        return tables[policy].splitlines()[2].split(None, 1)[1]

    assert scores(folder) == scores("models:/seal-policy@best")
    # Each evaluation is an MLflow run with the table's intervals and the paired difference.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{prefect_env}/mlflow.db")
    runs = client.search_runs(
        [client.get_experiment_by_name("cli").experiment_id],
        "tags.`seal.evaluated_policy` = 'models:/seal-policy@best'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert metrics["held_out/policy_self_edits_low"] <= metrics["held_out/policy_self_edits"]
    assert metrics["held_out/difference_low"] <= metrics["held_out/difference"] <= metrics["held_out/difference_high"]
    assert main(["eval", str(TINY), "models:/no-such-policy@best", *data]) == 2
    assert "no-such-policy" in capsys.readouterr().err


def test_progress_draws_bars_only_on_a_terminal(prefect_env):
    import io

    from flows.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    plain, terminal = io.StringIO(), Terminal()
    quiet = Progress("test-plain", {"training": 2}, stream=plain)
    drawn = Progress("test-terminal", {"sampling": 1, "training": 2}, stream=terminal)
    for progress in (quiet, drawn):
        progress.advance("training")
        progress.advance("training", 5)  # never past the total
    drawn.advance("sampling")
    assert quiet.fraction == 1.0 and drawn.fraction == 1.0
    quiet.close()
    drawn.close()
    assert plain.getvalue() == ""
    assert "test-terminal training" in terminal.getvalue() and "2/2" in terminal.getvalue()


def test_seeds_passage_only_rewards_and_several_held_out_self_edits(prefect_env):
    import os
    from pathlib import Path

    from mlflow import MlflowClient

    from flows.training import seal_training
    from models.config import load_config

    config = load_config(
        TINY,
        [
            "data.source=squad",
            f"data.path={_squad(prefect_env / 'squad-variants.json')}",
            "data.num_train_contexts=2",
            "data.num_eval_contexts=2",
            "self_edit.num_samples=2",
            "rl.iterations=1",
            "inner_loop.epochs=8",
            "inner_loop.learning_rate=3e-2",
            "inner_loop.seeds=2",
            "inner_loop.seed=11",  # seeds 11 and 12: no other test's adapters (a seed's are shared)
            "reward.baseline=passage_only",
            "reward.kind=graded",
            "eval.num_self_edits=2",
            "eval.seeds=1",
            "tracking.experiment=variants",
            "tracking.registered_model=variants-policy",
        ],
    )
    adapters = Path(os.environ["SEAL_HOME"]) / "adapters"

    def folders() -> set[Path]:  # other tests share SEAL_HOME and these context ids
        return {p for p in adapters.glob("*/*/*") if not p.name.startswith(".")} if adapters.exists() else set()

    before = folders()
    result = seal_training(config)
    made = folders() - before
    (iteration,) = result.iterations
    # The reward's baseline is the passage-only adapter, which the tiny model learns "zq" from.
    assert iteration.metrics["baseline_accuracy"] > iteration.metrics["no_adaptation_accuracy"]
    for row in iteration.rows:
        assert row["reward"] == row["accuracy"] - row["baseline_accuracy"]  # graded: the gain
    # Two seeds per inner loop: per training context 2 self-edits and the passage, twice each.
    base = result.held_out[0][1].policy
    for context_id in {row["context_id"] for row in iteration.rows}:
        assert len([p for p in made if p.parent == adapters / base.digest / context_id]) == 6
    # Held out with eval.seeds=1: the passage and 2 base self-edits, one seed each.
    for context in result.held_out[0][1].per_context:
        assert len([p for p in made if p.parent == adapters / base.digest / context["context_id"]]) == 3
    # Held out: two self-edits per context and column, averaged; each column has its interval.
    for _, held_out in result.held_out:
        assert all(len(counts) == 2 for counts in held_out.counts.values())
        assert held_out.difference() is not None
    run = MlflowClient(f"sqlite:///{prefect_env}/mlflow.db").get_run(result.run_id)
    for name in (
        "self_edit/documents",
        "self_edit/tokens",
        "self_edit/fact_recall",
        "self_edit/answer_coverage",
        "self_edit/copied_fraction",
        "held_out/difference",
        "held_out/policy_self_edits-base_self_edits_low",
        "held_out/passage_only_high",
    ):
        assert name in run.data.metrics, name
