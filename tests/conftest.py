"""Shared fixtures: a temporary SEAL home and the tiny random model, offline."""

from __future__ import annotations

import os

import pytest

os.environ.update(
    {
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
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

    return load_model("tiny-random", home=tmp_path_factory.mktemp("tiny-home"), device="cpu")
