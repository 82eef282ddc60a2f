"""The training flow on Ray workers: the local runner's rewards, a model loaded once per worker,
results the other runner reuses, and no process left behind."""

import os
import re

import psutil
import pytest

from conftest import TINY, squad_file


def _ray_processes() -> list[psutil.Process]:
    names = ("raylet", "gcs_server", "ray::", "default_worker.py", "dashboard")
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            command = " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            continue
        if any(name in command for name in names):
            found.append(process)
    return found


@pytest.fixture
def s3_bucket(monkeypatch):
    """An S3 bucket on a local moto server, reachable by every process started from this one
    (s3fs reads the endpoint and credentials from the environment, as on a real cluster)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "seal",
        "AWS_SECRET_ACCESS_KEY": "seal",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("seal-test")
    yield fs, "s3://seal-test"
    server.stop()


def test_two_ray_workers_give_the_local_runners_rewards_and_share_its_cache(
    prefect_env, tmp_path, monkeypatch, s3_bucket
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp
    from prefect.types import DateTime

    from flows.training import seal_training
    from models import inner_loop, self_edit
    from models.config import load_config
    from models.stacked_lora import lanes

    monkeypatch.setenv("SEAL_HOME", str(tmp_path / "home"))  # adapters of this test only
    common = [
        "data.source=squad",
        f"data.path={squad_file(tmp_path / 'squad.json')}",
        "data.num_train_contexts=2",
        "data.num_eval_contexts=1",
        "self_edit.num_samples=2",
        "rl.iterations=1",
        "inner_loop.epochs=8",
        "inner_loop.learning_rate=3e-2",
        "tracking.experiment=ray-runner",
        "tracking.registered_model=ray-runner-policy",
    ]
    local = seal_training(load_config(TINY, [*common, f"runner.result_storage={tmp_path / 'local-results'}"]))

    # Results in a folder for the local run, in an S3 bucket for Ray's.
    started = DateTime.now("UTC")
    s3, bucket = s3_bucket
    ray_storage = f"runner.result_storage={bucket}/results"
    on_ray = seal_training(
        load_config(
            TINY,
            [
                *common,
                "runner.kind=ray",
                "runner.num_workers=2",
                "runner.cpus_per_task=1",
                ray_storage,
            ],
        )
    )

    # The same self-edits, rewards, kept self-edits and held-out scores, computed again (the two
    # runs share no results) by other processes.
    def rows(result):
        return [
            (r["context_id"], r["self_edit"], r["text"], r["reward"], r["kept"], r["accuracy"])
            for it in result.iterations
            for r in it.rows
        ]

    assert rows(on_ray) == rows(local) and len(rows(local)) == 4
    assert [h.correct for _, h in on_ray.held_out] == [h.correct for _, h in local.held_out]
    assert on_ray.iterations[0].metrics["reward_mean"] == local.iterations[0].metrics["reward_mean"]
    assert s3.find(f"{bucket}/results") and any((tmp_path / "local-results").iterdir())

    # Two workers did the work, each loading a policy once, with one torch thread (1 CPU each).
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(timestamp=LogFilterTimestamp(after_=started)))
    loads = [
        re.search(r"loaded policy (\S+) .* in worker \S+:(\d+) in .*, (\d+) torch threads", log.message) for log in logs
    ]
    loads = [(m[1], int(m[2]), int(m[3])) for m in loads if m]
    workers = {pid for _, pid, _ in loads}
    assert len(workers) >= 2 and os.getpid() not in workers, loads
    assert len(loads) == len(set(loads)), f"a worker loaded a policy twice: {loads}"
    assert {threads for _, _, threads in loads} == {1}

    # The flow shut its Ray instance down.
    import ray

    assert not ray.is_initialized()
    gone, alive = psutil.wait_procs(_ray_processes(), timeout=30)
    assert not alive, [p.cmdline() for p in alive]

    # The local runner finds everything the Ray workers computed: no sampling, training or
    # evaluation runs again.
    calls = []
    for module, name in [
        (lanes, "train_slots"),
        (lanes, "evaluate_stacked"),
        (inner_loop, "evaluate_contexts"),
        (self_edit, "sample_self_edits_batch"),
    ]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    again = seal_training(load_config(TINY, [*common, ray_storage]))
    assert calls == [] and rows(again) == rows(on_ray)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["runner.address=auto"], "runner.kind is 'local'"),
        (["runner.gpus_per_task=1"], "only applies to runner.kind=ray"),
        (["runner.kind=ray", "runner.gpus_per_task=1", "model.device=cpu"], "model.device is 'cpu'"),
        (["runner.result_storage=nosuchprotocol://bucket/results"], "fsspec cannot open"),
        (["runner.num_workers=0"], "runner.num_workers"),
    ],
)
def test_inconsistent_runner_settings_fail_when_the_config_loads(overrides, expected):
    from models.config import load_config
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(TINY, overrides)


def test_a_task_that_fits_no_node_fails_before_it_is_submitted():
    from flows.runner import ClusterTooSmall, check_fits
    from models.config import RunnerConfig

    nodes = [{"Alive": True, "Resources": {"CPU": 16.0}}, {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}}]
    check_fits(RunnerConfig(kind="ray", address="auto", cpus_per_task=16), nodes)
    with pytest.raises(ClusterTooSmall, match=r"reserves 1 CPUs and 1 GPUs .* \(16 CPUs/0 GPUs\)"):
        check_fits(RunnerConfig(kind="ray", address="auto", gpus_per_task=1), nodes)


def test_local_instance_workers_share_the_machines_cores_and_this_seal_home(monkeypatch, tmp_path):
    from flows.runner import ray_init_kwargs
    from models.config import RunnerConfig

    monkeypatch.setenv("SEAL_HOME", str(tmp_path))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    local = ray_init_kwargs(RunnerConfig(kind="ray", num_workers=4))
    assert local["address"] == "local"  # never whatever instance already runs on the machine
    assert local["num_cpus"] == 16 and local["runtime_env"]["env_vars"] == {
        "SEAL_HOME": str(tmp_path),
        "OMP_NUM_THREADS": "4",
    }
    cluster = ray_init_kwargs(RunnerConfig(kind="ray", address="ray://head:10001", gpus_per_task=1))
    assert cluster["address"] == "ray://head:10001" and "num_cpus" not in cluster
    assert cluster["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "1"


@pytest.fixture
def ray_cluster_address():
    """A Ray cluster started as an operator would (``ray start --head``), stopped by its process ids."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from conftest import free_port

    gcs, client = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(Path(__file__).parents[2])}
    before = {p.pid for p in psutil.process_iter()}
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            f"--port={gcs}",
            f"--ray-client-server-port={client}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    started = [p for p in psutil.process_iter() if p.pid not in before and str(gcs) in " ".join(p.cmdline())]
    yield f"ray://127.0.0.1:{client}"
    family = [q for p in started if p.is_running() for q in (p, *p.children(recursive=True))]
    for process in family:
        process.terminate()
    _, alive = psutil.wait_procs(family, timeout=30)
    for process in alive:
        process.kill()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow  # starts its own Ray cluster and runs the tiny flow through Ray Client: ~1 min
def test_the_flow_runs_on_an_existing_cluster_through_ray_client(
    prefect_env, tmp_path, monkeypatch, ray_cluster_address
):
    from flows.training import seal_training
    from models.config import load_config

    monkeypatch.setenv("SEAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    result = seal_training(
        load_config(
            TINY,
            [
                "data.source=squad",
                f"data.path={squad_file(tmp_path / 'squad.json')}",
                "data.num_eval_contexts=1",
                "rl.iterations=1",
                "inner_loop.epochs=8",
                "inner_loop.learning_rate=3e-2",
                "tracking.experiment=ray-client",
                "runner.kind=ray",
                f"runner.address={ray_cluster_address}",
                f"runner.result_storage={tmp_path / 'results'}",
            ],
        )
    )
    (iteration,) = result.iterations
    assert len(iteration.rows) == 4  # 2 contexts x 2 self-edits, trained and scored on the cluster
    assert iteration.metrics["adapted_accuracy"] > iteration.metrics["baseline_accuracy"]
    assert any((tmp_path / "results").iterdir())
