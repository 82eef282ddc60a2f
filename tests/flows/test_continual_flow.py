"""The continual flow at tiny size: the matrix and what it logs, a cached rerun, the comparison
row and the mitigations (the SIGKILL at step 5: tests/integration/test_continual_resume.py)."""

import os
from pathlib import Path

from conftest import TINY, continual_overrides, squad_file as _squad

ROOT = Path(__file__).parents[2]


def _model_folders(root: Path) -> list[Path]:
    return [p.parent for p in root.rglob("model.safetensors")] if root.exists() else []


def test_continual_flow_logs_the_matrix_and_reruns_from_cache(prefect_env, monkeypatch):
    import numpy as np
    from mlflow import MlflowClient

    from flows.continual import seal_continual
    from models import continual, inner_loop, self_edit
    from models.config import load_config

    config = load_config(
        TINY,
        continual_overrides(
            _squad(prefect_env / "squad-continual.json"),
            "continual.sequences=2",
            "continual.passages=3",
            "tracking.experiment=continual",
        ),
    )
    first = seal_continual(config)
    assert [r.matrix.shape for r in first.sequences] == [(4, 3), (4, 3)]
    matrix = first.sequences[0].matrix
    assert np.isnan(matrix[1, 1:]).all() and not np.isnan(matrix[3]).any()
    # The tiny model learns to answer "zq" from its first merged passage.
    assert first.summary.metrics["newest_accuracy"] > first.summary.metrics["base_accuracy"]
    assert all(step.kl > 0 for r in first.sequences for step in r.steps)
    assert [len(step.scores) for step in first.sequences[0].steps] == [1, 2, 3]
    # The sequences draw different passages; each step sampled a self-edit from the current model.
    assert [c.id for c in first.sequences[0].contexts] != [c.id for c in first.sequences[1].contexts]
    assert all(edit is not None for r in first.sequences for edit in r.edits)
    # Every merged checkpoint was deleted once used (the start model is never one of them).
    assert _model_folders(Path(os.environ["SEAL_HOME"]) / "continual") == []

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["seal.flow"] == "continual"
    for name in (
        "continual/newest_accuracy",
        "continual/forgetting",
        "continual/backward_transfer",
        "continual/gain_over_base",
        "continual/kl",
        "sequence_1/kl",
    ):
        assert name in run.data.metrics, name
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "continual/kl")) == [1, 2, 3]
    lag = client.get_metric_history(run.info.run_id, "continual/accuracy_after_more_merges")
    assert sorted(m.step for m in lag) == [0, 1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "continual")}
    assert {"continual/matrix.json", "continual/steps.json", "continual/forgetting.png"} <= artifacts

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        for key in ("continual-matrix", "continual-summary", "continual-forgetting-curve", "mlflow-run"):
            assert prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))), key

    # Same config, new flow run: nothing is sampled, trained or evaluated again.
    calls = []
    for module, name in [
        (continual, "merge_self_edit"),
        (inner_loop, "evaluate_contexts"),
        (continual, "evaluate_contexts"),
        (self_edit, "sample_self_edits_batch"),
    ]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    second = seal_continual(config)
    assert calls == []
    np.testing.assert_array_equal(second.sequences[1].matrix, first.sequences[1].matrix)

    # A changed evaluation setting needs the deleted checkpoints again: each is rebuilt (the same
    # weights, so the self-edits and merges keep their keys) and scored anew.
    calls.clear()
    changed = config.model_copy(update={"eval": config.eval.model_copy(update={"max_new_tokens": 6})})
    third = seal_continual(changed)
    assert calls.count("evaluate_contexts") == 2 * (1 + 3)  # per sequence: the unedited row, 3 steps
    assert "sample_self_edits_batch" not in calls
    assert [s.checkpoint.digest for s in third.sequences[0].steps] == [
        s.checkpoint.digest for s in first.sequences[0].steps
    ]


def test_passage_only_row_and_the_mitigations(prefect_env, monkeypatch):
    from flows.continual import seal_continual
    from models import self_edit
    from models.config import load_config

    squad = _squad(prefect_env / "squad-continual-variants.json")
    sampled = []
    real = self_edit.sample_self_edits_batch
    monkeypatch.setattr(self_edit, "sample_self_edits_batch", lambda *a, **k: sampled.append(1) or real(*a, **k))
    passage_only = seal_continual(
        load_config(
            TINY,
            continual_overrides(
                squad,
                "continual.sequences=1",
                "continual.passages=2",
                "continual.training=passage_only",
                "tracking.experiment=continual-variants",
            ),
        )
    )
    (sequence,) = passage_only.sequences
    assert sampled == [] and sequence.edits == [None, None]
    assert all(len(step.documents) == 1 for step in sequence.steps)  # the passage alone

    replay = seal_continual(
        load_config(
            TINY,
            continual_overrides(
                squad,
                "continual.sequences=1",
                "continual.passages=3",
                "continual.replay=2",
                "tracking.experiment=continual-variants",
            ),
        )
    )
    steps = replay.sequences[0].steps
    assert [s.replayed for s in steps][0] == 0 and all(s.replayed == 2 for s in steps[1:])

    # Routed adapters: nothing merged, every self-edit written by the starting model, each step
    # scored through all adapters so far; the adapters go once the sequence is done.
    from mlflow import MlflowClient

    from models import continual
    from tasks import knowledge

    merges, loads = [], []
    real_merge, real_use = continual.merge_self_edit, knowledge.use_model
    monkeypatch.setattr(continual, "merge_self_edit", lambda *a, **k: merges.append(1) or real_merge(*a, **k))
    monkeypatch.setattr(knowledge, "use_model", lambda ref, *a, **k: loads.append(ref.digest) or real_use(ref, *a, **k))
    config = load_config(
        TINY,
        continual_overrides(
            squad,
            "continual.sequences=1",
            "continual.passages=3",
            "continual.adapters=routed",
            "tracking.experiment=continual-variants",
        ),
    )
    routed = seal_continual(config)
    (sequence,) = routed.sequences
    # Steps 1 and 2 sampled from the starting model (the unedited row and step 0's self-edit
    # are the replay run's, cached); merged, they would have sampled from checkpoints.
    assert merges == [] and loads == [routed.start.digest] * 2
    assert [len(step.scores) for step in sequence.steps] == [1, 2, 3]
    assert all(0 <= step.routed <= 1 for step in sequence.steps) and sequence.steps[0].routed == 1.0
    assert len({step.checkpoint.digest for step in sequence.steps}) == 3
    home = Path(os.environ["SEAL_HOME"]) / "continual"
    assert not list(home.rglob("adapter_model.safetensors")) if home.exists() else True
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(routed.run_id)
    assert "continual/routed_to_own_adapter" in run.data.metrics
    assert "sequence_0/routed_to_own_adapter" in run.data.metrics
