"""Deployments and `seal run` of the same config are the same run: one source of truth, the files
in deployments/configs/ (the stack test reads the configs back from a real `prefect deploy`)."""

import importlib
from pathlib import Path

import pytest
import yaml

from flows.cli import _parser
from flows.deployment_config import config_parameter
from models.config import SealConfig, load_config
from models.errors import ConfigError

ROOT = Path(__file__).parents[2]
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
STEP = "flows.deployment_config.config_parameter"


def config_source(deployment: dict) -> tuple[str, list[str]]:
    """The config file and overrides a prefect.yaml deployment's build step names."""
    (step,) = deployment["build"]
    return step[STEP]["file"], step[STEP].get("overrides", [])


def seal_run_config(file: str, overrides: list[str]) -> SealConfig:
    """What `seal run FILE OVERRIDES` trains on (its argument parsing, then load_config)."""
    args = _parser().parse_args(["run", file, *overrides])
    return load_config(args.config, args.overrides)


def test_every_prefect_yaml_deployment_is_a_seal_run_of_a_config_file(monkeypatch):
    monkeypatch.chdir(ROOT)  # where `prefect deploy` runs
    for deployment in SPEC["deployments"]:
        file, overrides = config_source(deployment)
        assert Path(file).parent == Path("deployments/configs"), deployment["name"]
        assert deployment["parameters"]["config"] == "{{ seal.config }}", deployment["name"]
        (step,) = deployment["build"]
        assert step[STEP]["id"] == "seal"
        resolved = SealConfig.model_validate(config_parameter(file, overrides)["config"])
        assert resolved == seal_run_config(file, overrides), deployment["name"]
        assert resolved.digest() == seal_run_config(file, overrides).digest()  # continues the same MLflow run

        path, function = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)
        assert flow.name in ("seal-training", "seal-evaluation", "seal-continual", "seal-nightly")
        assert deployment["work_pool"]["name"] == "seal"
    names = {d["name"] for d in SPEC["deployments"]}
    assert {"knowledge-smollm2", "nightly-continued-adaptation", "evaluate-best", "continual-smollm2"} <= names
    (nightly,) = [d for d in SPEC["deployments"] if d["name"] == "nightly-continued-adaptation"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert nightly["entrypoint"] == "flows/nightly.py:seal_nightly"
    assert nightly["parameters"]["policy"] == "models:/seal-policy@latest"  # continues, never restarts


def test_the_drifted_deployments_now_match_their_files(monkeypatch):
    monkeypatch.chdir(ROOT)
    by_name = {d["name"]: d for d in SPEC["deployments"]}
    smollm2 = SealConfig.model_validate(config_parameter(*config_source(by_name["knowledge-smollm2"]))["config"])
    assert smollm2 == load_config(ROOT / "deployments/configs/knowledge-smollm2.yaml")  # `make run`
    assert smollm2 != SealConfig()  # not the built-in defaults
    qwen = SealConfig.model_validate(config_parameter(*config_source(by_name["knowledge-qwen2.5-7b"]))["config"])
    assert qwen.data.source == "squad" and qwen.inner_loop.max_length == 2048
    ray = SealConfig.model_validate(config_parameter(*config_source(by_name["knowledge-qwen2.5-7b-ray"]))["config"])
    assert ray.runner.kind == "ray" and ray.model_copy(update={"runner": qwen.runner}) == qwen
    assert {"knowledge-smollm2", "knowledge-tiny", "nightly-continued-adaptation", "evaluate-best"} <= set(by_name)
    assert by_name["nightly-continued-adaptation"]["schedules"][0]["cron"] == "0 2 * * *"
    # The pull step is resolved on the worker, from its environment (the image sets /app).
    assert SPEC["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $SEAL_REPO }}"}}]


def test_a_bad_config_file_fails_prefect_deploy_with_the_problems():
    with pytest.raises(ConfigError, match="does not exist"):
        config_parameter("deployments/configs/no-such.yaml")
    with pytest.raises(ConfigError, match="lora.rnk"):
        config_parameter(ROOT / "deployments/configs/knowledge-tiny.yaml", ["lora.rnk=3"])


def test_seal_serve_deploys_each_config_file_as_it_is():
    from flows.serve import deployments

    served = {d.name: d for d in deployments()}
    configs = {p.stem: p for p in (ROOT / "deployments" / "configs").glob("*.yaml")}
    assert set(configs) | {"nightly-continued-adaptation", "continual-smollm2"} <= set(served)
    for name, path in configs.items():
        assert SealConfig.model_validate(served[name].parameters["config"]) == seal_run_config(str(path), [])
    # A deployment named in both places runs the same config in both.
    for deployment in SPEC["deployments"]:
        if deployment["name"] in served and deployment["entrypoint"].endswith((":seal_training", ":seal_continual")):
            file, overrides = config_source(deployment)
            assert served[deployment["name"]].parameters["config"] == config_parameter(ROOT / file, overrides)["config"]
