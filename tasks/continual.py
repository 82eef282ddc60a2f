"""The Prefect task of continual self-adaptation: one step of a sequence (``models.continual.run_step``,
or ``run_routed_step`` with routed adapters).

Sampling the step's self-edit and scoring the unedited model reuse the knowledge tasks
(``tasks/knowledge.py``); this one trains the LoRA, merges it, scores the merged model and
measures its drift. Its key
is the incoming checkpoint's digest, the passages, the self-edit and the settings, never the run:
a rerun finds every finished step cached, a killed run resumes at the step it was in.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from models import continual, self_edit
from models.base_model import load_model, weights_digest
from models.config import EvalConfig, InnerLoopConfig, LoraConfig, ModelConfig
from models.paths import seal_home
from tasks.faults import maybe_fail
from tasks.records import (
    Context,
    ContinualStepRecord,
    EvalRecord,
    PolicyRef,
    SelfEditRecord,
    StaleArtifact,
)
from tasks.runtime import clear_models, release_freed_memory, use_model
from tasks.settings import CACHED


def checkpoint_root() -> Path:
    """Where merged checkpoints go: ``$SEAL_HOME/continual`` (the flow deletes them when done)."""
    return seal_home() / "continual"


def check_checkpoint(policy: PolicyRef) -> None:
    """Raise :class:`StaleArtifact` if ``policy``'s folder is gone or its weights changed."""
    if policy.digest.startswith("hf-"):  # a hub snapshot: its folder name is its digest
        return
    found = weights_digest(Path(policy.path))
    if found != policy.digest:
        raise StaleArtifact(
            f"checkpoint {policy.path} is missing or altered (weights digest {found}, recorded {policy.digest})"
        )


@task(cache_policy=CACHED, persist_result=True, tags=["gpu"], task_run_name="continual-step-{label}")
def continual_step(
    policy_ref: PolicyRef,
    start: PolicyRef,
    model: ModelConfig,
    contexts: list[Context],
    edit: SelfEditRecord | None,
    history: list[list[str]],
    replay: int,
    replay_seed: int,
    routed: list[PolicyRef] | None,
    lora: LoraConfig,
    config: InnerLoopConfig,
    eval_config: EvalConfig,
    probe_prompts: int,
    label: str,
) -> ContinualStepRecord:
    """Merge a LoRA trained on ``edit`` plus the last of ``contexts`` (``edit`` None: the passage
    alone) into ``policy_ref``, and with ``replay`` documents drawn from ``history`` (the earlier
    steps' documents); save the merged model; answer the questions of every context; measure
    its drift from ``start`` on ``probe_prompts`` probe texts.

    ``routed`` (``continual.adapters=routed``; None: merged): the earlier steps' adapters. The
    LoRA is then trained on ``policy_ref`` (the starting model) and saved, not merged, and the
    questions are answered by these adapters and the new one, routed question by question.

    Raises:
        StaleArtifact: if ``policy_ref``'s checkpoint (or an adapter of ``routed``) is gone or
            altered (the flow rebuilds it).
    """
    maybe_fail("continual_step", label)
    for checkpoint in [policy_ref, *(routed or [])]:
        check_checkpoint(checkpoint)
    # A private copy: a merge changes its weights, routed adapters are attached and removed
    # again. The cached models are freed first.
    clear_models()
    private = load_model(policy_ref.path, device=model.device, dtype=model.dtype)
    step = dict(
        self_edit=self_edit.SelfEdit(edit.text, tuple(edit.documents)) if edit else None,
        contexts=[(c.title, c.context, c.questions, c.answers) for c in contexts],
        history=history,
        replay=replay,
        replay_seed=replay_seed,
        lora=lora,
        config=config,
        eval_config=eval_config,
        probe_texts=continual.PROBE_TEXTS[:probe_prompts],
        root=checkpoint_root() / policy_ref.digest / label,
    )
    if routed is None:
        with use_model(start, model) as reference:
            result = continual.run_step(
                private.model, private.tokenizer, reference.model, source=f"{policy_ref.name}+{label}", **step
            )
    else:
        result = continual.run_routed_step(
            private.model, private.tokenizer, adapters=[Path(a.path) for a in routed], **step
        )
    del private
    release_freed_memory()
    return _record(result, label)


def _record(result: continual.StepResult, label: str) -> ContinualStepRecord:
    merged = result.merge
    get_run_logger().info(
        "%s: %d documents replayed, %d steps, loss %.3f, accuracy %s, KL %.4f%s",
        label,
        len(result.replayed),
        merged.train.steps,
        merged.train.mean_loss,
        [round(s.accuracy, 2) for s in result.scores],
        result.kl,
        "" if result.routed is None else f", {result.routed:.0%} of questions routed to their own adapter",
    )
    return ContinualStepRecord(
        checkpoint=PolicyRef(name=label, path=str(merged.path), digest=merged.digest),
        documents=result.own_documents,
        replayed=len(result.replayed),
        scores=[EvalRecord.of(s) for s in result.scores],
        kl=result.kl,
        routed=result.routed,
        steps=merged.train.steps,
        mean_loss=merged.train.mean_loss,
        seconds=merged.train.seconds,
    )
