"""Prefect tasks of the policy, the same in every domain: the base model as the first policy, and
the M-step that updates it (``models/policy.py``).

Cached as every task is (``tasks/settings.py``); the keys are the ones these tasks had in
``tasks/knowledge.py``, so their cached results still serve.
"""

from __future__ import annotations

import time

from prefect import get_run_logger, task

from models import policy
from models.base_model import load_model, resolve_model
from models.config import ModelConfig, PolicyUpdateConfig
from models.paths import seal_home
from tasks.faults import maybe_fail
from tasks.records import PolicyRef, stable_seed
from tasks.runtime import clear_models, release_freed_memory
from tasks.settings import CACHED, TRANSIENT_BACKOFF


@task(cache_policy=CACHED, persist_result=True, retries=3, retry_delay_seconds=TRANSIENT_BACKOFF)
def resolve_base_policy(model: ModelConfig) -> PolicyRef:
    """The base model as a policy checkpoint (converted or built on first use)."""
    resolved = resolve_model(model.name)
    return PolicyRef(name="base", path=str(resolved.path), digest=resolved.digest)


@task(cache_policy=CACHED, persist_result=True, tags=["gpu"], task_run_name="update-policy-{name}")
def update_policy(
    policy_ref: PolicyRef,
    model: ModelConfig,
    pairs: list[tuple[str, str]],
    name: str,
    config: PolicyUpdateConfig,
    target_modules: list[str],
) -> PolicyRef:
    """The M-step: SFT of the policy on kept (prompt, self-edit) pairs, merged, saved."""
    maybe_fail("update_policy", name)
    start = time.perf_counter()
    # The models cached for the E-step are not needed during the update (and reload in ~0.1 s):
    # free them first. Then a private copy, since the update merges LoRA into its weights.
    clear_models()
    loaded = load_model(policy_ref.path, device=model.device, dtype=model.dtype)
    key = stable_seed(policy_ref.digest, pairs, config, target_modules)
    folder = seal_home() / "policies" / f"{name}-{key:08x}"
    result = policy.update_policy(
        loaded.model,
        loaded.tokenizer,
        pairs,
        config,
        target_modules,
        folder,
        source=f"{policy_ref.name}+{name}",
    )
    del loaded
    release_freed_memory()
    get_run_logger().info(
        "policy %s: %d pairs, %d steps, loss %.3f, %.1fs",
        name,
        result.pairs,
        result.steps,
        result.mean_loss,
        time.perf_counter() - start,
    )
    return PolicyRef(name=name, path=str(result.path), digest=result.digest)
