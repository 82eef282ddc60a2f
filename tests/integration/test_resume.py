"""Rerun only what failed: an injected task failure, then a SIGKILL in the middle of a run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, squad_file as _squad

ROOT = Path(__file__).parents[2]


def _overrides(path: Path, seed: int) -> list[str]:
    return [
        f"data.path={path}",
        "data.source=squad",
        "data.num_train_contexts=2",
        "data.num_eval_contexts=2",
        "self_edit.num_samples=2",
        "rl.iterations=2",
        "inner_loop.epochs=8",
        "inner_loop.learning_rate=3e-2",
        "inner_loop.group_size=2",  # an iteration's inner loops: a group per context
        f"seed={seed}",
        f"tracking.experiment=resume-{seed}",
    ]


def test_a_failed_task_reruns_alone_and_the_mlflow_run_continues(prefect_env, monkeypatch):
    from mlflow import MlflowClient

    from flows.training import seal_training
    from models.config import load_config
    from models.stacked_lora import AdapterStack

    config = load_config(TINY, _overrides(_squad(prefect_env / "squad-fault.json"), seed=7))
    # Adapter folders are named by policy, context and content: one saved twice was recomputed.
    saved = []
    real = AdapterStack.save
    monkeypatch.setattr(AdapterStack, "save", lambda self, k, folder: saved.append(folder) or real(self, k, folder))
    monkeypatch.setenv("SEAL_FAIL_ONCE", "train_adapter:edit1")
    with pytest.raises(Exception, match="SEAL_FAIL_ONCE|injected|edit1"):
        seal_training(config)
    done_before = len(saved)
    client = MlflowClient(f"sqlite:///{prefect_env}/mlflow.db")
    experiment = client.get_experiment_by_name("resume-7").experiment_id
    (failed,) = client.search_runs([experiment])
    assert failed.info.status == "FAILED"

    result = seal_training(config)  # same config: only what had not completed runs
    assert len(set(saved)) == len(saved), "a finished inner loop was trained again"
    assert done_before > 0 and len(saved) > done_before
    (run,) = client.search_runs([experiment])  # the same MLflow run, continued
    assert run.info.run_id == failed.info.run_id == result.run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "held_out/no_adaptation")
    assert sorted(m.step for m in history) == [0, 2]  # each point once


def _saved_adapters(root: Path) -> int:
    """Adapters saved under root, counted while a run may still be writing there.

    A folder being saved is a dot-prefixed temporary one renamed into place when complete, so it can
    vanish mid-walk (`Path.rglob` then raises FileNotFoundError); `os.walk` skips what it can no
    longer list, and temporary folders are not counted.
    """
    count = 0
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        count += "adapter_model.safetensors" in files
    return count


def test_sigkill_mid_iteration_then_rerun_matches_an_uninterrupted_run(tmp_path):
    squad = _squad(tmp_path / "squad.json")

    def environment(name: str) -> dict[str, str]:
        home = tmp_path / name
        return {
            **os.environ,
            "SEAL_HOME": str(home),
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect" / "storage"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/{name}.db",
        }

    env = environment("killed")
    command = [sys.executable, "-m", "flows.cli", "run", str(TINY), *_overrides(squad, seed=3)]
    # A session of its own: the kill takes the run's Prefect server with it, as a killed machine or
    # container would (SIGKILL to the flow process alone left that server running after the test).
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    adapters = tmp_path / "killed" / "adapters"
    deadline = time.monotonic() + 300
    # Kill once the first iteration has trained a few adapters (held-out ones come first).
    while time.monotonic() < deadline and process.poll() is None:
        if _saved_adapters(adapters) >= 6:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = _saved_adapters(adapters)

    rerun = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    uninterrupted = subprocess.run(
        command,
        env=environment("clean"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

    def table(output: str) -> str:
        return output[output.index("held-out closed-book accuracy") : output.index("final policy")]

    assert table(rerun.stdout) == table(uninterrupted.stdout)
    assert finished_before >= 6
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("resume-3").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]  # the killed run was continued, not duplicated


def test_out_of_memory_scores_zero_then_reruns_and_too_many_fail_the_iteration(prefect_env, monkeypatch):
    from flows.training import IterationFailed, seal_training
    from models.config import load_config

    overrides = _overrides(_squad(prefect_env / "squad-oom.json"), seed=11)
    config = load_config(TINY, [*overrides, "rl.iterations=1"])
    monkeypatch.setenv("SEAL_FAIL_ONCE", "train_adapter:edit1=oom")
    # Out of memory stops the group it happens in (2 inner loops, grouped by length): here 2 of 4
    # failed, the group of an edit1, 50% ran, the iteration goes on.
    result = seal_training(config)
    (iteration,) = result.iterations
    oom = [row for row in iteration.rows if row["failure"]]
    assert len(oom) == 2 and 1 in [row["self_edit"] for row in oom]
    assert all(row["failure"].startswith("out of memory") and row["reward"] == 0 for row in oom)
    assert iteration.metrics["failed_self_edits"] == 2

    # The failed task run was not cached: the rerun trains that self-edit (and only it).
    again = seal_training(config)
    failures = [row["failure"] for row in again.iterations[0].rows if row["failure"]]
    assert not [f for f in failures if f.startswith("out of memory")], failures

    # Below inner_loop.min_success_fraction the iteration fails and says why.
    strict = load_config(TINY, [*overrides, "rl.iterations=1", "seed=12", "inner_loop.min_success_fraction=1"])
    monkeypatch.setenv("SEAL_FAIL_ONCE", "train_adapter:edit0=oom")
    with pytest.raises(IterationFailed, match=r"2 of 4 inner loops ran out of memory.*min_success_fraction=1"):
        seal_training(strict)


def test_a_missing_adapter_or_altered_policy_is_recomputed_not_trusted(prefect_env, monkeypatch):
    import shutil

    from flows.training import seal_training
    from models.config import load_config

    config = load_config(TINY, [*_overrides(_squad(prefect_env / "squad-stale.json"), seed=13), "rl.iterations=1"])
    # The run stops with adapters trained (cached) but not all of them evaluated ...
    monkeypatch.setenv("SEAL_FAIL_ONCE", "evaluate_adapter:edit0")
    with pytest.raises(Exception, match="SEAL_FAIL_ONCE"):
        seal_training(config)
    # ... and then their folders are lost: the cached records point at nothing.
    home = Path(os.environ["SEAL_HOME"])
    shutil.rmtree(home / "adapters")
    result = seal_training(config)
    rows = result.iterations[0].rows
    assert not any(row["failure"] for row in rows)
    # The adapters whose evaluation was still to come were trained again; the evaluated ones
    # are not needed any more (their scores are cached) and stay gone.
    assert 0 < sum(Path(row["adapter"]).is_dir() for row in rows) < len(rows)

    # A policy checkpoint altered on disk is not loaded: the update that made it runs again.
    assert result.policy.name == "iteration-1"
    weights = Path(result.policy.path) / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-64] + bytes(64))
    again = seal_training(config)
    assert again.policy.digest == result.policy.digest
    assert weights.read_bytes() == original


def test_sigterm_crashes_the_flow_run_and_stops_its_prefect_server(tmp_path):
    import psutil

    home = tmp_path / "home"
    env = {**os.environ, "SEAL_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    log = tmp_path / "run.log"  # a file, not a pipe: nobody reads the output until the run has ended
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", str(TINY), "rl.iterations=3"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:  # mid-run: adapters are training
        if _saved_adapters(home / "adapters") >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be stopped"
    server = psutil.Process(process.pid).children(recursive=True)
    assert server, "no Prefect server process under the run"
    process.terminate()  # SIGTERM to the flow process alone, as docker stop or a scheduler sends it
    process.wait(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "Crashed('Execution was aborted by a termination signal.')" in log.read_text()
    _, alive = psutil.wait_procs(server, timeout=30)
    for orphan in alive:
        orphan.kill()
    assert not alive, "the run's Prefect server outlived it"
