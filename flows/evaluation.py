"""Held-out evaluation of a policy as a Prefect flow (the table of the config's domain).

seal eval deployments/configs/knowledge-smollm2.yaml models:/seal-policy@best
seal eval deployments/configs/fewshot-smollm2.yaml base
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.tracking import MlflowTracker, default_tracking_uri, resolve_policy_uri
from flows.domains import domain_for
from flows.held_out import HeldOutResult, held_out_metrics
from flows.runner import ray_cluster, with_storage
from flows.training import verified_policy
from models.base_model import resolve_model
from models.config import SealConfig
from models.errors import ModelNotFoundError
from models.paths import seal_home
from tasks.policy import resolve_base_policy
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
    return PolicyRef(
        name=folder.name if not policy.startswith("models:/") else policy,
        path=str(resolved.path),
        digest=resolved.digest,
    )


@flow(name="seal-evaluation")
def seal_evaluation(config: SealConfig, policy: str = "base") -> HeldOutResult:
    """Score ``policy`` on held-out contexts. Knowledge: no adaptation, passage only, passage +
    self-edits from the base model, passage + self-edits from the policy. Few-shot (Table 1):
    in-context learning, TTT with the base model's self-edits, SEAL (the policy's), oracle TTT.

    The table (each column with its interval, and the paired difference) is logged to an MLflow
    run of its own, tagged with the policy it scored."""
    base = verified_policy(with_storage(resolve_base_policy, config.runner), config.model)
    resolved = resolve_policy(policy, base)
    with ray_cluster(config.runner):
        result = domain_for(config).evaluate_policy(config, resolved, base)
    tracker = MlflowTracker(
        default_tracking_uri(seal_home()),
        config.tracking.experiment,
        config.tracking.registered_model,
        run_name=f"eval-{resolved.name}",
        tags={
            "prefect.flow_run_id": str(flow_run.id),
            "seal.evaluated_policy": policy,
            "seal.policy_digest": resolved.digest,
            "seal.config_digest": config.digest(),
        },
    )
    tracker.log_params(config.flat())
    tracker.log_metrics(held_out_metrics(result), step=0)
    tracker.log_table(result.per_context, "held_out/evaluation.json")
    tracker.finish("FINISHED")
    return result
