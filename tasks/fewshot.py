"""Prefect tasks of the few-shot (ARC) loop, one per ``models/fewshot`` function.

Cached as every task is (``tasks/settings.py``: inputs and source, never the run id). Training
is keyed by the parsed config, not the generated text, so self-edits that say the same thing in
different words train one adapter. The policy update and the base policy do not depend on the
domain: they are the tasks of ``tasks/policy.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from prefect import task

from models import inner_loop, rest_em
from models.base_model import weights_digest
from models.config import EvalConfig, FewshotConfig, InnerLoopConfig, LoraConfig, ModelConfig, SelfEditConfig
from models.fewshot import self_edit as fewshot_self_edit
from models.fewshot import ttt
from models.fewshot.data import label_free_tasks, load_arc_tasks, pairs, select_tasks
from models.fewshot.grids import as_grid, cell_accuracy, choose_format, encode_grid
from models.fewshot.schema import TTTConfig
from models.paths import seal_home
from tasks.faults import maybe_fail
from tasks.records import (
    AdapterRecord,
    ArcTask,
    ConfigSelfEditRecord,
    EvalRecord,
    InnerLoopOutOfMemory,
    PolicyRef,
    SolvedSelectionRecord,
    StaleArtifact,
    adapter_dir,
    stable_seed,
)
from tasks.runtime import adapter_slot, use_model
from tasks.settings import CACHED, TRANSIENT_BACKOFF


@task(
    cache_policy=CACHED,
    persist_result=True,
    retries=3,
    retry_delay_seconds=TRANSIENT_BACKOFF,
    task_run_name="fetch-arc-tasks-{split}",
)
def fetch_arc_tasks(
    fewshot: FewshotConfig, split: str, count: int, seed: int, label_free: bool = False
) -> list[ArcTask]:
    """``count`` ARC tasks of ``split`` (the configured ids, or all within the grid size), by ``seed``;
    ``label_free``: each with its last demonstration as the test pair, its real test grids gone."""
    ids = fewshot.train_task_ids if split == "train" else fewshot.eval_task_ids
    rows = load_arc_tasks(split, ids, fewshot.max_grid_size)
    if label_free:
        rows = label_free_tasks(rows)
    return [ArcTask(**row) for row in select_tasks(rows, count, seed)]


def demonstrations(arc: ArcTask):
    return pairs(arc.train_inputs, arc.train_outputs)


@task(cache_policy=CACHED, persist_result=True, task_run_name="sample-self-edits-{arc.id}")
def sample_self_edits(
    policy_ref: PolicyRef,
    model: ModelConfig,
    arc: ArcTask,
    config: SelfEditConfig,
    fewshot: FewshotConfig,
    batch_size: int,
    seed: int,
    num_samples: int,
) -> list[ConfigSelfEditRecord]:
    """K test-time training configs for one task, invalid ones redrawn a bounded number of times."""
    maybe_fail("sample_self_edits", arc.id)
    with use_model(policy_ref, model) as loaded:
        fmt = choose_format(loaded.tokenizer)
        prompt = fewshot_self_edit.self_edit_prompt(demonstrations(arc), fmt, fewshot)
        edits = fewshot_self_edit.sample_self_edits(
            loaded.model,
            loaded.tokenizer,
            prompt,
            bounds=fewshot,
            num_demonstrations=len(arc.train_inputs),
            batch_size=batch_size,
            num_samples=num_samples,
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            seed=seed,
        )
    return [
        ConfigSelfEditRecord(
            index=i, text=e.text, prompt=prompt, config=e.config, failure=e.failure, attempts=e.attempts
        )
        for i, e in enumerate(edits)
    ]


@task(cache_policy=CACHED, persist_result=True, tags=["gpu"], task_run_name="train-adapter-{arc.id}-{label}")
def train_adapter(
    policy_ref: PolicyRef,
    model: ModelConfig,
    arc: ArcTask,
    self_edit: TTTConfig | None,
    failure: str | None,
    label: str,
    lora: LoraConfig,
    config: InnerLoopConfig,
) -> AdapterRecord:
    """A fresh LoRA adapter trained on the task's demonstrations as the config says (leave-one-out,
    augmented), saved under ``$SEAL_HOME/adapters``; an invalid config is recorded, not trained."""
    maybe_fail("train_adapter", label)
    if self_edit is None:
        return AdapterRecord(path=None, failure=failure or "no self-edit config")
    key = f"{stable_seed(self_edit.canonical(), lora, config):08x}"
    folder = adapter_dir(seal_home(), policy_ref, arc.id, key)
    with use_model(policy_ref, model) as loaded:
        fmt = choose_format(loaded.tokenizer)
        with adapter_slot(loaded, lora).fresh(seed=config.seed) as adapted:
            try:
                result = ttt.train_ttt_adapter(
                    adapted,
                    loaded.tokenizer,
                    demonstrations(arc),
                    self_edit,
                    fmt,
                    batch_size=config.batch_size,
                    max_length=config.max_length,
                    seed=config.seed,
                )
            except inner_loop.NonFiniteLossError as exc:
                return AdapterRecord(path=None, failure=f"non-finite loss: {exc}")
            except ValueError as exc:  # nothing fits in inner_loop.max_length
                return AdapterRecord(path=None, failure=str(exc))
            except torch.OutOfMemoryError as exc:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise InnerLoopOutOfMemory(f"{arc.id} {label}: {str(exc)[:200]}") from None
            inner_loop.save_adapter(adapted, folder)
    return AdapterRecord(
        path=str(folder),
        steps=result.steps,
        tokens=result.tokens,
        mean_loss=result.mean_loss,
        seconds=result.seconds,
        digest=weights_digest(folder),
    )


@task(cache_policy=CACHED, persist_result=True, task_run_name="evaluate-adapter-{arc.id}-{label}")
def evaluate_adapter(
    policy_ref: PolicyRef,
    model: ModelConfig,
    arc: ArcTask,
    adapter: AdapterRecord | None,
    label: str,
    config: EvalConfig,
    voting: bool,
) -> EvalRecord:
    """Greedy answers to the task's test inputs with the adapter (none: in-context learning alone);
    correct only on an exact grid, partial credit (``f1``) is the share of cells right."""
    maybe_fail("evaluate_adapter", label)
    if adapter is not None and adapter.failure is not None:
        return EvalRecord.failed(arc.num_targets, adapter.failure)
    if adapter is not None:
        found = weights_digest(Path(adapter.path))
        if found is None or (adapter.digest and found != adapter.digest):
            raise StaleArtifact(
                f"adapter {adapter.path} is missing or altered (weights digest {found}, recorded {adapter.digest})"
            )
    start = time.perf_counter()
    tests = [as_grid(g) for g in arc.test_inputs]
    with use_model(policy_ref, model) as loaded:
        fmt = choose_format(loaded.tokenizer)

        def predict(m):
            return ttt.predict_outputs(
                m, loaded.tokenizer, demonstrations(arc), tests, fmt, voting=voting, batch_size=config.batch_size
            )

        if adapter is None:
            predictions = predict(loaded.model)
        else:
            with adapter_slot(loaded, inner_loop.saved_lora(Path(adapter.path))).loaded(Path(adapter.path)) as adapted:
                predictions = predict(adapted)
    expected = [as_grid(g) for g in arc.test_outputs]
    return EvalRecord(
        predictions=[encode_grid(p.grid, fmt) if p.grid is not None else p.text[:200] for p in predictions],
        correct=[p.grid == e for p, e in zip(predictions, expected)],
        f1=[cell_accuracy(p.grid, e) for p, e in zip(predictions, expected)],
        seconds=time.perf_counter() - start,
    )


@task(cache_policy=CACHED, persist_result=True, task_run_name="select-self-edits-{context_id}")
def select_self_edits(context_id: str, baseline: EvalRecord, scores: list[EvalRecord]) -> SolvedSelectionRecord:
    """Reward 1 for each self-edit whose adapted model solved every test output; all of them kept."""
    selection = rest_em.select_solving_self_edits(
        [bool(s.correct) and all(s.correct) for s in scores], [s.failure for s in scores]
    )
    return SolvedSelectionRecord(
        context_id=context_id,
        baseline_accuracy=baseline.accuracy,
        accuracies=[s.accuracy for s in scores],
        rewards=list(selection.rewards),
        failures=[s.failure for s in scores],
        kept=list(selection.kept),
        outcome=selection.outcome,
    )
