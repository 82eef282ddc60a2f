"""``seal serve``: Prefect and MLflow servers on localhost, and the SEAL flows served to them.

    seal serve                                  # Prefect UI :4200, MLflow UI :5000
    seal serve --prefect-port 4300 --mlflow-port 5300

Starts ``prefect server start`` (SQLite under ``$SEAL_HOME/prefect``) and ``mlflow server``
(the same SQLite store and artifact folder ``seal run`` writes to, so earlier runs show too),
waits for both health endpoints, then serves deployments of the training and evaluation flows
(:func:`deployments`). Runs started or scheduled in the Prefect UI execute in this process's
children; their parameter form is the typed config. Ctrl-C or SIGTERM stops everything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "deployments" / "configs"


@dataclass(frozen=True)
class Endpoints:
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000

    @property
    def prefect_api(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def prefect_ui(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def mlflow_ui(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"


def server_commands(endpoints: Endpoints, home: Path) -> dict[str, list[str]]:
    """The command lines of the two servers (their executables sit beside this Python)."""
    from flows.tracking import _artifact_location, default_tracking_uri

    bin_dir = Path(sys.executable).parent
    tracking_uri = default_tracking_uri(home)
    return {
        "prefect": [
            str(bin_dir / "prefect"),
            "server",
            "start",
            "--host",
            endpoints.host,
            "--port",
            str(endpoints.prefect_port),
            "--log-level",
            "WARNING",
            "--analytics-off",
        ],
        "mlflow": [
            str(bin_dir / "mlflow"),
            "server",
            "--host",
            endpoints.host,
            "--port",
            str(endpoints.mlflow_port),
            "--backend-store-uri",
            tracking_uri,
            "--default-artifact-root",
            _artifact_location(tracking_uri),
            "--workers",
            "1",
        ],
    }


def wait_healthy(urls: dict[str, str], processes: dict[str, subprocess.Popen], timeout: float) -> dict[str, float]:
    """Poll each health URL until it answers 200; return the seconds each took."""
    start = time.monotonic()
    ready: dict[str, float] = {}
    while len(ready) < len(urls):
        for name, url in urls.items():
            if name in ready:
                continue
            if processes[name].poll() is not None:
                raise RuntimeError(
                    f"the {name} server exited with code {processes[name].returncode} before answering {url}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        ready[name] = time.monotonic() - start
            except OSError:
                pass
        if time.monotonic() - start > timeout:
            missing = sorted(set(urls) - set(ready))
            raise TimeoutError(f"{', '.join(missing)} did not answer within {timeout:.0f}s")
        time.sleep(0.25)
    return ready


@contextmanager
def servers(endpoints: Endpoints, home: Path, timeout: float = 120) -> Iterator[dict[str, float]]:
    """Run both servers for the block; yield the seconds each took to become healthy."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_URL": endpoints.prefect_api,
        # MLflow's GenAI job runner serves nothing SEAL logs; its idle workers cost memory.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, command in server_commands(endpoints, home).items():
            # Own process group: one signal stops a server and the workers it forked.
            processes[name] = subprocess.Popen(
                command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        yield wait_healthy(
            {"prefect": f"{endpoints.prefect_api}/health", "mlflow": f"{endpoints.mlflow_ui}/health"},
            processes,
            timeout,
        )
    finally:
        stop(processes.values())


def stop(processes, grace: float = 10) -> None:
    """SIGTERM each process group, then SIGKILL what is left after ``grace`` seconds."""
    for process in processes:
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def deployments(config_dir: Path = CONFIGS) -> list:
    """One training deployment per config (knowledge and few-shot), one continual-adaptation
    deployment per ``continual-*.yaml``, an evaluation deployment, and a paused nightly run
    (continued adaptation on new data) to switch on in the UI."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.continual import seal_continual
    from flows.evaluation import seal_evaluation
    from flows.nightly import seal_nightly
    from flows.training import seal_training
    from models.config import load_config

    result = []
    for path in sorted([*config_dir.glob("knowledge-*.yaml"), *config_dir.glob("fewshot-*.yaml")]):
        config = load_config(path).model_dump(mode="json")
        result.append(
            seal_training.to_deployment(
                name=path.stem,
                parameters={"config": config},
                tags=["seal", "training"],
                entrypoint_type=EntrypointType.MODULE_PATH,
                description=f"SEAL training (ReST-EM) with {path.name}; edit any field in the form.",
            )
        )
    for path in sorted(config_dir.glob("continual-*.yaml")):
        config = load_config(path).model_dump(mode="json")
        result.append(
            seal_continual.to_deployment(
                name=path.stem,
                parameters={"config": config},
                tags=["seal", "continual"],
                entrypoint_type=EntrypointType.MODULE_PATH,
                description=f"Self-edits merged one after another, and the forgetting matrix, with {path.name}.",
            )
        )
    default = load_config(config_dir / "knowledge-smollm2.yaml").model_dump(mode="json")
    result.append(
        seal_evaluation.to_deployment(
            name="knowledge-smollm2",
            parameters={"config": default, "policy": "models:/seal-policy@best"},
            tags=["seal", "evaluation"],
            entrypoint_type=EntrypointType.MODULE_PATH,
            description="Held-out evaluation of a policy (base, a folder or a models:/ URI).",
        )
    )
    result.append(
        seal_nightly.to_deployment(
            name="nightly-continued-adaptation",
            parameters={"config": default, "policy": "models:/seal-policy@latest"},
            schedules=[Cron("0 2 * * *", timezone="UTC", active=False)],
            tags=["seal", "training", "scheduled"],
            entrypoint_type=EntrypointType.MODULE_PATH,
            description="Every night at 02:00 UTC (inactive until switched on): continue the latest registered policy "
            "on contexts it has not seen; register the result only if held-out accuracy did not drop.",
        )
    )
    return result


def serve(endpoints: Endpoints, home: Path, print_=print) -> int:
    """Start the servers, serve the deployments until interrupted, stop everything."""
    os.environ["PREFECT_API_URL"] = endpoints.prefect_api
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["SEAL_MLFLOW_UI"] = endpoints.mlflow_ui
    start = time.monotonic()
    stopping = False

    def terminate(signum, frame):  # SIGTERM behaves as Ctrl-C: unwind, stop the servers
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        with servers(endpoints, home):
            print_(
                f"Prefect UI: {endpoints.prefect_ui}   MLflow UI: {endpoints.mlflow_ui}   "
                f"(both healthy after {time.monotonic() - start:.1f}s; SEAL home {home})",
                flush=True,
            )
            from prefect import serve as prefect_serve

            prefect_serve(*deployments(), print_starting_message=False)
    except KeyboardInterrupt:
        pass
    print_("stopped", flush=True)
    return 0
