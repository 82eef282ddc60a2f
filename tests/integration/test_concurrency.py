"""Two training runs at once on the same SEAL_HOME and Prefect server do not corrupt each other."""

import base64
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY, squad_file

ROOT = Path(__file__).parents[2]


def test_two_runs_at_once_share_results_without_corrupting_them(prefect_env, tmp_path):
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL
    import cloudpickle
    from prefect.results import ResultRecord
    from safetensors.torch import load_file

    squad = squad_file(tmp_path / "squad.json")
    overrides = [
        f"data.path={squad}",
        "data.source=squad",
        "data.num_train_contexts=2",
        "data.num_eval_contexts=2",
        "self_edit.num_samples=2",
        "rl.iterations=1",
        "inner_loop.epochs=8",
        "inner_loop.learning_rate=3e-2",
        "seed=21",
        "tracking.experiment=concurrent",
        "tracking.registered_model=concurrent-policy",
    ]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # both on the test server
    command = [sys.executable, "-m", "flows.cli", "run", str(TINY), *overrides]
    runs = [
        subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]

    # Two MLflow runs with the same numbers: one computed each shared task, the other read it.
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    first, second = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert first.info.status == second.info.status == "FINISHED"
    scores = [{k: v for k, v in run.data.metrics.items() if not k.endswith("seconds")} for run in (first, second)]
    assert scores[0] == scores[1] and "reward_mean" in scores[0]
    assert outputs[0][0].split("final policy")[0] == outputs[1][0].split("final policy")[0]  # held-out tables

    # Every adapter and result file on disk is whole.
    home = Path(os.environ["SEAL_HOME"])
    for adapter in (home / "adapters").rglob("adapter_model.safetensors"):
        load_file(adapter)
    assert not [p for p in (home / "adapters").rglob(".*") if p.is_dir()], "a temporary folder was left behind"
    for result in Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"]).iterdir():
        data = result.read_bytes()
        if data.startswith(b"{"):  # a task's result record
            ResultRecord.deserialize(data).result
        else:  # a flow's return value: the pickle alone
            cloudpickle.loads(base64.b64decode(data))
