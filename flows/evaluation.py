"""Held-out evaluation of a policy as a Prefect flow (the table of the config's domain).

    seal eval deployments/configs/knowledge-smollm2.yaml models:/seal-policy@best
    seal eval deployments/configs/fewshot-smollm2.yaml base
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.tracking import default_tracking_uri, resolve_policy_uri
from flows.domains import domain_for
from flows.runner import ray_cluster, with_storage
from flows.training import HeldOutResult, verified_policy
from models.base_model import ModelNotFoundError, resolve_model, seal_home
from models.config import SealConfig
from tasks.knowledge import resolve_base_policy
from tasks.records import PolicyRef


def resolve_policy(policy: str, base: PolicyRef) -> PolicyRef:
    """``base``, a policy folder, or an MLflow model URI (``models:/seal-policy@best``)."""
    if policy == "base":
        return base
    if policy.startswith("models:/"):
        tracking_uri = default_tracking_uri(seal_home())
        try:
            folder = resolve_policy_uri(tracking_uri, policy)
        except (LookupError, ValueError) as exc:
            raise ModelNotFoundError(f"policy {policy} not found in MLflow at {tracking_uri}: {exc}") from exc
    else:
        folder = Path(policy)
    resolved = resolve_model(str(folder))
    return PolicyRef(name=folder.name if not policy.startswith("models:/") else policy,
                     path=str(resolved.path), digest=resolved.digest)


@flow(name="seal-evaluation")
def seal_evaluation(config: SealConfig, policy: str = "base") -> HeldOutResult:
    """Score ``policy`` on held-out contexts. Knowledge: no adaptation, passage only, passage +
    self-edits from the base model, passage + self-edits from the policy. Few-shot (Table 1):
    in-context learning, TTT with the base model's self-edits, SEAL (the policy's), oracle TTT."""
    base = verified_policy(with_storage(resolve_base_policy, config.runner), config.model)
    with ray_cluster(config.runner):
        return domain_for(config).evaluate_policy(config, resolve_policy(policy, base), base)
