"""The knowledge-incorporation domain (§4.2): its tasks behind the ``Domain`` seam, and its
held-out flow, the paper's Table 2.

A context is a passage with questions; a self-edit is the implications the policy writes about
it, one document per line; an inner loop trains a LoRA on the self-edit plus the passage and
answers the questions closed-book (``tasks/knowledge.py``). Inner loops are trained and scored
in groups, through stacked adapters.
"""

from __future__ import annotations

import time

from prefect import flow

from flows.held_out import HeldOutResult
from flows.inner_loop import InnerLoopGroup, SeedMean
from flows.progress import Progress
from flows.runner import SERIAL, on_runner, placement
from models.config import EvalConfig, SealConfig
from models.edit_metrics import describe_self_edit
from models.stacked_lora import length_groups
from tasks import knowledge
from tasks.records import PolicyRef, stable_seed

HELD_OUT_COLUMNS = ("no_adaptation", "passage_only", "base_self_edits", "policy_self_edits")
# SEAL against the passage alone (the paper's claim), then what RL adds to the base model's self-edits.
HELD_OUT_COMPARISONS = (("policy_self_edits", "passage_only"), ("policy_self_edits", "base_self_edits"))


class KnowledgeDomain:
    """Knowledge incorporation: the tasks of ``tasks/knowledge.py``."""

    name = "knowledge"
    held_out_title = "held-out closed-book accuracy (correct/questions):"
    policy_column = "policy_self_edits"
    edit_measures = ("documents", "tokens", "fact_recall", "answer_coverage", "copied_fraction")

    def fetch_contexts(self, config, split, count, seed):
        return knowledge.fetch_contexts(config.data, split, count, seed=seed)

    def write_questions(self, writer, config, contexts, label):
        """All passages' question-answer pairs in one batched task (``reward.source: generated``)."""
        reward = config.reward
        return knowledge.write_questions.submit(
            writer, config.model, contexts, reward.num_questions, reward.question_tokens, label
        ).result()

    def sample_self_edits(self, policy, config, contexts, seeds, num_samples, label):
        """All contexts in one batched sampling task."""
        future = knowledge.sample_self_edits.submit(
            policy, config.model, contexts, config.self_edit, seeds, num_samples, label
        )
        return [FutureItem(future, i) for i in range(len(contexts))]

    def evaluate_baselines(self, policy, config, contexts, label):
        """All contexts' questions in one batched evaluation task."""
        future = knowledge.evaluate_baselines.submit(policy, config.model, contexts, answering(config), label)
        return [FutureItem(future, i) for i in range(len(contexts))]

    def inner_loops(self, policy, config, items, tag="", seeds=None):
        """Groups of ``inner_loop.group_size`` inner loops, each trained and evaluated together
        through stacked adapters (two tasks per group). With ``seeds`` (None:
        ``inner_loop.seeds``) > 1 each item trains once per seed and its result pools theirs
        (:class:`flows.inner_loop.SeedMean`)."""

        def submitter(inner):
            def submit(group, label, refresh):
                train, evaluate = knowledge.train_adapters, knowledge.evaluate_adapters
                if refresh:
                    train, evaluate = train.with_options(refresh_cache=True), evaluate.with_options(refresh_cache=True)
                pairs, labels = [(c, e) for c, e, _ in group], [label for _, _, label in group]
                adapters = train.submit(policy, config.model, pairs, label, labels, config.lora, inner)
                scored = evaluate.submit(
                    policy, config.model, [c for c, _ in pairs], adapters, label, labels, answering(config), inner.lanes
                )
                return adapters, scored

            return submit

        chunks = length_groups([_documents(edit) for _, edit, _ in items], config.inner_loop.group_size)
        labels = []
        for chunk in chunks:
            contexts = list(dict.fromkeys(items[i][0].id for i in chunk))
            label = "+".join(contexts) if len(contexts) <= 2 else f"{contexts[0]}+{len(contexts) - 1}"
            labels.append(f"{label}-{tag}" if tag else label)
        first, count = config.inner_loop.seed, seeds or config.inner_loop.seeds
        per_seed = []  # for each training seed, a member per item: the seed's groups share its config
        for seed in range(first, first + count):
            # A task trains one seed, so its key holds that seed and not the count: seed 0 of a
            # 3-seed run is seed 0 of a 1-seed run, cached once.
            submit = submitter(config.inner_loop.model_copy(update={"seed": seed, "seeds": 1}))
            members: list = [None] * len(items)
            for chunk, label in zip(chunks, labels):
                group = InnerLoopGroup(
                    submit, [items[i] for i in chunk], label if count == 1 else f"{label}-seed{seed}"
                )
                for i, member in zip(chunk, group.members):
                    members[i] = member
            per_seed.append(members)
        if count == 1:
            return per_seed[0]
        return [SeedMean(list(seeds)) for seeds in zip(*per_seed)]

    def select_self_edits(self, config, context_id, baseline, scores, edits):
        return knowledge.select_self_edits(context_id, baseline, scores, edits, config.reward)

    def describe(self, context, edit):
        """Length, and what the self-edit carries of the passage (``models/edit_metrics.py``)."""
        return {
            "documents": len(edit.documents),
            "tokens": edit.tokens,
            **describe_self_edit(edit.text, context.context, context.answers),
        }

    def evaluate_policy(self, config, policy, base):
        return on_runner(evaluate_policy, config.runner)(config, policy, base)


class FutureItem:
    """Item ``index`` of a future whose result is a list: what the flows expect of a per-context
    future when one task serves several contexts."""

    def __init__(self, future, index: int) -> None:
        self.future, self.index = future, index

    @property
    def state(self):
        return self.future.state

    def wait(self, timeout: float | None = None) -> None:
        self.future.wait(timeout)

    def result(self, *args, **kwargs):
        return self.future.result(*args, **kwargs)[self.index]


def answering(config: SealConfig) -> EvalConfig:
    """``config.eval`` as the evaluate tasks take it (and key their cache by): without ``seeds``,
    which sets how many inner loops the flow submits, not how one is answered, so ``eval.seeds``
    set to what it inherits (or changed) reuses the evaluations already made."""
    return config.eval.model_copy(update={"seeds": None})


def _documents(edit) -> int:
    """Training documents of a knowledge inner loop: the self-edit's lines plus the passage."""
    return (len(edit.documents) if edit is not None else 0) + 1


KNOWLEDGE = KnowledgeDomain()


@flow(flow_run_name="held-out-{policy.name}", task_runner=SERIAL)
def evaluate_policy(config: SealConfig, policy: PolicyRef, base: PolicyRef) -> HeldOutResult:
    """The paper's columns (Table 2) on held-out contexts.

    The first three columns are the base model's: no adaptation, adapted on the passage, adapted
    on the passage plus a self-edit it wrote itself. Their tasks depend on the base model only, so
    every evaluation after the first finds them cached. The last column is SEAL's: ``policy``
    writes the self-edit and ``policy`` is adapted on it (the base model before any update).
    """
    with placement(config.runner):
        return _evaluate_policy(config, policy, base)


def _evaluate_policy(config: SealConfig, policy: PolicyRef, base: PolicyRef) -> HeldOutResult:
    start = time.perf_counter()
    contexts = knowledge.fetch_contexts(config.data, "validation", config.data.num_eval_contexts, seed=config.data.seed)
    progress = Progress(f"held-out-{policy.name}", {"contexts": len(contexts)})
    # eval.num_self_edits self-edits per context and column, all contexts sampled in one batched call.
    m = config.eval.num_self_edits
    seeds = [stable_seed(config.seed, "held-out", c.id) for c in contexts]
    base_edits = KNOWLEDGE.sample_self_edits(base, config, contexts, seeds, m, f"held-out-{base.name}")
    same = policy.digest == base.digest  # before any update both columns are the same work
    policy_edits = (
        base_edits
        if same
        else KNOWLEDGE.sample_self_edits(policy, config, contexts, seeds, m, f"held-out-{policy.name}")
    )
    baselines = KNOWLEDGE.evaluate_baselines(base, config, contexts, f"held-out-{base.name}")
    # Per context: the passage alone, then its m base self-edits.
    base_loops = KNOWLEDGE.inner_loops(
        base,
        config,
        [
            item
            for c, edits in zip(contexts, base_edits)
            for item in [(c, None, "passage")] + [(c, e, f"base-edit{e.index}") for e in edits.result()]
        ],
        tag="base",
        seeds=config.eval.seeds,
    )
    per_base = [base_loops[i * (m + 1) : (i + 1) * (m + 1)] for i in range(len(contexts))]
    if same:
        per_policy = [loops[1:] for loops in per_base]
    else:
        policy_loops = KNOWLEDGE.inner_loops(
            policy,
            config,
            [(c, e, f"policy-edit{e.index}") for c, edits in zip(contexts, policy_edits) for e in edits.result()],
            tag="policy",
            seeds=config.eval.seeds,
        )
        per_policy = [policy_loops[i * m : (i + 1) * m] for i in range(len(contexts))]
    futures = [
        {
            "no_adaptation": [baseline],
            "passage_only": loops[:1],
            "base_self_edits": loops[1:],
            "policy_self_edits": policy,
        }
        for baseline, loops, policy in zip(baselines, per_base, per_policy)
    ]
    for i in range(len(contexts)):
        _advance_finished(futures[: i + 1], progress)
        for column in futures[i].values():
            for future in column:
                _wait(future)
    counts: dict[str, list[tuple[float, int]]] = {name: [] for name in HELD_OUT_COLUMNS}
    per_context = []
    for c, columns in zip(contexts, futures):
        # A column's score on a context: correct answers, averaged over its self-edits and seeds.
        scores = {
            name: [f.result()[1] if hasattr(f, "adapter") else f.result() for f in column]
            for name, column in columns.items()
        }
        means = {name: sum(s.mean_correct for s in records) / len(records) for name, records in scores.items()}
        for name, mean in means.items():
            counts[name].append((mean, len(c.questions)))
        per_context.append({"context_id": c.id, "questions": len(c.questions), **means})
    progress.advance("contexts", len(contexts) - progress.done["contexts"])
    progress.close()
    return HeldOutResult(policy, counts, time.perf_counter() - start, HELD_OUT_COMPARISONS, per_context)


def _wait(column) -> None:
    for future in (column.adapter, column.score) if hasattr(column, "adapter") else (column,):
        future.wait()


def _advance_finished(submitted: list[dict], progress: Progress) -> None:
    """Count the held-out contexts whose every column has finished since the last call."""

    def finished(column) -> bool:
        futures = (column.adapter, column.score) if hasattr(column, "adapter") else (column,)
        return all(f.state.is_final() for f in futures)

    done = sum(1 for columns in submitted if all(finished(f) for c in columns.values() for f in c))
    progress.advance("contexts", done - progress.done["contexts"])
