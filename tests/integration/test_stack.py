"""The team stack of docker-compose.yml on real components, started the way compose starts them.

No Docker engine runs here, so each service runs natively with the command and environment
compose would give it (read from docker-compose.yml, service names and volumes mapped to
127.0.0.1 ports and temporary folders): PostgreSQL with the two databases of
deployments/docker/init-databases.sql, the Prefect server and the MLflow server (basic auth) on
it, a process worker of the pool `seal`, and the deployments of deployments/prefect.yaml
registered by `prefect deploy`. Then, as a user does from the UI (through the same API):

- unauthenticated requests are refused, authenticated ones accepted, by both servers;
- a run of the tiny config's deployment finishes with its MLflow run and registered policy in
  Postgres, while a second deployment run runs at the same time, both intact;
- a run with a task failing once (SEAL_FAIL_ONCE), retried as the UI's Retry button does,
  recomputes only the failed task and its dependants, and ends with the uninterrupted metrics;
- the worker killed mid-run and restarted: the run is resumed, not started over.

Needs PostgreSQL's server programs (Debian's `postgresql`; `.ci/run` installs it); without them the
tests are skipped and say so.
"""

from __future__ import annotations

import base64
import glob
import importlib
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from compose import load_compose
from conftest import free_port, squad_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
SECRETS = {
    "POSTGRES_PASSWORD": "pg4stack",
    "PREFECT_API_AUTH_STRING": "team:prefect-4-stack",
    "MLFLOW_AUTH_ADMIN_USERNAME": "boss",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "Mlflow-4-stack-test",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-4-stack",
}
TINY_CONFIG = ROOT / "deployments" / "configs" / "knowledge-tiny.yaml"


def postgres_programs() -> Path | None:
    """The folder of initdb and postgres: on PATH, or Debian's /usr/lib/postgresql/N/bin."""
    if found := shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


class Stack:
    """The services' processes, addresses and folders, and the calls a user's client makes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = {"postgres": free_port(), "prefect-server": free_port(), "mlflow": free_port()}
        self.compose = load_compose(SECRETS)
        self.services = self.compose["services"]
        # Volumes and the image's paths, on this machine.
        self.mounts = {
            "/seal": root / "seal",
            "/mlflow-artifacts": root / "mlflow-artifacts",
            "/mlflow-auth": root / "mlflow-auth",
            "/app": ROOT,
        }
        for folder in self.mounts.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}
        self.pg_dir: Path | None = None
        self.prefect_api = f"http://127.0.0.1:{self.ports['prefect-server']}/api"
        self.mlflow_url = f"http://127.0.0.1:{self.ports['mlflow']}"

    # --- compose -> this machine -------------------------------------------------------------

    def localize(self, text: str) -> str:
        """A compose value with service addresses and container paths made local."""
        for service, container_port in (("postgres", 5432), ("prefect-server", 4200), ("mlflow", 5000)):
            text = text.replace(f"{service}:{container_port}", f"127.0.0.1:{self.ports[service]}")
            text = text.replace(f"127.0.0.1:{container_port}", f"127.0.0.1:{self.ports[service]}")
            text = text.replace(f"--port {container_port}", f"--port {self.ports[service]}")
        text = text.replace("--host 0.0.0.0", "--host 127.0.0.1")  # ports publish on 127.0.0.1
        for mount, folder in self.mounts.items():
            if text == mount or text.startswith(mount + "/"):
                return str(folder) + text[len(mount) :]
            text = text.replace(f"sqlite:///{mount}/", f"sqlite:///{folder}/")
        return text

    def environment(self, service: str) -> dict[str, str]:
        """This machine's environment less Prefect's and MLflow's settings, plus the service's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env |= {k: self.localize(str(v)) for k, v in self.services[service].get("environment", {}).items()}
        # Each container has a home of its own: Prefect's profile must not be this user's.
        env["PREFECT_HOME"] = str(self.root / "prefect-home" / service)
        Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def command(self, service: str) -> list[str]:
        command = self.localize(" ".join(self.services[service]["command"].split()))
        words = [self.localize(word) for word in shlex.split(command)]
        return [str(BIN / words[0]), *words[1:]]

    def start(
        self, service: str, command: list[str], env: dict[str, str], cwd: Path | None = None, preexec=None
    ) -> subprocess.Popen:
        log = open(self.root / f"{service}.log", "ab")
        # A session of its own: stopping a service stops every process it started.
        process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd or self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
        self.processes[service] = process
        return process

    def log(self, service: str, tail: int = 3000) -> str:
        path = self.root / f"{service}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def stop(self, service: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(service, None)
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    # --- the services ------------------------------------------------------------------------

    def start_postgres(self, programs: Path) -> None:
        """initdb and postgres as the postgres image does: POSTGRES_USER with POSTGRES_PASSWORD
        (scram over TCP), then the init scripts mounted into /docker-entrypoint-initdb.d."""
        env = self.services["postgres"]["environment"]
        self.pg_user, self.pg_password = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]
        # Postgres refuses to run as root: as root, run it as the `postgres` user, in a folder
        # that user can reach (pytest's folders are private to root).
        self.pg_dir = Path(tempfile.mkdtemp(prefix="seal-stack-pg-"))
        preexec = None
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres" if _has_user("postgres") else "nobody")
            os.chown(self.pg_dir, account.pw_uid, account.pw_gid)

            def preexec():  # noqa: E306
                os.setgid(account.pw_gid)
                os.setgroups([])
                os.setuid(account.pw_uid)

        (self.pg_dir / "pw").write_text(self.pg_password)
        if os.geteuid() == 0:
            os.chown(self.pg_dir / "pw", account.pw_uid, account.pw_gid)
        data = self.pg_dir / "data"
        subprocess.run(
            [
                str(programs / "initdb"),
                "-D",
                str(data),
                "-U",
                self.pg_user,
                f"--pwfile={self.pg_dir / 'pw'}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            preexec_fn=preexec,
            cwd=self.pg_dir,
        )
        self.start(
            "postgres",
            [
                str(programs / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.ports["postgres"]),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.pg_dir}",
                "-c",
                "fsync=off",
            ],
            env=dict(os.environ),
            cwd=self.pg_dir,
            preexec=preexec,
        )
        deadline = time.monotonic() + 60
        while (
            subprocess.run(
                [str(programs / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.ports["postgres"])],
                capture_output=True,
            ).returncode
            != 0
        ):
            assert self.processes["postgres"].poll() is None, self.log("postgres")
            assert time.monotonic() < deadline, "postgres did not accept connections in 60 s"
            time.sleep(0.2)
        self.pg_env = {**os.environ, "PGPASSWORD": self.pg_password}
        for volume in self.services["postgres"]["volumes"]:
            source, target = volume.split(":")[:2]
            if target.startswith("/docker-entrypoint-initdb.d/"):
                self.psql("postgres", "-f", str(ROOT / source))

    def psql(self, database: str, *args: str) -> str:
        """Run psql against the stack's Postgres as POSTGRES_USER; return its unaligned output."""
        result = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.ports["postgres"]),
                "-U",
                self.pg_user,
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                *args,
            ],
            env=self.pg_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def start_servers(self) -> None:
        self.start("prefect-server", self.command("prefect-server"), self.environment("prefect-server"))
        mlflow_env = self.environment("mlflow")
        # The auth config the image ships, its database moved to the mlflow-auth folder.
        shipped = self.localize(mlflow_env["MLFLOW_AUTH_CONFIG_PATH"])
        ini = self.root / "mlflow-auth.ini"
        ini.write_text(self.localize_text(Path(shipped).read_text()))
        mlflow_env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        self.start("mlflow", self.command("mlflow"), mlflow_env)

    def localize_text(self, text: str) -> str:
        return "\n".join(" = ".join(self.localize(part) for part in line.split(" = ", 1)) for line in text.splitlines())

    def wait_healthy(self, timeout: float = 150) -> None:
        urls = {"prefect-server": f"{self.prefect_api}/health", "mlflow": f"{self.mlflow_url}/health"}
        deadline = time.monotonic() + timeout
        while urls:
            for name, url in list(urls.items()):
                assert self.processes[name].poll() is None, f"{name} exited:\n{self.log(name)}"
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        if response.status == 200:
                            del urls[name]
                except OSError:
                    pass
            assert time.monotonic() < deadline, f"{sorted(urls)} not healthy in {timeout:.0f} s"
            time.sleep(0.3)

    def worker_env(self) -> dict[str, str]:
        env = self.environment("worker")
        for key in list(env):
            if key.startswith("RAY_"):
                env.pop(key)
        return env

    def start_worker(self) -> subprocess.Popen:
        return self.start("worker", self.command("worker"), self.worker_env())

    def client_env(self) -> dict[str, str]:
        """A user's seat: the two URLs and the credentials the team settings give them."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        return env | {
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_API_AUTH_STRING": SECRETS["PREFECT_API_AUTH_STRING"],
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": SECRETS["MLFLOW_AUTH_ADMIN_USERNAME"],
            "MLFLOW_TRACKING_PASSWORD": SECRETS["MLFLOW_AUTH_ADMIN_PASSWORD"],
            "PREFECT_HOME": str(self.root / "prefect-home"),
            "PREFECT_CLI_PROMPT": "false",
        }

    # --- the Prefect API, as the UI calls it -------------------------------------------------

    def api(self, method: str, path: str, body: dict | None = None, auth: str | None = "default") -> tuple[int, object]:
        auth = SECRETS["PREFECT_API_AUTH_STRING"] if auth == "default" else auth
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        request = urllib.request.Request(
            f"{self.prefect_api}{path}",
            method=method,
            headers=headers,
            data=None if body is None else json.dumps(body).encode(),
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def ok(self, method: str, path: str, body: dict | None = None) -> object:
        status, answer = self.api(method, path, body)
        assert 200 <= status < 300, (method, path, status, answer)
        return answer

    def deployment(self, name: str, flow: str = "seal-training") -> dict:
        return self.ok("GET", f"/deployments/name/{flow}/{name}")

    def run_deployment(self, name: str, config: dict, env: dict[str, str] | None = None) -> str:
        """What the UI's "Run > Custom run" posts; returns the flow run id."""
        body = {"parameters": {"config": config}, "job_variables": {"env": env or {}}}
        return self.ok("POST", f"/deployments/{self.deployment(name)['id']}/create_flow_run", body)["id"]

    def flow_run(self, run_id: str) -> dict:
        return self.ok("GET", f"/flow_runs/{run_id}")

    def wait_final(self, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while (run := self.flow_run(run_id))["state"]["type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            assert time.monotonic() < deadline, f"flow run still {run['state']['name']}:\n{self.log('worker')}"
            assert "worker" not in self.processes or self.processes["worker"].poll() is None, self.log("worker")
            time.sleep(1)
        return run

    def set_state(self, run_id: str, state_type: str, name: str, message: str) -> None:
        answer = self.ok(
            "POST",
            f"/flow_runs/{run_id}/set_state",
            {"state": {"type": state_type, "name": name, "message": message}, "force": True},
        )
        assert answer["status"] == "ACCEPT", answer

    def retry(self, run_id: str) -> None:
        """The UI's Retry button: the run, forced back to Scheduled (AwaitingRetry) for a worker."""
        self.set_state(run_id, "SCHEDULED", "AwaitingRetry", "Retry from the UI")

    def task_runs(self, run_id: str) -> list[dict]:
        """Every task run of the flow run and of its subflow runs, oldest first."""
        flow_runs, frontier = [run_id], [run_id]
        while frontier:
            children = self.ok(
                "POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": frontier}}, "limit": 200}
            )
            frontier = [child["id"] for child in children if child["id"] not in flow_runs]
            flow_runs += frontier
        runs = self.ok(
            "POST",
            "/task_runs/filter",
            {"flow_runs": {"id": {"any_": flow_runs}}, "limit": 200, "sort": "EXPECTED_START_TIME_ASC"},
        )
        return runs

    # --- MLflow, read where it lives: in Postgres --------------------------------------------

    def mlflow_run(self, flow_run_id: str) -> dict:
        rows = self.psql(
            "mlflow",
            "-c",
            "SELECT r.run_uuid, r.status, e.name FROM runs r JOIN tags t ON "
            "t.run_uuid = r.run_uuid JOIN experiments e ON e.experiment_id = r.experiment_id "
            f"WHERE t.key = 'prefect.flow_run_id' AND t.value = '{flow_run_id}'",
        ).splitlines()
        assert len(rows) == 1, f"MLflow runs of flow run {flow_run_id}: {rows}"
        run_id, status, experiment = rows[0].split("|")
        metrics = dict(
            line.split("|")
            for line in self.psql(
                "mlflow", "-c", f"SELECT key, value FROM latest_metrics WHERE run_uuid = '{run_id}'"
            ).splitlines()
        )
        versions = self.psql("mlflow", "-c", f"SELECT name, version FROM model_versions WHERE run_id = '{run_id}'")
        return {
            "id": run_id,
            "status": status,
            "experiment": experiment,
            "versions": versions.splitlines(),
            "metrics": {k: float(v) for k, v in metrics.items()},
        }


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _stop_all(stack: Stack) -> None:
    for service in ["worker", "prefect-server", "mlflow", "postgres"]:
        stack.stop(service)
    if stack.pg_dir is not None:
        shutil.rmtree(stack.pg_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    programs = postgres_programs()
    if programs is None or not shutil.which("psql"):
        pytest.skip(
            "PostgreSQL's server programs (initdb, postgres, psql) are not installed: "
            "`apt-get install postgresql` (.ci/run does this as root)"
        )
    stack = Stack(tmp_path_factory.mktemp("stack"))
    started = time.monotonic()
    try:
        stack.start_postgres(programs)
        stack.start_servers()
        stack.wait_healthy()
        stack.start_worker()  # its first start creates the work pool
        deadline = time.monotonic() + 60
        while stack.api("GET", "/work_pools/seal")[0] != 200:
            assert stack.processes["worker"].poll() is None, stack.log("worker")
            assert time.monotonic() < deadline, "the worker created no work pool `seal`"
            time.sleep(0.5)
        deploy = subprocess.run(
            [str(BIN / "prefect"), "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
            cwd=ROOT,
            env=stack.client_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        stack.started_in = time.monotonic() - started
        yield stack
    finally:
        _stop_all(stack)


def test_unauthenticated_requests_are_refused_and_authenticated_ones_accepted(stack):
    # Prefect: the health probe is open (compose's health check); everything else needs the string.
    assert stack.api("GET", "/health", auth=None)[0] == 200
    for auth in (None, "team:wrong"):
        assert stack.api("POST", "/flow_runs/filter", {}, auth=auth)[0] == 401
        assert stack.api("GET", "/work_pools/seal", auth=auth)[0] == 401
    assert stack.api("POST", "/flow_runs/filter", {})[0] == 200

    # MLflow: the REST API and the UI's pages need a user.
    def mlflow(path: str, user: tuple[str, str] | None) -> int:
        request = urllib.request.Request(f"{stack.mlflow_url}{path}")
        if user:
            request.add_header("Authorization", "Basic " + base64.b64encode(":".join(user).encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    search = "/api/2.0/mlflow/experiments/search?max_results=10"
    admin = (SECRETS["MLFLOW_AUTH_ADMIN_USERNAME"], SECRETS["MLFLOW_AUTH_ADMIN_PASSWORD"])
    assert mlflow(search, None) == 401 and mlflow(search, (admin[0], "wrong")) == 401
    assert mlflow("/", None) == 401
    assert mlflow(search, admin) == 200
    assert mlflow("/health", None) == 200
    # Postgres: no password, no connection.
    refused = subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(stack.ports["postgres"]),
            "-U",
            "seal",
            "-d",
            "mlflow",
            "-w",
            "-c",
            "SELECT 1",
        ],
        env={k: v for k, v in os.environ.items() if k != "PGPASSWORD"},
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "password" in refused.stderr


def test_the_registered_deployments_run_their_config_files(stack):
    """What `prefect deploy` registered is what `seal run FILE OVERRIDES` runs."""
    from models.config import SealConfig, load_config

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function).name
        registered = stack.deployment(deployment["name"], flow)
        (step,) = deployment["build"]
        source = step["flows.deployment_config.config_parameter"]
        expected = load_config(ROOT / source["file"], source.get("overrides", []))
        assert SealConfig.model_validate(registered["parameters"]["config"]) == expected, deployment["name"]
        assert registered["work_pool_name"] == "seal"
        assert registered["pull_steps"] == spec["pull"]  # resolved on the worker, from its SEAL_REPO


def test_seal_doctor_passes_on_the_stack_and_names_each_problem(stack):
    """`seal doctor`'s checks from a user's seat, against the real servers and worker."""
    from flows.doctor import FAIL, OK, format_checks, run_checks
    from models.config import load_config

    home = stack.mounts["/seal"]
    seat = stack.client_env() | {
        "SEAL_HOME": str(home),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect" / "storage"),
    }
    config = load_config(TINY_CONFIG)
    checks = run_checks(seat, "seal", config)
    assert [c.status for c in checks] == [OK] * 5, format_checks(checks)
    assert "1 live worker(s)" in checks[2].message

    def problems(env: dict[str, str], pool: str = "seal") -> str:
        return "\n".join(c.message for c in run_checks(env, pool, config) if c.status == FAIL)

    assert "refused PREFECT_API_AUTH_STRING (team:***)" in problems(seat | {"PREFECT_API_AUTH_STRING": "team:nope"})
    no_user = {k: v for k, v in seat.items() if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    assert "asks for a user" in problems(no_user)
    assert "no work pool 'gpu'" in problems(seat, pool="gpu")


def _config(stack: Stack, *overrides: str) -> dict:
    """The tiny config on passages its random model can learn from (so a policy is kept and
    registered), as a user sets them in the UI's custom-run form."""
    from models.config import load_config

    data = stack.mounts["/seal"] / "squad.json"
    if not data.exists():
        squad_file(data)
    learnable = [
        f"data.path={data}",
        "data.source=squad",
        "self_edit.num_samples=2",
        "rl.iterations=1",
        "inner_loop.epochs=8",
        "inner_loop.learning_rate=3e-2",
        "inner_loop.group_size=2",
        "seed=13",
    ]
    return load_config(TINY_CONFIG, [*learnable, *overrides]).model_dump(mode="json")


def _comparable(metrics: dict[str, float]) -> dict[str, float]:
    """A run's results, less what measures time or memory."""
    return {k: v for k, v in metrics.items() if not any(w in k for w in ("seconds", "time", "memory", "_mb"))}


@pytest.fixture(scope="module")
def baseline(stack):
    """The tiny deployment run as registered, and another deployment run (another seed) at once."""
    first = stack.run_deployment("knowledge-tiny", _config(stack))
    second = stack.run_deployment("knowledge-tiny", _config(stack, "seed=5", "tracking.experiment=stack-concurrent"))
    runs = [stack.wait_final(run_id, timeout=300) for run_id in (first, second)]
    return {"runs": runs, "tracked": [stack.mlflow_run(run["id"]) for run in runs]}


def test_two_deployment_runs_at_once_finish_with_their_mlflow_runs_and_policies_in_postgres(stack, baseline):
    first, second = baseline["runs"]
    for run in (first, second):
        assert run["state"]["type"] == "COMPLETED", (run["state"], stack.log("worker"))
    # They ran at the same time, on the one worker.
    assert first["start_time"] < second["end_time"] and second["start_time"] < first["end_time"]
    tiny, other = baseline["tracked"]
    assert tiny["status"] == other["status"] == "FINISHED"
    assert tiny["experiment"] == _config(stack)["tracking"]["experiment"] and other["experiment"] == "stack-concurrent"
    assert tiny["id"] != other["id"] and set(tiny["metrics"]) == set(other["metrics"])
    assert "reward_mean" in tiny["metrics"]
    # Each registered its policies, as versions of its own (the registry lives in Postgres).
    assert tiny["versions"] and not set(tiny["versions"]) & set(other["versions"])
    print("tiny metrics", tiny["metrics"], "versions", tiny["versions"])


def _attempts(stack: Stack, run_id: str, before: set[str]) -> tuple[list[dict], list[dict]]:
    """The task runs of the first attempt (ids in ``before``) and of the ones after."""
    runs = stack.task_runs(run_id)
    return [r for r in runs if r["id"] in before], [r for r in runs if r["id"] not in before]


def _names(runs: list[dict], state: str) -> list[str]:
    return [r["name"] for r in runs if r["state"]["name"] == state]


def test_retry_from_the_ui_recomputes_only_the_failed_task_and_its_dependants(stack, baseline):
    config = _config(stack, "tracking.experiment=stack-retry", f"runner.result_storage={stack.root / 'results-retry'}")
    run_id = stack.run_deployment("knowledge-tiny", config, env={"SEAL_FAIL_ONCE": "train_adapter:edit1"})
    failed = stack.wait_final(run_id, timeout=300)
    assert failed["state"]["type"] == "FAILED", failed["state"]
    time.sleep(2)  # task run states arrive as events
    first = stack.task_runs(run_id)
    stack.retry(run_id)
    retried = stack.wait_final(run_id, timeout=300)
    assert retried["state"]["type"] == "COMPLETED", (retried["state"], stack.log("worker"))
    assert retried["run_count"] == 2
    time.sleep(2)
    before, after = _attempts(stack, run_id, {r["id"] for r in first})
    print("FIRST", [(r["name"], r["state"]["name"]) for r in before])
    print("AFTER", [(r["name"], r["state"]["name"]) for r in after])
    (failed_task,) = _names(before, "Failed")
    recomputed = _names(after, "Completed")
    assert failed_task in recomputed
    assert not set(recomputed) & set(_names(before, "Completed")), "a task that had completed ran again"
    assert _names(after, "Cached"), "nothing was reused"
    tracked = stack.mlflow_run(run_id)  # one MLflow run, continued
    assert tracked["status"] == "FINISHED"
    assert _comparable(tracked["metrics"]) == _comparable(baseline["tracked"][0]["metrics"])


def test_worker_killed_mid_run_and_restarted_leaves_the_run_resumable(stack, baseline):
    import psutil

    config = _config(stack, "tracking.experiment=stack-kill", f"runner.result_storage={stack.root / 'results-kill'}")
    run_id = stack.run_deployment("knowledge-tiny", config)
    deadline = time.monotonic() + 240
    # Kill once the run has finished some work (the held-out baseline's inner loops), as a
    # machine or container going down would: the worker and the flow run's process together.
    while len(_names(done := stack.task_runs(run_id), "Completed")) < 4:
        assert stack.flow_run(run_id)["state"]["type"] in ("SCHEDULED", "PENDING", "RUNNING"), stack.log("worker")
        assert time.monotonic() < deadline, "the run completed no tasks in 240 s"
        time.sleep(0.5)
    worker = psutil.Process(stack.processes["worker"].pid)
    for process in [*worker.children(recursive=True), worker]:
        process.kill()
    stack.processes.pop("worker").wait()
    time.sleep(2)
    assert stack.flow_run(run_id)["state"]["type"] == "RUNNING"  # nobody told the server
    before = {r["id"] for r in stack.task_runs(run_id)}
    completed_before = set(_names(stack.task_runs(run_id), "Completed"))
    assert completed_before >= set(_names(done, "Completed"))

    stack.start_worker()
    # In the UI: "Change state" to Crashed, then Retry.
    stack.set_state(run_id, "CRASHED", "Crashed", "the worker's machine went down")
    stack.retry(run_id)
    resumed = stack.wait_final(run_id, timeout=300)
    assert resumed["state"]["type"] == "COMPLETED", (resumed["state"], stack.log("worker"))
    time.sleep(2)
    _, after = _attempts(stack, run_id, before)
    assert not set(_names(after, "Completed")) & completed_before, "work finished before the kill ran again"
    assert _names(after, "Cached")
    tracked = stack.mlflow_run(run_id)  # the killed run's MLflow run, continued (not a second one)
    assert tracked["status"] == "FINISHED"
    assert _comparable(tracked["metrics"]) == _comparable(baseline["tracked"][0]["metrics"])
