"""The few-shot domain (§4.1, ARC): its tasks behind the ``Domain`` seam, and its held-out
flow, the paper's Table 1.

A context is an ARC task; a self-edit is a JSON test-time-training config the policy writes;
an inner loop trains a LoRA on the task's augmented leave-one-out demonstrations as configured
and predicts the test grids (``tasks/fewshot.py``), one inner loop per config.

Table 1, per held-out ARC task, with the same inner loops as training (``FEWSHOT.inner_loops``):

- ``in_context``: the base model answers with the demonstrations in its prompt, no adaptation;
- ``ttt_self_edits``: test-time training with each of K configs the base model wrote (before RL);
- ``seal``: the same with K configs the trained policy wrote (after RL);
- ``oracle_ttt``: test-time training with each config of a small grid search
  (``fewshot.oracle_configs``); the task counts as solved if any of them solves it.

As in the paper, the two self-edit rows count self-edits (solved/K per task), the other two
count tasks. The SEAL row adapts the policy that wrote its configs, as the reference code does
at evaluation (``fewshot.seal_adapts: base`` adapts the base model instead, so that only who
writes the config changes); the other rows adapt the base model. Each row has a 95 % interval
from a bootstrap over tasks, and the paired difference SEAL - TTT with base self-edits has one.
"""

from __future__ import annotations

import time

from prefect import flow

from flows.held_out import HeldOutResult
from flows.inner_loop import InnerLoop
from flows.progress import Progress
from flows.runner import SERIAL, on_runner, placement
from models.config import SealConfig
from models.fewshot.self_edit import check_bounds
from tasks import fewshot
from tasks.records import ConfigSelfEditRecord, EvalRecord, PolicyRef, stable_seed


class FewshotDomain:
    """Few-shot learning on ARC: the tasks of ``tasks/fewshot.py``."""

    name = "fewshot"
    held_out_title = "held-out ARC tasks, the paper's Table 1 (solved/tasks; for the self-edit rows solved/self-edits):"
    policy_column = "seal"
    edit_measures = ("attempts",)

    def fetch_contexts(self, config, split, count, seed):
        # reward.source=demonstrations: training tasks are rewarded on a held-out demonstration.
        label_free = split == "train" and config.reward.source == "demonstrations"
        return fewshot.fetch_arc_tasks(config.fewshot, split, count, seed=seed, label_free=label_free)

    def write_questions(self, writer, config, contexts, label):
        """Never called: an ARC task's targets are its test pair or a held-out demonstration (the
        config refuses ``reward.source: generated`` in this domain)."""
        raise NotImplementedError(
            "the few-shot domain rewards solved ARC pairs; use reward.source=questions or demonstrations"
        )

    def sample_self_edits(self, policy, config, contexts, seeds, num_samples, label):
        """A task per ARC task: each redraws its own invalid configs."""
        return [
            fewshot.sample_self_edits.submit(
                policy,
                config.model,
                arc,
                config.self_edit,
                config.fewshot,
                config.inner_loop.batch_size,
                seed=seed,
                num_samples=num_samples,
            )
            for arc, seed in zip(contexts, seeds, strict=True)
        ]

    def train_adapter(self, policy, config, context, edit, label, refresh=False):
        train = fewshot.train_adapter.with_options(refresh_cache=True) if refresh else fewshot.train_adapter
        # The parsed config, not the text, is the input: equal configs share one adapter.
        return train.submit(
            policy, config.model, context, edit.config, edit.failure, label, config.lora, config.inner_loop
        )

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

        return [
            InnerLoop(submitter(arc, edit, f"{tag}-{label}" if tag else label), arc.num_targets)
            for arc, edit, label in items
        ]

    def select_self_edits(self, config, context_id, baseline, scores, edits):
        return fewshot.select_self_edits(context_id, baseline, scores)

    def describe(self, context, edit):
        return {"config": edit.config.canonical() if edit.config else None, "attempts": edit.attempts}

    def oracle_self_edits(self, config: SealConfig, arc) -> list[ConfigSelfEditRecord]:
        """The oracle's grid search as self-edits (over ``fewshot.max_steps`` for this task: rejected)."""
        records = []
        for index, oracle in enumerate(config.fewshot.oracle_configs):
            problems = check_bounds(oracle, config.fewshot, len(arc.train_inputs), config.inner_loop.batch_size)
            records.append(
                ConfigSelfEditRecord(
                    index=index,
                    text=oracle.canonical(),
                    prompt="",
                    config=None if problems else oracle,
                    failure=("out of bounds: " + "; ".join(problems)) if problems else None,
                )
            )
        return records

    def evaluate_policy(self, config, policy, base):
        return on_runner(evaluate_fewshot_policy, config.runner)(config, policy, base)


FEWSHOT = FewshotDomain()


TABLE_1 = ("in_context", "ttt_self_edits", "seal", "oracle_ttt")


def solved(score: EvalRecord) -> bool:
    return score.failure is None and bool(score.correct) and all(score.correct)


@flow(flow_run_name="held-out-{policy.name}", task_runner=SERIAL)
def evaluate_fewshot_policy(config: SealConfig, policy: PolicyRef, base: PolicyRef) -> HeldOutResult:
    """Table 1 on ``fewshot.eval_task_ids``: success counts of the four rows."""
    with placement(config.runner):
        return _evaluate_fewshot_policy(config, policy, base)


def _evaluate_fewshot_policy(config: SealConfig, policy: PolicyRef, base: PolicyRef) -> HeldOutResult:
    start = time.perf_counter()
    tasks = FEWSHOT.fetch_contexts(config, "validation", config.data.num_eval_contexts, seed=config.data.seed)
    k = config.self_edit.num_samples
    progress = Progress(f"held-out-{policy.name}", {"tasks": len(tasks)})
    submitted = []
    for arc in tasks:
        seed = stable_seed(config.seed, "held-out", arc.id)
        in_context = FEWSHOT.evaluate_adapter(base, config, arc, None, "baseline")
        base_edits = FEWSHOT.sample_self_edits(base, config, [arc], [seed], k, f"held-out-{base.name}")[0].result()
        ttt = FEWSHOT.inner_loops(base, config, [(arc, e, f"base-edit{e.index}") for e in base_edits])
        if policy.digest == base.digest:  # before any update both rows are the same work
            seal = ttt
        else:
            policy_edits = FEWSHOT.sample_self_edits(policy, config, [arc], [seed], k, f"held-out-{policy.name}")[
                0
            ].result()
            adapted = policy if config.fewshot.seal_adapts == "policy" else base
            seal = FEWSHOT.inner_loops(adapted, config, [(arc, e, f"policy-edit{e.index}") for e in policy_edits])
        oracle = FEWSHOT.inner_loops(
            base, config, [(arc, e, f"oracle{e.index}") for e in FEWSHOT.oracle_self_edits(config, arc)]
        )
        submitted.append((arc, in_context, ttt, seal, oracle))
    counts: dict[str, list[tuple[float, int]]] = {column: [] for column in TABLE_1}
    per_context = []
    for arc, in_context, ttt, seal, oracle in submitted:
        rows = {
            "in_context": [solved(in_context.result())],
            "ttt_self_edits": [solved(loop.result()[1]) for loop in ttt],
            "seal": [solved(loop.result()[1]) for loop in seal],
            "oracle_solved_by": [solved(loop.result()[1]) for loop in oracle],
        }
        solved_counts = {
            "in_context": sum(rows["in_context"]),
            "ttt_self_edits": sum(rows["ttt_self_edits"]),
            "seal": sum(rows["seal"]),
            "oracle_ttt": int(any(rows["oracle_solved_by"])),
        }
        for column, count in solved_counts.items():
            counts[column].append((count, k if column in ("ttt_self_edits", "seal") else 1))
        per_context.append(
            {
                "context_id": arc.id,
                **solved_counts,
                "self_edits": k,
                "oracle_solved_by": [i for i, ok in enumerate(rows["oracle_solved_by"]) if ok],
                "seal_configs_valid": sum(1 for loop in seal if loop.result()[0].failure is None),
                # (adapter folder, seconds to train and score it) of every inner loop that ran; equal
                # configs share a folder, so a folder counts once however often it was asked for.
                "inner_loops": sorted(
                    {
                        (a.path, a.seconds + s.seconds)
                        for a, s in (loop.result() for loop in (*ttt, *seal, *oracle))
                        if a.path
                    }
                ),
            }
        )
        progress.advance("tasks")
    progress.close()
    return HeldOutResult(policy, counts, time.perf_counter() - start, (("seal", "ttt_self_edits"),), per_context)
