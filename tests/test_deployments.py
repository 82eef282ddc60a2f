"""deployments/prefect.yaml: every deployment points at a real flow with a valid config."""

import importlib
from pathlib import Path

import yaml

from models.config import SealConfig

ROOT = Path(__file__).parents[1]


def test_prefect_yaml_deployments_are_runnable_definitions():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    names = set()
    for deployment in spec["deployments"]:
        names.add(deployment["name"])
        path, function = deployment["entrypoint"].split(":")
        assert (ROOT / path).exists(), path
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)
        assert flow.name in ("seal-training", "seal-evaluation", "seal-continual", "seal-nightly")
        SealConfig.model_validate(deployment["parameters"]["config"])  # what the UI form starts from
        assert deployment["work_pool"]["name"] == "seal"
    assert {"knowledge-smollm2", "nightly-continued-adaptation", "evaluate-best", "continual-smollm2"} <= names
    (nightly,) = [d for d in spec["deployments"] if d["name"] == "nightly-continued-adaptation"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert nightly["entrypoint"] == "flows/nightly.py:seal_nightly"
    assert nightly["parameters"]["policy"] == "models:/seal-policy@latest"  # continues, never restarts


def test_seal_serve_registers_a_deployment_per_knowledge_config():
    from flows.serve import deployments

    served = {d.name for d in deployments()}
    configs = {p.stem for p in (ROOT / "deployments" / "configs").glob("knowledge-*.yaml")}
    assert configs | {"nightly-continued-adaptation", "continual-smollm2"} <= served
