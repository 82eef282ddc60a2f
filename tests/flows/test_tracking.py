"""MlflowTracker against a temporary sqlite store; NullTracker accepts everything.

Creating a sqlite store runs MLflow's migrations (~5 s), so the tests share one store and each
test uses its own experiment and registered model.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from flows.tracking import (  # noqa: E402
    MlflowTracker,
    NullTracker,
    Tracker,
    default_tracking_uri,
    finishing,
    resolve_policy_uri,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def names() -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {"experiment": f"seal-{suffix}", "registered_model": f"seal-policy-{suffix}"}


def make_tracker(store: str, names: dict[str, str], **kwargs) -> MlflowTracker:
    return MlflowTracker(
        store,
        names["experiment"],
        names["registered_model"],
        run_name="test",
        tags={"seal.model": "tiny-random"},
        **kwargs,
    )


def policy_folder(root: Path, name: str, marker: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"marker": marker}))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return folder


def test_params_metrics_and_tags_land_in_the_run(store, names):
    tracker = make_tracker(store, names)
    tracker.log_params({"lora.rank": 8, "rl.iterations": 2, "model.name": "tiny-random", "long": "x" * 7000})
    tracker.log_params({"lora.rank": 8})  # same value again: a resume, not an error
    tracker.log_metrics({"reward/mean": 0.25, "held_out/accuracy": 0.5}, step=1)
    tracker.log_metrics({"reward/mean": 0.75}, step=2)
    tracker.set_tags({"seal.phase": "training"})

    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.data.params["lora.rank"] == "8" and run.data.params["model.name"] == "tiny-random"
    assert len(run.data.params["long"]) == 6000  # truncated to MLflow's limit
    assert run.data.tags["seal.model"] == "tiny-random" and run.data.tags["seal.phase"] == "training"
    history = client.get_metric_history(tracker.run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.75)]
    assert run.data.metrics["held_out/accuracy"] == 0.5


def test_changing_a_param_is_a_clear_error(store, names):
    tracker = make_tracker(store, names)
    tracker.log_params({"lora.rank": 8})
    with pytest.raises(ValueError, match=r"lora\.rank: '8' -> '16'.*new run"):
        tracker.log_params({"lora.rank": 16, "lora.alpha": 32})
    assert "lora.alpha" not in MlflowClient(store).get_run(tracker.run_id).data.params


def test_resume_continues_the_same_run(store, names):
    first = make_tracker(store, names)
    first.log_params({"lora.rank": 8})
    first.log_metrics({"reward/mean": 0.1}, step=1)
    first.finish("KILLED")
    client = MlflowClient(store)
    assert client.get_run(first.run_id).info.status == "KILLED"

    resumed = make_tracker(store, names, run_id=first.run_id)
    assert resumed.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    resumed.log_params({"lora.rank": 8})
    resumed.log_metrics({"reward/mean": 0.2}, step=2)
    resumed.finish("FAILED")

    experiment = client.get_experiment_by_name(names["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]
    assert runs[0].info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(first.run_id, "reward/mean")] == [1, 2]


def test_resume_of_an_unknown_run_is_a_clear_error(store, names):
    with pytest.raises(ValueError, match="Cannot resume MLflow run 'feedface'.*run_id=None"):
        make_tracker(store, names, run_id="feedface")


def test_finish_rejects_an_unknown_status(store, names):
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED, got 'DONE'"):
        make_tracker(store, names).finish("DONE")


def test_finishing_ends_the_run_finished_or_failed_and_keeps_the_error(store, names):
    client = MlflowClient(store)
    with finishing(make_tracker(store, names)) as done:
        assert client.get_run(done.run_id).info.status == "RUNNING"
    assert client.get_run(done.run_id).info.status == "FINISHED"
    with pytest.raises(KeyboardInterrupt), finishing(make_tracker(store, names)) as interrupted:
        raise KeyboardInterrupt
    assert client.get_run(interrupted.run_id).info.status == "FAILED"


def test_artifacts_live_next_to_the_sqlite_db(store, names):
    tracker = make_tracker(store, names)
    db_dir = Path(store.removeprefix("sqlite:///")).parent
    assert tracker.artifact_uri.startswith((db_dir / "mlruns").as_uri())


def test_table_text_figure_and_folder_are_listed(store, names, tmp_path):
    tracker = make_tracker(store, names)
    rows = [{"context_id": "c1", "reward": 1.0, "text": "a"}, {"context_id": "c2", "reward": 0.0}]
    tracker.log_table(rows, "self_edits/iteration-1.json")
    tracker.log_text("hello", "notes/readme.txt")
    figure, axes = plt.subplots()
    axes.plot([0, 1], [0.2, 0.4])
    tracker.log_figure(figure, "curves.png")
    assert not plt.fignum_exists(figure.number)  # logged and closed: a long flow does not pile them up
    adapter = policy_folder(tmp_path, "adapter-c1", "adapter")
    tracker.log_artifacts(adapter, "adapters/iteration-1/c1")

    client = MlflowClient(store)
    listed = lambda path=None: {f.path for f in client.list_artifacts(tracker.run_id, path)}  # noqa: E731
    assert {"self_edits", "notes", "curves.png", "adapters"} <= listed()
    assert listed("self_edits") == {"self_edits/iteration-1.json"}
    assert listed("notes") == {"notes/readme.txt"}
    assert listed("adapters/iteration-1/c1") == {
        "adapters/iteration-1/c1/config.json",
        "adapters/iteration-1/c1/model.safetensors",
    }
    table = json.loads(
        Path(client.download_artifacts(tracker.run_id, "self_edits/iteration-1.json", str(tmp_path / "dl"))).read_text()
    )
    assert table["columns"] == ["context_id", "reward", "text"]
    assert table["data"] == [["c1", 1.0, "a"], ["c2", 0.0, None]]


def test_log_artifacts_of_a_missing_folder_is_an_error(store, names, tmp_path):
    with pytest.raises(FileNotFoundError, match="not one"):
        make_tracker(store, names).log_artifacts(tmp_path / "nowhere", "adapters")


def test_register_policy_versions_aliases_and_resolution(store, names, tmp_path):
    tracker = make_tracker(store, names)
    model = names["registered_model"]
    # Same folder name twice (iteration-N/policy): each version keeps its own files.
    first = policy_folder(tmp_path / "iteration-1", "policy", "one")
    second = policy_folder(tmp_path / "iteration-2", "policy", "two")
    assert tracker.register_policy(first, aliases=["latest", "best"], description="iteration 1") == "1"
    assert tracker.register_policy(second, aliases=["latest"]) == "2"

    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias(model, "best").version) == "1"
    assert client.get_model_version(model, "1").description == "iteration 1"
    assert client.get_model_version(model, "2").run_id == tracker.run_id

    def marker(uri: str) -> str:
        folder = resolve_policy_uri(store, uri)
        assert (folder / "model.safetensors").exists()
        return json.loads((folder / "config.json").read_text())["marker"]

    assert marker(f"models:/{model}@latest") == "two"
    assert marker(f"models:/{model}@best") == "one"
    assert marker(f"models:/{model}/2") == "two"
    # The registry points at the run's artifacts: nothing was copied to a second place.
    assert resolve_policy_uri(store, f"models:/{model}/1").is_relative_to(
        Path(tracker.artifact_uri.removeprefix("file://"))
    )

    tracker.set_alias("2", "best")
    assert marker(f"models:/{model}@best") == "two"


def test_resolve_downloads_a_version_that_is_not_a_local_folder(store, names, tmp_path):
    tracker = make_tracker(store, names)
    tracker.log_artifacts(policy_folder(tmp_path, "policy", "remote"), "elsewhere/policy")
    client = MlflowClient(store)
    client.create_registered_model(names["registered_model"])
    client.create_model_version(
        names["registered_model"], source=f"runs:/{tracker.run_id}/elsewhere/policy", run_id=tracker.run_id
    )
    folder = resolve_policy_uri(store, f"models:/{names['registered_model']}/1", download_dir=tmp_path / "dl")
    assert folder.is_relative_to(tmp_path / "dl")
    assert json.loads((folder / "config.json").read_text())["marker"] == "remote"


@pytest.mark.parametrize(
    ("uri", "error"),
    [
        ("runs:/abc/policy", ValueError),
        ("models:/seal-policy", ValueError),
        ("models:/seal-policy@", ValueError),
        ("models:/no-such-model@best", LookupError),
    ],
)
def test_resolve_rejects_bad_uris(store, uri, error):
    with pytest.raises(error, match=r"models:/seal-policy@best|not registered"):
        resolve_policy_uri(store, uri)


def test_metrics_from_two_threads_land_in_the_same_run(store, names):
    tracker = make_tracker(store, names)

    def log(key: str) -> None:
        for step in range(10):
            tracker.log_metrics({key: float(step)}, step=step)

    threads = [threading.Thread(target=log, args=(key,)) for key in ("worker/a", "worker/b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client = MlflowClient(store)
    for key in ("worker/a", "worker/b"):
        assert [m.step for m in client.get_metric_history(tracker.run_id, key)] == list(range(10))


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri(tmp_path / "home")
    assert uri == f"sqlite:///{tmp_path.resolve() / 'home' / 'mlflow' / 'mlflow.db'}"
    assert uri.startswith("sqlite:////") and (tmp_path / "home" / "mlflow").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert default_tracking_uri(tmp_path / "home") == "http://localhost:5000"


def test_null_tracker_accepts_every_call(tmp_path):
    tracker: Tracker = NullTracker()
    assert tracker.run_id is None
    tracker.log_params({"lora.rank": 8})
    tracker.log_params({"lora.rank": 16})
    tracker.log_metrics({"reward/mean": 0.5}, step=1)
    tracker.set_tags({"a": "b"})
    tracker.log_table([{"a": 1}], "t.json")
    tracker.log_text("x", "x.txt")
    tracker.log_artifacts(tmp_path / "nowhere", "adapters")
    tracker.log_figure(object(), "f.png")
    assert tracker.register_policy(tmp_path, aliases=["latest", "best"]) == "0"
    tracker.set_alias("0", "best")
    tracker.finish("FAILED")


def test_a_resumed_run_logs_each_point_table_and_policy_once(store, names, tmp_path):
    first = make_tracker(store, names)
    first.log_metrics({"reward_mean": 0.5}, step=1)
    first.log_table([{"a": 1}], "self_edits/iteration-1.json")
    folder = policy_folder(tmp_path, "iteration-1", "p1")
    version = first.register_policy(folder, aliases=["best"], digest="abc")
    first.finish("FAILED")

    resumed = make_tracker(store, names, run_id=first.run_id)
    resumed.log_metrics({"reward_mean": 0.5, "kept_count": 2.0}, step=1)
    resumed.log_metrics({"reward_mean": 0.7}, step=2)
    resumed.log_table([{"a": 1}], "self_edits/iteration-1.json")
    assert resumed.register_policy(folder, aliases=["best"], digest="abc") == version
    resumed.finish()

    client = MlflowClient(store)
    assert [m.step for m in client.get_metric_history(first.run_id, "reward_mean")] == [1, 2]
    assert [m.step for m in client.get_metric_history(first.run_id, "kept_count")] == [1]
    table = Path(client.download_artifacts(first.run_id, "self_edits/iteration-1.json", str(tmp_path)))
    assert len(json.loads(table.read_text())["data"]) == 1
    assert len(client.search_model_versions(f"name='{names['registered_model']}'")) == 1


def test_find_resumable_run(store, names):
    from flows.tracking import find_resumable_run

    def run(status, digest, pid, flow_run="f0"):
        tracker = MlflowTracker(
            store,
            names["experiment"],
            names["registered_model"],
            run_name="r",
            tags={
                "seal.config_digest": digest,
                "seal.host": socket.gethostname(),
                "seal.pid": str(pid),
                "prefect.flow_run_id": flow_run,
            },
        )
        if status != "RUNNING":
            tracker.finish(status)
        return tracker.run_id

    assert find_resumable_run(store, "no-such-experiment", "f", "d") is None
    run("FINISHED", "d1", 1)
    assert find_resumable_run(store, names["experiment"], "new", "d1") is None
    failed = run("FAILED", "d1", 1)
    assert find_resumable_run(store, names["experiment"], "new", "d1") == failed
    assert find_resumable_run(store, names["experiment"], "new", "d2") is None
    live = run("RUNNING", "d1", os.getpid())  # a concurrent flow in this very process
    assert find_resumable_run(store, names["experiment"], "new", "d1") == failed
    dead = run("RUNNING", "d1", 2**22 + 12345)  # no such process: it was killed
    assert find_resumable_run(store, names["experiment"], "new", "d1") == dead
    client = MlflowClient(store)
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(live).info.status == "RUNNING"
    retried = run("FINISHED", "d3", 1, flow_run="retry-me")
    assert find_resumable_run(store, names["experiment"], "retry-me", "d3") == retried


def test_transient_tracking_failures_are_retried_with_backoff_and_answers_are_not(monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from flows import tracking

    calls, sleeps = [], []
    monkeypatch.setattr(tracking.time, "sleep", sleeps.append)

    class Flaky:
        def log_batch(self, run_id):
            calls.append(run_id)
            if len(calls) < 3:
                raise OSError("disk I/O error")
            return "ok"

        def get_run(self, run_id):
            raise MlflowException("no run", error_code=RESOURCE_DOES_NOT_EXIST)

    client = tracking.RetryingClient(Flaky(), attempts=4, first_delay=0.5)
    assert client.log_batch("r1") == "ok"
    assert len(calls) == 3 and sleeps == [0.5, 1.0]
    with pytest.raises(MlflowException, match="no run"):
        client.get_run("r1")
    assert sleeps == [0.5, 1.0]  # "not found" is an answer: no retry
    calls.clear()
    always = tracking.RetryingClient(
        type("Down", (), {"log_batch": lambda self, r: (_ for _ in ()).throw(OSError("down"))})(),
        attempts=3,
        first_delay=0.1,
    )
    with pytest.raises(OSError, match="down"):
        always.log_batch("r1")
