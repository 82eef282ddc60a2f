"""Nightly continued adaptation: SEAL's outer loop continued from the latest registered policy, on
training contexts that policy has not seen, registered only if held-out accuracy did not drop.

    seal serve    # then switch on the deployment nightly-continued-adaptation in the Prefect UI

The night:

    start  = models:/seal-policy@latest (the base model while nothing is registered)
    before = held-out table of start
    for t in 1..T: policy = ReST-EM iteration on training contexts start has not seen
    after  = held-out table of policy, on the same held-out contexts
    register policy as the new "latest" if after - before >= 0 on the policy column

Which contexts a policy has seen travels with it: a policy this flow registers carries
``seal-seen-contexts.json`` (its start's list plus the night's contexts) in its folder, and so in
its registered artifact. A policy registered by ``seal run`` has none, and nothing is excluded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.domains import domain_for
from flows.evaluation import resolve_policy
from flows.held_out import HeldOutResult, held_out_metrics
from flows.runner import on_runner, ray_cluster, with_storage
from flows.tracking import Tracker, default_tracking_uri, finishing, flow_run_tracker
from flows.training import IterationResult, log_iteration_tables, run_iteration, verified_policy

from models.config import SealConfig
from models.errors import ModelNotFoundError
from models.paths import seal_home
from models.stats import Estimate, paired_difference
from tasks.policy import resolve_base_policy
from tasks.records import PolicyRef

SEEN_CONTEXTS = "seal-seen-contexts.json"


@dataclass
class NightlyResult:
    start: PolicyRef
    policy: PolicyRef
    before: HeldOutResult
    after: HeldOutResult
    difference: Estimate  # after - before on the policy column, paired over held-out contexts
    registered: str | None  # the new registry version, or None
    contexts: list[str]  # the training contexts of the night
    iterations: list[IterationResult]
    run_id: str | None


def seen_contexts(policy: PolicyRef) -> list[str]:
    """The training contexts ``policy`` has seen, as recorded in its folder (none if unrecorded)."""
    path = Path(policy.path) / SEEN_CONTEXTS
    return json.loads(path.read_text()) if path.exists() else []


def held_out_change(before: HeldOutResult, after: HeldOutResult, column: str) -> Estimate:
    """``after`` minus ``before`` on ``column``, paired over the same held-out contexts, with its
    95 % interval (a bootstrap over contexts, ``models/stats.py``)."""
    return paired_difference(after.counts[column], before.counts[column])


@flow(name="seal-nightly")
def seal_nightly(config: SealConfig, policy: str = "models:/seal-policy@latest") -> NightlyResult:
    """Continue training ``policy`` on unseen contexts; register the result unless held-out
    accuracy dropped. See the module docstring."""
    tracking_uri = default_tracking_uri(seal_home())
    digest = f"nightly-{config.digest()}-{policy}"
    tracker = flow_run_tracker(
        tracking_uri,
        config.tracking,
        config.model.name,
        digest,
        str(flow_run.id),
        flow_run.name or "seal-nightly",
        **{"seal.flow": "nightly"},
    )
    with finishing(tracker), ray_cluster(config.runner):
        result = _night(config, policy, tracker)
    return result


def _night(config: SealConfig, policy_uri: str, tracker: Tracker) -> NightlyResult:
    logger = get_run_logger()
    tracker.log_params(config.flat())
    domain = domain_for(config)
    base = verified_policy(with_storage(resolve_base_policy, config.runner), config.model)
    try:
        start = resolve_policy(policy_uri, base)
    except ModelNotFoundError as exc:
        if not policy_uri.startswith("models:/"):
            raise
        logger.warning("%s; starting from the base model", exc)
        start = base
    tracker.set_tags({"seal.nightly.start": start.name, "seal.nightly.start_digest": start.digest})
    seen = seen_contexts(start)
    before = domain.evaluate_policy(config, start, base)
    tracker.log_metrics(held_out_metrics(before), step=0)
    policy, tonight, iterations = start, [], []
    for t in range(1, config.rl.iterations + 1):
        result = on_runner(run_iteration, config.runner)(config, policy, t, seen + tonight)
        iterations.append(result)
        tonight += [c for c in dict.fromkeys(row["context_id"] for row in result.rows) if c not in tonight]
        tracker.log_metrics(result.metrics, step=t)
        log_iteration_tables(tracker, result)
        policy = result.policy
    after = before if policy.digest == start.digest else domain.evaluate_policy(config, policy, base)
    tracker.log_metrics(held_out_metrics(after), step=config.rl.iterations)
    difference = held_out_change(before, after, domain.policy_column)
    changed = policy.digest != start.digest
    registered = None
    if changed and difference.value >= 0:
        (Path(policy.path) / SEEN_CONTEXTS).write_text(json.dumps(seen + tonight))
        registered = tracker.register_policy(
            Path(policy.path),
            aliases=["latest"],
            digest=policy.digest,
            description=f"nightly continuation of {start.name} ({start.digest}) on {len(tonight)} unseen contexts; "
            f"held-out {domain.policy_column} {difference}",
        )
    verdict = (
        "registered as version " + registered
        if registered
        else "not registered: "
        + (
            "no self-edit was kept, the policy is unchanged"
            if not changed
            else f"held-out {domain.policy_column} dropped by {-difference.value:.1%}"
        )
    )
    logger.info(
        "night from %s: held-out %s after - before = %s; %s", start.name, domain.policy_column, difference, verdict
    )
    tracker.log_metrics(
        {
            "nightly/difference": difference.value,
            "nightly/difference_low": difference.low,
            "nightly/difference_high": difference.high,
            "nightly/registered": float(bool(registered)),
            "nightly/contexts": float(len(tonight)),
        },
        step=config.rl.iterations,
    )
    tracker.set_tags({"seal.nightly.verdict": verdict})
    return NightlyResult(start, policy, before, after, difference, registered, tonight, iterations, tracker.run_id)
