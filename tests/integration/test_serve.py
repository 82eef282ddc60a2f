"""`seal serve`: both servers answer, the deployments are registered and run, Ctrl-C stops all."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_serve_runs_a_deployment_with_changed_parameters_and_stops_cleanly(served):
    import urllib.request

    prefect, mlflow = served["ports"]["prefect"], served["ports"]["mlflow"]
    for url in (f"http://127.0.0.1:{prefect}/api/health", f"http://127.0.0.1:{mlflow}/health"):
        assert urllib.request.urlopen(url, timeout=5).status == 200
    # A client process of its own: this one may hold another test's Prefect harness settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{prefect}/api"
    client = subprocess.run(
        [sys.executable, "-c", f"from test_serve import run_tiny_deployment; run_tiny_deployment({mlflow})"],
        env=env,
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert client.returncode == 0, client.stdout[-2000:] + client.stderr[-3000:]

    served["process"].send_signal(signal.SIGTERM)
    assert served["process"].wait(timeout=60) is not None
    time.sleep(1)
    assert not [p for p in served["children"] if p.is_running() and p.status() != "zombie"], (
        "a server outlived seal serve"
    )


def run_tiny_deployment(mlflow_port: int) -> None:
    """Start the tiny training deployment with lora.rank changed; find the run in MLflow.
    Runs in a client process whose PREFECT_API_URL is the served server."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from models.config import load_config

    wanted = {"knowledge-tiny", "knowledge-smollm2", "nightly-continued-adaptation"}
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 90  # serve registers them once the flows are imported
        while not wanted <= (names := {d.name for d in client.read_deployments()}):
            assert time.monotonic() < deadline, f"deployments registered: {names}"
            time.sleep(1)
        (tiny,) = [d for d in client.read_deployments() if d.name == "knowledge-tiny"]
        assert "config" in tiny.parameter_openapi_schema["properties"]  # the UI's form
    config = load_config(
        ROOT / "deployments/configs/knowledge-tiny.yaml",
        ["rl.iterations=1", "lora.rank=2", "tracking.experiment=served"],
    )
    run = run_deployment(
        "seal-training/knowledge-tiny", parameters={"config": config.model_dump(mode="json")}, timeout=240
    )
    assert run.state.is_completed(), run.state

    client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    assert tracked.data.params["lora.rank"] == "2" and "reward_mean" in tracked.data.metrics
    assert tracked.data.tags["prefect.flow_run_id"] == str(run.id)
