"""Shared fixtures: a temporary SEAL home and the tiny random model, offline."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = Path(__file__).parents[1] / "deployments" / "configs" / "knowledge-tiny.yaml"

from flows.cli import QUIET_ENV  # noqa: E402  (offline and quiet, as the seal command runs)
from models.process import configure_process  # noqa: E402

os.environ.update(QUIET_ENV)
configure_process()  # the process settings the seal command applies
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # make test's workers: each its share of the cores, as Ray's do
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    )


@pytest.fixture
def seal_home(tmp_path, monkeypatch):
    home = tmp_path / "seal-home"
    monkeypatch.setenv("SEAL_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny random model, loaded once for the session (tests must leave it unadapted)."""
    from models.base_model import load_model

    return load_model("tiny-random", home=tmp_path_factory.mktemp("tiny-home"), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory):
    """Prefect's test server, with persisted results, MLflow and SEAL_HOME in a temp folder."""
    root = tmp_path_factory.mktemp("flow")
    env = {
        "SEAL_HOME": str(root / "seal"),
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "seal" / "prefect" / "storage"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
    }
    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield root
    patch.undo()


def squad_file(path: Path) -> Path:
    """Articles whose answer is a word the tiny model can learn to say from the passage alone."""
    articles = [
        {
            "title": f"Article {i}",
            "paragraphs": [
                {
                    "context": " ".join(["zq"] * 40),
                    "qas": [
                        {
                            "id": f"{i}-{q}",
                            "question": f"What is thing {q}?",
                            "answers": [{"text": "zq", "answer_start": 0}],
                        }
                        for q in range(2)
                    ],
                }
            ],
        }
        for i in range(12)
    ]
    path.write_text(json.dumps({"version": "1.1", "data": articles}))
    return path


def continual_overrides(path: Path, *extra: str) -> list[str]:
    """The tiny continual flow on ``squad_file``'s articles, learnable in a few steps."""
    return [
        f"data.path={path}",
        "data.source=squad",
        "inner_loop.epochs=8",
        "inner_loop.learning_rate=3e-2",
        "data.validation_fraction=0.95",
        "continual.probe_prompts=2",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """`seal serve` on free ports in a fresh SEAL_HOME (the tiny model is built there on first use)."""
    import psutil

    ports = {"prefect": free_port(), "mlflow": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"SEAL_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            "--prefect-port",
            str(ports["prefect"]),
            "--mlflow-port",
            str(ports["mlflow"]),
        ],
        env=env,
        cwd=Path(__file__).parents[1],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while "Prefect UI:" not in (tmp_path / "serve.log").read_text():
        assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "seal serve did not come up in 120 s"
        time.sleep(0.5)
    served_children = psutil.Process(process.pid).children(recursive=True)
    yield {
        "process": process,
        "ports": ports,
        "home": tmp_path / "home",
        "log": tmp_path / "serve.log",
        "children": served_children,
    }
    if process.poll() is None:  # stop it as a user would, so it stops its servers
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    for child in served_children:  # never leave a server behind, whatever the test did
        if child.is_running():
            child.kill()


def pytest_collection_modifyitems(items):
    """Everything under tests/integration/ starts servers, clusters or whole-flow subprocesses."""
    integration = Path(__file__).parent / "integration"
    for item in items:
        if integration in item.path.parents:
            item.add_marker(pytest.mark.integration)
