"""The one seam between SEAL's two settings: what a self-edit is, how it is applied, how it is scored.

The outer loop (``flows/training.py``: sample K self-edits per context, an inner loop per
self-edit, rewards, ReST-EM policy update, MLflow tracking, caching) is the same for both of the
paper's domains. Everything that differs sits behind :class:`Domain`, chosen by the config's
``domain`` field (:func:`domain_for`):

=================  =====================================  =========================================
                   knowledge (§4.2)                       fewshot (§4.1, ARC)
=================  =====================================  =========================================
context            a passage with questions               an ARC task (demonstrations, test pairs)
self-edit          implications, one document per line    a JSON config: augmentations, loss mode,
                                                          learning rate, epochs
applied by         LoRA on the documents + passage        LoRA test-time training on augmented
                                                          leave-one-out tasks, as configured
scored by          closed-book answers to the questions   exact match of the predicted test grid
reward, kept       beats no adaptation; the best one      solved; every solving self-edit
held-out table     Table 2 (no adaptation, passage, ...)  Table 1 (in-context, TTT, SEAL, oracle)
=================  =====================================  =========================================

Each method submits one domain task with only the config sections it depends on, so cache keys
stay as narrow as the knowledge domain's were (a new ``policy_update`` setting reuses the E-step).
"""

from __future__ import annotations

from typing import Any, Protocol

from flows.inner_loop import InnerLoop, InnerLoopGroup, SeedMean
from flows.runner import on_runner
from models.config import SealConfig
from models.edit_metrics import describe_self_edit
from models.fewshot.self_edit import check_bounds
from models.stacked_lora import length_groups
from tasks import fewshot, knowledge
from tasks.records import ConfigSelfEditRecord, PolicyRef


class Domain(Protocol):
    """What the flows need to know about a domain. Methods that submit a task return its future."""

    name: str
    held_out_title: str  # what ``seal run``/``seal eval`` print above the held-out table
    policy_column: str  # the held-out column that scores the trained policy ("best" alias)
    edit_measures: tuple[str, ...]  # numeric columns of ``describe``, logged per iteration

    def fetch_contexts(self, config: SealConfig, split: str, count: int, seed: int) -> list:
        """``count`` contexts of ``split`` ("train" or "validation"), chosen by ``seed``."""

    def sample_self_edits(self, policy: PolicyRef, config: SealConfig, contexts: list, seeds: list[int],
                          num_samples: int, label: str) -> list:
        """For each context, a future of K self-edit records sampled from ``policy`` with its seed
        (``result()``, ``wait()``, ``state``; several may share one task); ``label`` names tasks."""

    def evaluate_baselines(self, policy: PolicyRef, config: SealConfig, contexts: list, label: str) -> list:
        """For each context, a future of the unadapted policy's score on its targets."""

    def inner_loops(self, policy: PolicyRef, config: SealConfig, items: list[tuple[Any, Any, str]],
                    tag: str = "") -> list:
        """Submit an inner loop per (context, self-edit, label) item (self-edit None: the domain's
        no-self-edit adaptation). Returns one object per item with ``adapter`` and ``score``
        futures and ``result()`` -> (AdapterRecord, EvalRecord); ``tag`` goes into task names."""

    def select_self_edits(self, config: SealConfig, context_id: str, baseline: Any, scores: list, edits: list):
        """Rewards and the kept self-edits (``.rewards``, ``.kept_indices``, ``.baseline_accuracy``,
        ``.failures``) of a context's scored ``edits``."""

    def describe(self, context: Any, edit: Any) -> dict[str, Any]:
        """The domain's own columns of a self-edit's row in the iteration table; those named in
        ``edit_measures`` are numbers, averaged per iteration into MLflow metrics."""

    def evaluate_policy(self, config: SealConfig, policy: PolicyRef, base: PolicyRef):
        """The held-out flow: the paper's table for this domain, as a ``HeldOutResult``."""


class KnowledgeDomain:
    """Knowledge incorporation: the tasks of ``tasks/knowledge.py``."""

    name = "knowledge"
    held_out_title = "held-out closed-book accuracy (correct/questions):"
    policy_column = "policy_self_edits"
    edit_measures = ("documents", "tokens", "fact_recall", "answer_coverage", "copied_fraction")

    def fetch_contexts(self, config, split, count, seed):
        return knowledge.fetch_contexts(config.data, split, count, seed=seed)

    def sample_self_edits(self, policy, config, contexts, seeds, num_samples, label):
        """All contexts in one batched sampling task."""
        future = knowledge.sample_self_edits.submit(policy, config.model, contexts, config.self_edit, seeds,
                                                    num_samples, label)
        return [FutureItem(future, i) for i in range(len(contexts))]

    def evaluate_baselines(self, policy, config, contexts, label):
        """All contexts' questions in one batched evaluation task."""
        future = knowledge.evaluate_baselines.submit(policy, config.model, contexts, config.eval, label)
        return [FutureItem(future, i) for i in range(len(contexts))]

    def inner_loops(self, policy, config, items, tag=""):
        """Groups of ``inner_loop.group_size`` inner loops, each trained and evaluated together
        through stacked adapters (two tasks per group). With ``inner_loop.seeds`` > 1 each item
        trains once per seed and its result pools theirs (:class:`flows.inner_loop.SeedMean`)."""
        def submitter(inner):
            def submit(group, label, refresh):
                train, evaluate = knowledge.train_adapters, knowledge.evaluate_adapters
                if refresh:
                    train, evaluate = train.with_options(refresh_cache=True), evaluate.with_options(refresh_cache=True)
                pairs, labels = [(c, e) for c, e, _ in group], [label for _, _, label in group]
                adapters = train.submit(policy, config.model, pairs, label, labels, config.lora, inner)
                scored = evaluate.submit(policy, config.model, [c for c, _ in pairs], adapters, label, labels,
                                         config.eval, inner.lanes)
                return adapters, scored
            return submit

        chunks = length_groups([_documents(edit) for _, edit, _ in items], config.inner_loop.group_size)
        labels = []
        for chunk in chunks:
            contexts = list(dict.fromkeys(items[i][0].id for i in chunk))
            label = "+".join(contexts) if len(contexts) <= 2 else f"{contexts[0]}+{len(contexts) - 1}"
            labels.append(f"{label}-{tag}" if tag else label)
        first, count = config.inner_loop.seed, config.inner_loop.seeds
        per_seed = []  # for each training seed, a member per item: the seed's groups share its config
        for seed in range(first, first + count):
            submit = submitter(config.inner_loop.model_copy(update={"seed": seed}))
            members: list = [None] * len(items)
            for chunk, label in zip(chunks, labels):
                group = InnerLoopGroup(submit, [items[i] for i in chunk], label if count == 1 else f"{label}-seed{seed}")
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
        return {"documents": len(edit.documents), "tokens": edit.tokens,
                **describe_self_edit(edit.text, context.context, context.answers)}

    def evaluate_policy(self, config, policy, base):
        from flows.training import evaluate_policy  # flows.training imports this module

        return on_runner(evaluate_policy, config.runner)(config, policy, base)


class FewshotDomain:
    """Few-shot learning on ARC: the tasks of ``tasks/fewshot.py``."""

    name = "fewshot"
    held_out_title = ("held-out ARC tasks, the paper's Table 1 (solved/tasks; for the self-edit "
                      "rows solved/self-edits):")
    policy_column = "seal"
    edit_measures = ("attempts",)

    def fetch_contexts(self, config, split, count, seed):
        return fewshot.fetch_arc_tasks(config.fewshot, split, count, seed=seed)

    def sample_self_edits(self, policy, config, contexts, seeds, num_samples, label):
        """A task per ARC task: each redraws its own invalid configs."""
        return [fewshot.sample_self_edits.submit(policy, config.model, arc, config.self_edit, config.fewshot,
                                                 config.inner_loop.batch_size, seed=seed, num_samples=num_samples)
                for arc, seed in zip(contexts, seeds, strict=True)]

    def train_adapter(self, policy, config, context, edit, label, refresh=False):
        train = fewshot.train_adapter.with_options(refresh_cache=True) if refresh else fewshot.train_adapter
        # The parsed config, not the text, is the input: equal configs share one adapter.
        return train.submit(policy, config.model, context, edit.config, edit.failure, label, config.lora,
                            config.inner_loop)

    def evaluate_adapter(self, policy, config, context, adapter, label, refresh=False):
        evaluate = fewshot.evaluate_adapter.with_options(refresh_cache=True) if refresh else fewshot.evaluate_adapter
        return evaluate.submit(policy, config.model, context, adapter, label, config.eval, config.fewshot.voting)

    def evaluate_baselines(self, policy, config, contexts, label):
        return [self.evaluate_adapter(policy, config, arc, None, "baseline") for arc in contexts]

    def inner_loops(self, policy, config, items, tag=""):
        """One inner loop per self-edit: each config trains on its own augmented task."""
        def submitter(arc, edit, label):
            def submit(refresh):
                adapter = self.train_adapter(policy, config, arc, edit, label, refresh=refresh)
                return adapter, self.evaluate_adapter(policy, config, arc, adapter, label, refresh=refresh)
            return submit

        return [InnerLoop(submitter(arc, edit, f"{tag}-{label}" if tag else label), arc.num_targets)
                for arc, edit, label in items]

    def select_self_edits(self, config, context_id, baseline, scores, edits):
        return fewshot.select_self_edits(context_id, baseline, scores)

    def describe(self, context, edit):
        return {"config": edit.config.canonical() if edit.config else None, "attempts": edit.attempts}

    def oracle_self_edits(self, config: SealConfig, arc) -> list[ConfigSelfEditRecord]:
        """The oracle's grid search as self-edits (over ``fewshot.max_steps`` for this task: rejected)."""
        records = []
        for index, oracle in enumerate(config.fewshot.oracle_configs):
            problems = check_bounds(oracle, config.fewshot, len(arc.train_inputs), config.inner_loop.batch_size)
            records.append(ConfigSelfEditRecord(
                index=index, text=oracle.canonical(), prompt="", config=None if problems else oracle,
                failure=("out of bounds: " + "; ".join(problems)) if problems else None,
            ))
        return records

    def evaluate_policy(self, config, policy, base):
        from flows.fewshot import evaluate_fewshot_policy  # flows.fewshot imports flows.training

        return on_runner(evaluate_fewshot_policy, config.runner)(config, policy, base)


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


def _documents(edit) -> int:
    """Training documents of a knowledge inner loop: the self-edit's lines plus the passage."""
    return (len(edit.documents) if edit is not None else 0) + 1


KNOWLEDGE = KnowledgeDomain()
FEWSHOT = FewshotDomain()


def domain_for(config: SealConfig) -> Domain:
    """The domain the config's ``domain`` field names."""
    return {"knowledge": KNOWLEDGE, "fewshot": FEWSHOT}[config.domain]


