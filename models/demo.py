"""The inner-loop demo: does a self-edit teach the model a passage it cannot see?

For each held-out context, three closed-book scores on its questions:
no adaptation, a LoRA adapter trained on the passage only, and one trained on the passage plus
one self-edit sampled from the base model (the paper's Table 2 columns, minus RL).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from models.base_model import LoadedModel
from models.config import SealConfig
from models.inner_loop import EvalResult, evaluate_adapter, fresh_adapter, train_adapter
from models.knowledge_data import load_contexts, select_contexts
from models.self_edit import SelfEdit, inner_loop_plan, sample_self_edits

CONDITIONS = ("no_adaptation", "passage_only", "passage_self_edit")


@dataclass(frozen=True)
class DemoRow:
    context_id: str
    questions: int
    correct: dict[str, int]  # condition -> questions answered correctly
    self_edit: SelfEdit
    seconds: dict[str, float]


def adapt_and_evaluate(
    loaded: LoadedModel,
    self_edit: SelfEdit | None,
    context: dict,
    config: SealConfig,
) -> EvalResult:
    """One inner loop: fresh adapter, train on the self-edit and the passage (the passage alone
    for ``None``), evaluate on the context's questions, remove the adapter."""
    documents, plan = inner_loop_plan(self_edit, context["title"], context["context"], config.inner_loop)
    questions, answers = context["questions"], context["answers"]
    with fresh_adapter(loaded.model, config.lora, seed=config.inner_loop.seed) as adapted:
        train_adapter(adapted, loaded.tokenizer, documents, plan)
        return evaluate_adapter(adapted, loaded.tokenizer, questions, answers, config.eval)


def run_inner_loop_demo(
    loaded: LoadedModel,
    config: SealConfig,
    num_contexts: int | None = None,
    on_row: Callable[[DemoRow], None] | None = None,
) -> list[DemoRow]:
    """Score the three conditions on ``num_contexts`` validation contexts.

    Args:
        loaded: the base model, kept in memory for every inner loop.
        config: the whole config; ``data.num_eval_contexts`` contexts unless ``num_contexts``.
        on_row: called after each context (for progress output).

    Returns:
        One row per context.
    """
    contexts = select_contexts(
        load_contexts(config.data, "validation"),
        num_contexts or config.data.num_eval_contexts,
        seed=config.data.seed,
    )
    rows = []
    for index, ctx in enumerate(contexts):
        questions, answers = ctx["questions"], ctx["answers"]
        start = time.perf_counter()
        baseline = evaluate_adapter(loaded.model, loaded.tokenizer, questions, answers, config.eval)
        t_base = time.perf_counter()
        passage = adapt_and_evaluate(loaded, None, ctx, config)
        t_passage = time.perf_counter()
        (self_edit,) = sample_self_edits(
            loaded.model,
            loaded.tokenizer,
            title=ctx["title"],
            context=ctx["context"],
            kind=config.self_edit.prompt,
            num_samples=1,
            temperature=config.self_edit.temperature,
            top_p=config.self_edit.top_p,
            max_new_tokens=config.self_edit.max_new_tokens,
            max_documents=config.self_edit.max_documents,
            seed=config.seed + index,
        )
        t_sample = time.perf_counter()
        edited = adapt_and_evaluate(loaded, self_edit, ctx, config)
        t_edit = time.perf_counter()
        row = DemoRow(
            context_id=ctx["id"],
            questions=len(questions),
            correct={
                "no_adaptation": baseline.num_correct,
                "passage_only": passage.num_correct,
                "passage_self_edit": edited.num_correct,
            },
            self_edit=self_edit,
            seconds={
                "no_adaptation": t_base - start,
                "passage_only": t_passage - t_base,
                "sample": t_sample - t_passage,
                "passage_self_edit": t_edit - t_sample,
            },
        )
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """The demo's summary: correct / total questions and accuracy per condition."""
    total = sum(r.questions for r in rows)
    lines = [f"{'condition':<24}{'correct':>10}{'accuracy':>10}", "-" * 44]
    for condition in CONDITIONS:
        correct = sum(r.correct[condition] for r in rows)
        label = condition.replace("_", " ").replace("self edit", "+ self-edit")
        lines.append(f"{label:<24}{f'{correct}/{total}':>10}{correct / max(total, 1):>10.1%}")
    lines.append(f"({len(rows)} contexts, {total} questions)")
    return "\n".join(lines)


def peak_memory_mb() -> float:
    """This process's peak resident memory in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
