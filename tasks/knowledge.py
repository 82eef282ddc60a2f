"""Prefect tasks of the knowledge-incorporation loop, one per ``models/`` function.

Inputs are config sections, records and seeds; results are persisted and keyed by their
inputs and the task's source (not the run id), so a new run of the same config reuses every
finished task and a changed setting recomputes only what depends on it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.tasks import exponential_backoff

from models import inner_loop, policy, rest_em, self_edit
from models.base_model import load_model, resolve_model, weights_digest
from models.config import (
    DataConfig, EvalConfig, InnerLoopConfig, LoraConfig, ModelConfig, PolicyUpdateConfig, RewardConfig, SelfEditConfig,
)
from models.knowledge_data import load_contexts, select_contexts
from models.paths import seal_home
from tasks.records import (
    AdapterRecord,
    Context,
    EvalRecord,
    InnerLoopOutOfMemory,
    PolicyRef,
    SelectionRecord,
    SelfEditRecord,
    StaleArtifact,
    adapter_dir,
    stable_seed,
)
from tasks.faults import maybe_fail
from tasks.locking import FlockLockManager
from tasks.runtime import adapter_lanes, clear_models, release_freed_memory, use_model

# Keys from content and code, not the run id; "label(s)" only name task runs in the UI.
# Serializable: when two runs on one SEAL_HOME reach the same key, the second waits for the
# first's result instead of computing and writing the same files at the same time.
CACHED = (TASK_SOURCE + (INPUTS - "label" - "labels")).configure(
    isolation_level="SERIALIZABLE", lock_manager=FlockLockManager()
)
# Tasks that only read (files, the model hub) retry with backoff: 2, 4, 8 s. Training and
# evaluation do not retry: their failures are recorded, or mean a bug or a lack of memory.
TRANSIENT_BACKOFF = exponential_backoff(backoff_factor=2)


@task(cache_policy=CACHED, persist_result=True, retries=3, retry_delay_seconds=TRANSIENT_BACKOFF)
def resolve_base_policy(model: ModelConfig) -> PolicyRef:
    """The base model as a policy checkpoint (converted or built on first use)."""
    resolved = resolve_model(model.name)
    return PolicyRef(name="base", path=str(resolved.path), digest=resolved.digest)


@task(cache_policy=CACHED, persist_result=True, retries=3, retry_delay_seconds=TRANSIENT_BACKOFF,
      task_run_name="fetch-contexts-{split}")
def fetch_contexts(data: DataConfig, split: str, count: int, seed: int) -> list[Context]:
    """``count`` contexts of ``split``, chosen by ``seed``."""
    rows = select_contexts(load_contexts(data, split), count, seed)
    return [Context(**row) for row in rows]


@task(cache_policy=CACHED, persist_result=True, task_run_name="sample-self-edits-{label}")
def sample_self_edits(
    policy_ref: PolicyRef, model: ModelConfig, contexts: list[Context], config: SelfEditConfig,
    seeds: list[int], num_samples: int, label: str,
) -> list[list[SelfEditRecord]]:
    """K self-edits for each context, sampled from the policy in one batched call.

    Context i's samples depend on ``seeds[i]`` alone (a generator per row), so they are what
    sampling it on its own would give. Decoding streams the weights once per step whatever the
    batch, so one call for all of an iteration's contexts costs about what two per-context calls
    would (benchmarks/README.md, "Evaluation").
    """
    for context in contexts:
        maybe_fail("sample_self_edits", context.id)
    with use_model(policy_ref, model) as loaded:
        edits = self_edit.sample_self_edits_batch(
            loaded.model, loaded.tokenizer, [(c.title, c.context) for c in contexts], seeds,
            kind=config.prompt, num_samples=num_samples, temperature=config.temperature, top_p=config.top_p,
            max_new_tokens=config.max_new_tokens, max_documents=config.max_documents,
        )
    records = []
    for context, samples in zip(contexts, edits):
        prompt = self_edit.self_edit_prompt(config.prompt, context.title, context.context)
        records.append([SelfEditRecord(index=i, text=e.text, documents=list(e.documents), prompt=prompt,
                                       tokens=e.tokens) for i, e in enumerate(samples)])
    return records


@task(cache_policy=CACHED, persist_result=True, tags=["gpu"], task_run_name="train-adapters-{label}")
def train_adapters(
    policy_ref: PolicyRef, model: ModelConfig, items: list[tuple[Context, SelfEditRecord | None]],
    label: str, labels: list[str], lora: LoraConfig, config: InnerLoopConfig,
) -> list[AdapterRecord]:
    """A fresh LoRA adapter per item, trained on its self-edit plus its context's passage (the
    passage alone when the self-edit is None), all of them together in shared batches through
    stacked adapters (``models/stacked_lora/``: the same adapters as trained one by one, with
    K times more rows per matrix multiply), split over ``config.lanes`` lanes
    (``models/stacked_lora/lanes.py``), ``config.slots`` of them at a time. Each is saved under
    ``$SEAL_HOME/adapters`` as soon as it finishes, and its slot takes the next.

    ``config.seed`` seeds the fresh weights and the document order (``inner_loop.seeds``
    submits a group per seed). ``label`` names the group's task run, ``labels`` its items
    (neither is in the cache key). A self-edit with no usable line trains on the passage alone,
    as the paper's documents (its lines, then the passage) are then; selection never keeps it.
    A non-finite loss is recorded, with reward 0 to follow. Running out of memory is raised
    instead (InnerLoopOutOfMemory): the task run fails, is not cached, and a rerun tries again."""
    for item_label in labels:
        maybe_fail("train_adapter", item_label)
    records: list[AdapterRecord | None] = [None] * len(items)
    trainable = []  # (index, documents, folder)
    for i, (context, edit) in enumerate(items):
        documents, plan = self_edit.inner_loop_plan(
            self_edit.SelfEdit(edit.text, tuple(edit.documents)) if edit else None, context.title, context.context,
            config,
        )
        key = f"{stable_seed(edit.text if edit else '', lora, config):08x}"
        trainable.append((i, documents, adapter_dir(seal_home(), policy_ref, context.id, key)))
    if not trainable:
        return records
    with use_model(policy_ref, model) as loaded:
        stacks = adapter_lanes(loaded, lora, min(len(trainable), config.group_slots), config.lanes)
        try:
            start = time.perf_counter()
            results = stacks.train([docs for _, docs, _ in trainable], plan, [config.seed] * len(trainable),
                                   folders=[folder for _, _, folder in trainable])
            seconds = time.perf_counter() - start
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise InnerLoopOutOfMemory(f"{label}: {str(exc)[:200]}") from None
    for (i, _, folder), result in zip(trainable, results):
        if isinstance(result, inner_loop.NonFiniteLossError):
            records[i] = AdapterRecord(path=None, failure=f"non-finite loss: {result}")
            continue
        records[i] = AdapterRecord(path=str(folder), steps=result.steps, tokens=result.tokens,
                                   mean_loss=result.mean_loss, seconds=seconds / len(trainable),
                                   digest=weights_digest(folder))
    return records


@task(cache_policy=CACHED, persist_result=True, task_run_name="evaluate-adapters-{label}")
def evaluate_adapters(
    policy_ref: PolicyRef, model: ModelConfig, contexts: list[Context], adapters: list[AdapterRecord],
    label: str, labels: list[str], config: EvalConfig, lanes: int = 1,
) -> list[EvalRecord]:
    """Closed-book answers to each context's questions with its adapter (``adapters[i]`` for
    ``contexts[i]``), all adapters' questions in the same batched generations (rows routed to
    their adapter): as many adapters at a time as one generation of ``config.batch_size`` rows
    takes, loaded straight into the first of the model's ``lanes`` lanes (``inner_loop.lanes``,
    the stacks training uses, so the model's LoRA layers are not rebuilt).

    Raises:
        StaleArtifact: if an adapter's folder is gone or its weights no longer match the record.
    """
    for item_label in labels:
        maybe_fail("evaluate_adapter", item_label)
    records: list[EvalRecord | None] = [None] * len(contexts)
    usable = []  # (index, context, adapter folder)
    for i, (context, adapter) in enumerate(zip(contexts, adapters, strict=True)):
        if adapter.failure is not None:
            records[i] = EvalRecord.failed(len(context.questions), adapter.failure)
            continue
        found = weights_digest(Path(adapter.path))  # a cached record may outlive its folder
        if found is None or (adapter.digest and found != adapter.digest):
            raise StaleArtifact(f"adapter {adapter.path} is missing or altered "
                                f"(weights digest {found}, recorded {adapter.digest})")
        usable.append((i, context, Path(adapter.path)))
    if not usable:
        return records
    with use_model(policy_ref, model) as loaded:
        stacks = adapter_lanes(loaded, inner_loop.saved_lora(usable[0][2]), 1, lanes)
        results = stacks.evaluate_saved([folder for _, _, folder in usable], [c.questions for _, c, _ in usable],
                                        [c.answers for _, c, _ in usable], config)
    for (i, _, _), result in zip(usable, results):
        records[i] = EvalRecord.of(result)
    return records


@task(cache_policy=CACHED, persist_result=True, task_run_name="evaluate-baselines-{label}")
def evaluate_baselines(
    policy_ref: PolicyRef, model: ModelConfig, contexts: list[Context], config: EvalConfig, label: str,
) -> list[EvalRecord]:
    """Closed-book answers to each context's questions by the unadapted policy, all contexts'
    questions in shared batched generations."""
    maybe_fail("evaluate_adapter", "baseline")
    with use_model(policy_ref, model) as loaded:
        results = inner_loop.evaluate_contexts(
            loaded.model, loaded.tokenizer, [c.questions for c in contexts], [c.answers for c in contexts], config)
    return [EvalRecord.of(result) for result in results]


EMPTY_SELF_EDIT = "empty self-edit: no usable line in the generation"


@task(cache_policy=CACHED, persist_result=True, task_run_name="select-self-edits-{context_id}")
def select_self_edits(context_id: str, baseline: EvalRecord, scores: list[EvalRecord], edits: list[SelfEditRecord],
                      reward: RewardConfig) -> SelectionRecord:
    """Rewards (``reward.kind``) against ``baseline`` (``reward.baseline``'s score) and the best
    self-edit that beat it, if any. An empty self-edit earns 0 and is never kept: the policy
    would learn to write nothing."""
    candidates = [rest_em.Candidate(i, s.accuracy, s.mean_f1, s.failure or (None if e.documents else EMPTY_SELF_EDIT))
                  for i, (s, e) in enumerate(zip(scores, edits, strict=True))]
    selection = rest_em.select_self_edits(baseline.accuracy, candidates, reward.kind)
    return SelectionRecord(
        context_id=context_id, baseline_accuracy=baseline.accuracy,
        accuracies=[s.accuracy for s in scores], rewards=list(selection.rewards),
        failures=[c.failure for c in candidates], kept=selection.kept, outcome=selection.outcome,
        tie=selection.tie,
    )


@task(cache_policy=CACHED, persist_result=True, tags=["gpu"], task_run_name="update-policy-{name}")
def update_policy(
    policy_ref: PolicyRef, model: ModelConfig, pairs: list[tuple[str, str]], name: str,
    config: PolicyUpdateConfig, target_modules: list[str],
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
        loaded.model, loaded.tokenizer, pairs, config, target_modules, folder,
        source=f"{policy_ref.name}+{name}",
    )
    del loaded
    release_freed_memory()
    get_run_logger().info(
        "policy %s: %d pairs, %d steps, loss %.3f, %.1fs",
        name, result.pairs, result.steps, result.mean_loss, time.perf_counter() - start,
    )
    return PolicyRef(name=name, path=str(result.path), digest=result.digest)
