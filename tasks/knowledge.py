"""Prefect tasks of the knowledge-incorporation loop, one per ``models/`` function.

Inputs are config sections, records and seeds; results are cached as every task's are
(``tasks/settings.py``). The base policy and the policy update are the same in every domain:
``tasks/policy.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from prefect import task

from models import generated_questions, inner_loop, rest_em, self_edit
from models.base_model import weights_digest
from models.config import DataConfig, EvalConfig, InnerLoopConfig, LoraConfig, ModelConfig, RewardConfig, SelfEditConfig
from models.knowledge_data import load_contexts, select_contexts
from models.paths import seal_home
from tasks.records import (
    AdapterRecord,
    Context,
    EvalRecord,
    GeneratedQuestionsRecord,
    InnerLoopOutOfMemory,
    PolicyRef,
    SelectionRecord,
    SelfEditRecord,
    StaleArtifact,
    adapter_dir,
    stable_seed,
)
from tasks.faults import maybe_fail
from tasks.runtime import adapter_lanes, use_model
from tasks.settings import CACHED, TRANSIENT_BACKOFF


@task(
    cache_policy=CACHED,
    persist_result=True,
    retries=3,
    retry_delay_seconds=TRANSIENT_BACKOFF,
    task_run_name="fetch-contexts-{split}",
)
def fetch_contexts(data: DataConfig, split: str, count: int, seed: int) -> list[Context]:
    """``count`` contexts of ``split``, chosen by ``seed``."""
    rows = select_contexts(load_contexts(data, split), count, seed)
    return [Context(**row) for row in rows]


@task(cache_policy=CACHED, persist_result=True, task_run_name="write-questions-{label}")
def write_questions(
    writer: PolicyRef, model: ModelConfig, contexts: list[Context], num_questions: int, max_new_tokens: int, label: str
) -> list[GeneratedQuestionsRecord]:
    """Each context with question-answer pairs ``writer`` wrote from its passage as its questions
    (its own questions, if any, replaced), all passages in one greedy batched call; only the
    checkable pairs are kept. Its id stays: an adapter does not depend on the questions."""
    with use_model(writer, model) as loaded:
        written = generated_questions.write_questions_batch(
            loaded.model,
            loaded.tokenizer,
            [(c.title, c.context) for c in contexts],
            num_questions=num_questions,
            max_new_tokens=max_new_tokens,
        )
    return [
        GeneratedQuestionsRecord(
            context=context.model_copy(
                update={"questions": [p.question for p in w.pairs], "answers": [[p.answer] for p in w.pairs]}
            ),
            writer=writer.name,
            text=w.text,
            parsed=w.parsed,
            dropped=w.dropped,
        )
        for context, w in zip(contexts, written)
    ]


@task(cache_policy=CACHED, persist_result=True, task_run_name="sample-self-edits-{label}")
def sample_self_edits(
    policy_ref: PolicyRef,
    model: ModelConfig,
    contexts: list[Context],
    config: SelfEditConfig,
    seeds: list[int],
    num_samples: int,
    label: str,
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
            loaded.model,
            loaded.tokenizer,
            [(c.title, c.context) for c in contexts],
            seeds,
            kind=config.prompt,
            num_samples=num_samples,
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            max_documents=config.max_documents,
        )
    records = []
    for context, samples in zip(contexts, edits):
        prompt = self_edit.self_edit_prompt(config.prompt, context.title, context.context)
        records.append(
            [
                SelfEditRecord(index=i, text=e.text, documents=list(e.documents), prompt=prompt, tokens=e.tokens)
                for i, e in enumerate(samples)
            ]
        )
    return records


@task(cache_policy=CACHED, persist_result=True, tags=["gpu"], task_run_name="train-adapters-{label}")
def train_adapters(
    policy_ref: PolicyRef,
    model: ModelConfig,
    items: list[tuple[Context, SelfEditRecord | None]],
    label: str,
    labels: list[str],
    lora: LoraConfig,
    config: InnerLoopConfig,
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
            self_edit.SelfEdit(edit.text, tuple(edit.documents)) if edit else None,
            context.title,
            context.context,
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
            results = stacks.train(
                [docs for _, docs, _ in trainable],
                plan,
                [config.seed] * len(trainable),
                folders=[folder for _, _, folder in trainable],
            )
            seconds = time.perf_counter() - start
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise InnerLoopOutOfMemory(f"{label}: {str(exc)[:200]}") from None
    for (i, _, folder), result in zip(trainable, results):
        if isinstance(result, inner_loop.NonFiniteLossError):
            records[i] = AdapterRecord(path=None, failure=f"non-finite loss: {result}")
            continue
        records[i] = AdapterRecord(
            path=str(folder),
            steps=result.steps,
            tokens=result.tokens,
            mean_loss=result.mean_loss,
            seconds=seconds / len(trainable),
            digest=weights_digest(folder),
        )
    return records


@task(cache_policy=CACHED, persist_result=True, task_run_name="evaluate-adapters-{label}")
def evaluate_adapters(
    policy_ref: PolicyRef,
    model: ModelConfig,
    contexts: list[Context],
    adapters: list[AdapterRecord],
    label: str,
    labels: list[str],
    config: EvalConfig,
    lanes: int = 1,
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
            raise StaleArtifact(
                f"adapter {adapter.path} is missing or altered (weights digest {found}, recorded {adapter.digest})"
            )
        usable.append((i, context, Path(adapter.path)))
    if not usable:
        return records
    with use_model(policy_ref, model) as loaded:
        stacks = adapter_lanes(loaded, inner_loop.saved_lora(usable[0][2]), 1, lanes)
        results = stacks.evaluate_saved(
            [folder for _, _, folder in usable],
            [c.questions for _, c, _ in usable],
            [c.answers for _, c, _ in usable],
            config,
        )
    for (i, _, _), result in zip(usable, results):
        records[i] = EvalRecord.of(result)
    return records


@task(cache_policy=CACHED, persist_result=True, task_run_name="evaluate-baselines-{label}")
def evaluate_baselines(
    policy_ref: PolicyRef,
    model: ModelConfig,
    contexts: list[Context],
    config: EvalConfig,
    label: str,
) -> list[EvalRecord]:
    """Closed-book answers to each context's questions by the unadapted policy, all contexts'
    questions in shared batched generations."""
    maybe_fail("evaluate_adapter", "baseline")
    with use_model(policy_ref, model) as loaded:
        results = inner_loop.evaluate_contexts(
            loaded.model, loaded.tokenizer, [c.questions for c in contexts], [c.answers for c in contexts], config
        )
    return [EvalRecord.of(result) for result in results]


EMPTY_SELF_EDIT = "empty self-edit: no usable line in the generation"


@task(cache_policy=CACHED, persist_result=True, task_run_name="select-self-edits-{context_id}")
def select_self_edits(
    context_id: str, baseline: EvalRecord, scores: list[EvalRecord], edits: list[SelfEditRecord], reward: RewardConfig
) -> SelectionRecord:
    """Rewards (``reward.kind``) against ``baseline`` (``reward.baseline``'s score) and the best
    self-edit that beat it, if any. An empty self-edit earns 0 and is never kept: the policy
    would learn to write nothing."""
    candidates = [
        rest_em.Candidate(i, s.accuracy, s.mean_f1, s.failure or (None if e.documents else EMPTY_SELF_EDIT))
        for i, (s, e) in enumerate(zip(scores, edits, strict=True))
    ]
    selection = rest_em.select_self_edits(baseline.accuracy, candidates, reward.kind)
    return SelectionRecord(
        context_id=context_id,
        baseline_accuracy=baseline.accuracy,
        accuracies=[s.accuracy for s in scores],
        rewards=list(selection.rewards),
        failures=[c.failure for c in candidates],
        kept=selection.kept,
        outcome=selection.outcome,
        tie=selection.tie,
    )
