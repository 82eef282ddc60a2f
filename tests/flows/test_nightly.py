"""The nightly flow continues the latest registered policy on unseen contexts and registers the
result only if held-out accuracy did not drop."""

import json
from pathlib import Path

import pytest

from conftest import TINY, squad_file as _squad


@pytest.mark.parametrize(
    "before, after, expected",
    [
        ([(1, 2), (0, 2)], [(2, 2), (0, 2)], 0.25),
        ([(1, 2), (0, 2)], [(0, 2), (0, 2)], -0.25),
        ([(1, 2), (1, 2)], [(1, 2), (1, 2)], 0.0),
    ],
)
def test_held_out_change_is_after_minus_before_on_the_same_contexts(before, after, expected):
    from flows.held_out import HeldOutResult
    from flows.nightly import held_out_change
    from tasks.records import PolicyRef

    ref = PolicyRef(name="p", path="/p", digest="d")

    def table(counts):
        return HeldOutResult(ref, {"policy_self_edits": counts}, 0.0, (("policy_self_edits", "policy_self_edits"),))

    change = held_out_change(table(before), table(after), "policy_self_edits")
    assert change.value == pytest.approx(expected) and change.low <= change.value <= change.high


def test_nightly_continues_latest_on_unseen_contexts_and_registers_only_without_a_drop(prefect_env, monkeypatch):
    from mlflow import MlflowClient

    import flows.nightly as nightly
    from models.config import load_config
    from models.stats import Estimate

    config = load_config(
        TINY,
        [
            "data.source=squad",
            f"data.path={_squad(prefect_env / 'squad-nightly.json')}",
            "data.num_train_contexts=2",
            "data.num_eval_contexts=2",
            "self_edit.num_samples=2",
            "rl.iterations=1",
            "inner_loop.epochs=8",
            "inner_loop.learning_rate=3e-2",
            "tracking.experiment=nightly",
            "tracking.registered_model=nightly-policy",
        ],
    )
    uri = "models:/nightly-policy@latest"
    client = MlflowClient(f"sqlite:///{prefect_env}/mlflow.db")

    # Night 1: nothing registered yet, so it starts from the base model; no drop: registered.
    monkeypatch.setattr(nightly, "held_out_change", lambda *a: Estimate(0.1, -0.1, 0.3))
    first = nightly.seal_nightly(config, uri)
    assert first.start.name == "base" and first.policy.digest != first.start.digest
    assert first.registered == "1" and len(first.contexts) == 2
    latest = client.get_model_version_by_alias("nightly-policy", "latest")
    assert str(latest.version) == "1" and latest.tags["seal.digest"] == first.policy.digest
    assert json.loads((Path(first.policy.path) / nightly.SEEN_CONTEXTS).read_text()) == first.contexts
    run = client.get_run(first.run_id)
    assert run.data.metrics["nightly/registered"] == 1.0 and "held_out/policy_self_edits" in run.data.metrics

    # Night 2 continues version 1 on contexts it has not seen; held-out accuracy dropped: not registered.
    monkeypatch.setattr(nightly, "held_out_change", lambda *a: Estimate(-0.2, -0.4, 0.0))
    second = nightly.seal_nightly(config, uri)
    assert second.start.digest == first.policy.digest and second.start.name == uri
    assert not set(second.contexts) & set(first.contexts) and len(second.contexts) == 2
    assert second.registered is None
    assert str(client.get_model_version_by_alias("nightly-policy", "latest").version) == "1"
    run = client.get_run(second.run_id)
    assert run.data.metrics["nightly/registered"] == 0.0 and "dropped" in run.data.tags["seal.nightly.verdict"]
