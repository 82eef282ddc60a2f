"""Deployment parameters from the YAML configs, so a deployment runs what ``seal run`` runs.

A build step of ``deployments/prefect.yaml``, run by ``prefect deploy`` from the repository root:

    build:
      - flows.deployment_config.config_parameter:
          id: seal
          file: deployments/configs/knowledge-qwen2.5-7b.yaml
          overrides: [runner.kind=ray]
    parameters:
      config: "{{ seal.config }}"

is the deployment of ``seal run deployments/configs/knowledge-qwen2.5-7b.yaml runner.kind=ray``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.config import load_config


def config_parameter(file: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The ``config`` parameter of a deployment: ``file`` (relative to the working directory, the
    repository root for ``prefect deploy``) with ``overrides`` applied, validated, as JSON.

    Returns:
        ``{"config": {...}}``, for ``"{{ seal.config }}"`` in the deployment's parameters.

    Raises:
        ConfigError: the file is missing or the config is invalid (every problem listed).
    """
    return {"config": load_config(Path(file), list(overrides or [])).model_dump(mode="json")}
