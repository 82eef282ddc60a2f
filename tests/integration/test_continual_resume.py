"""`seal continual` killed with SIGKILL at step 5: the rerun recomputes only steps 5 onward."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY, continual_overrides, squad_file as _squad

ROOT = Path(__file__).parents[2]


def test_sigkill_at_step_5_then_rerun_recomputes_only_from_step_5(tmp_path):
    squad = _squad(tmp_path / "squad.json")
    home = tmp_path / "home"
    env = {
        **os.environ,
        "SEAL_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect" / "storage"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "continual",
        str(TINY),
        *continual_overrides(squad, "continual.sequences=1", "continual.passages=7", "tracking.experiment=kill"),
    ]
    # Its own session, so the kill takes the run's temporary Prefect server with it (tests/integration/test_resume.py).
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoints = home / "continual"
    deadline = time.monotonic() + 600  # ~1 min alone; minutes on 2 cores shared with a benchmark
    # Step 5 has merged its checkpoint: steps 0..4 are finished and persisted, step 5 is running.
    reached = False
    while not reached and time.monotonic() < deadline and process.poll() is None:
        reached = checkpoints.exists() and any(not p.name.startswith(".") for p in checkpoints.glob("*/seq0-step5/*"))
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    if not reached:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError("the run did not reach step 5 in 10 min: the machine is too loaded to test this")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    rerun = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    logs = rerun.stdout + rerun.stderr
    states = dict(re.findall(r"Task run 'continual-step-seq0-step(\d)' - Finished in state (\w+)", logs))
    assert {k for k, state in states.items() if state == "Cached"} >= {"0", "1", "2", "3", "4"}, states
    assert all(states[k] == "Cached" for k in "01234"), states
    assert states["6"] == "Completed", states  # the step after the one killed ran for the first time
    assert "accuracy on passage j" in rerun.stdout

    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("kill").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]  # the killed run was continued, not duplicated
