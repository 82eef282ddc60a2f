"""SEAL training as Prefect flows: the ReST-EM outer loop over LoRA inner loops.

The algorithm (Zweiger et al. 2025, §3, knowledge incorporation):

    policy_0 = base model
    evaluate policy_0 on held-out contexts
    for t in 1..T:
        contexts  = N training contexts
        E-step:   for each context, sample K self-edits from policy_{t-1}
                  for each self-edit: fresh LoRA on policy_{t-1}, train on self-edit + passage,
                  answer the context's questions closed-book
                  reward = 1 if that beats policy_{t-1} with no adaptation
                  keep the context's best self-edit, if it beat the baseline
        M-step:   policy_t = SFT of policy_{t-1} on the kept (prompt -> self-edit) pairs
    evaluate policy_T on held-out contexts

Departures from the paper, on purpose:
- Each self-edit is scored with ``inner_loop.seeds`` training seeds (paper: 3), averaged; the
  CPU configs use 1 (cost).
- ``reward.baseline: passage_only`` makes the reward compare against an adapter trained on the
  passage alone (one more inner loop per context), so a self-edit earns it only by adding to
  what the passage teaches; ``reward.kind: graded`` logs the accuracy gain instead of 0/1.
- An empty self-edit trains on the passage alone (the paper's documents then) but is never kept.
- Ties between self-edits are broken by token F1, then sample index, and recorded.
- If no self-edit of an iteration beat its baseline, the policy is carried over unchanged.
- ``reward.source: generated`` (beyond the paper, which needs labelled questions: §5): before the
  E-step, the policy (or the frozen base) writes question-answer pairs from each training
  passage, the checkable ones replace its questions, and the rewards ask them as they ask real
  ones; a context left with none earns 0 and trains no adapter. With ``data.source: text`` the
  training passages carry no questions at all. Held-out evaluation always asks real questions.
- The M-step merges a LoRA (r=64, alpha=128 as in the paper) into a full checkpoint.
- Held-out evaluation samples ``eval.num_self_edits`` self-edits per context (averaged); the
  baseline columns are the base model's (as in the paper's Table 2), so they are computed once
  per config. Every column has a 95 % interval from a bootstrap over contexts
  (``models/stats.py``), and the paired difference policy self-edits - passage only has one too.

The same loop serves the paper's few-shot setting (§4.1, ARC): contexts are ARC tasks, a
self-edit is a JSON test-time-training config, reward 1 when the adapted model solves the task,
and every solving config is kept. Whatever differs between the two settings goes through the
config's ``domain`` (``flows/domains.py``); this module never names a domain's tasks. Each
domain's held-out flow lives beside it (``flows/knowledge.py``: Table 2, ``flows/fewshot.py``:
Table 1).

Where the tasks run is the config's ``runner`` (``flows/runner.py``): one at a time in this
process, or spread over Ray workers (a local instance or a cluster), with the same results.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.domains import domain_for
from flows.held_out import HeldOutResult, format_held_out, held_out_metrics
from flows.inner_loop import OUT_OF_MEMORY
from flows.progress import Progress
from flows.runner import SERIAL, on_runner, placement, ray_cluster, with_storage
from flows.tracking import Tracker, default_tracking_uri, finishing, flow_run_tracker
from models.base_model import weights_digest
from models.config import SealConfig
from models.paths import seal_home
from tasks.policy import resolve_base_policy, update_policy
from tasks.records import GeneratedQuestionsRecord, PolicyRef, SelectionRecord, stable_seed


@dataclass
class IterationResult:
    iteration: int
    policy: PolicyRef
    selections: list[SelectionRecord]
    rows: list[dict]  # one per self-edit, for the tables
    metrics: dict[str, float]
    questions: list[dict] = field(default_factory=list)  # reward.source=generated: one per context


class IterationFailed(RuntimeError):
    """Too few inner loops of an iteration ran to the end to trust its selection."""


def verified_policy(make, *args) -> PolicyRef:
    """``make(*args)`` (a policy-producing task), run again if its cached checkpoint is gone or
    its weights no longer match the recorded digest. Submitted to the flow's task runner: on Ray
    the M-step runs on a worker with the runner's GPUs, not in the flow's process."""
    policy = make.submit(*args).result()
    if weights_digest(Path(policy.path)) != policy.digest and not policy.digest.startswith("hf-"):
        get_run_logger().warning("policy %s at %s is missing or altered; recomputing it", policy.name, policy.path)
        policy = make.with_options(refresh_cache=True).submit(*args).result()
    return policy


def check_success_fraction(rows: list[dict], minimum: float, iteration: int) -> None:
    """Fail the iteration, saying what happened, when too few of its inner loops ran."""
    crashed = [r for r in rows if (r["failure"] or "").startswith(OUT_OF_MEMORY)]
    ran = 1 - len(crashed) / len(rows) if rows else 0.0
    if ran < minimum:
        examples = "; ".join(f"{r['context_id']} edit{r['self_edit']}: {r['failure']}" for r in crashed[:3])
        raise IterationFailed(
            f"iteration {iteration}: {len(crashed)} of {len(rows)} inner loops ran out of memory, "
            f"so only {ran:.0%} ran to the end (inner_loop.min_success_fraction={minimum}). "
            f"For example: {examples}. Lower inner_loop.max_length or inner_loop.batch_size, "
            f"or free memory, then run again: the finished inner loops are cached."
        )


# The task runners below are the defaults; the training flow runs these subflows with the
# config's runner (flows.runner.on_runner).
@flow(flow_run_name="iteration-{iteration}", task_runner=SERIAL)
def run_iteration(
    config: SealConfig, policy: PolicyRef, iteration: int, exclude: list[str] | None = None
) -> IterationResult:
    """One outer iteration: the E-step over N contexts x K self-edits, then the M-step. Training
    contexts whose id is in ``exclude`` (those a continued policy has seen) are skipped."""
    with placement(config.runner):
        return _run_iteration(config, policy, iteration, exclude or [])


def train_contexts(config: SealConfig, iteration: int, exclude: list[str]) -> list:
    """The iteration's N training contexts (seeded), none of them in ``exclude``.

    Raises:
        ValueError: if the training split has no context left that is not excluded.
    """
    domain, count = domain_for(config), config.data.num_train_contexts
    seed = stable_seed(config.data.seed, "train", iteration)
    if not exclude:
        return domain.fetch_contexts(config, "train", count, seed=seed)
    # The same seeded draw, longer by what may be skipped: the first N unseen of it.
    pool = domain.fetch_contexts(config, "train", count + len(exclude), seed=seed)
    unseen = [c for c in pool if c.id not in set(exclude)][:count]
    if not unseen:
        raise ValueError(
            f"all {len(pool)} training contexts have been seen by the policy; add data "
            "(data.path, data.num_passages) to continue it"
        )
    return unseen


def _run_iteration(config: SealConfig, policy: PolicyRef, iteration: int, exclude: list[str]) -> IterationResult:
    start = time.perf_counter()
    domain = domain_for(config)
    contexts = train_contexts(config, iteration, exclude)
    label = f"iteration-{iteration}"
    questions: list[dict] = []
    if config.reward.source == "generated":
        # Each context's questions become pairs written from its passage; one with none has
        # nothing to reward against: reward 0 (in the questions table), no inner loop.
        writer = policy
        if config.reward.question_writer == "base":
            writer = verified_policy(with_storage(resolve_base_policy, config.runner), config.model)
        written = domain.write_questions(writer, config, contexts, label)
        contexts = [w.context for w in written if w.kept]
    selections, rows, pairs, no_adaptation = (
        _e_step(config, policy, contexts, iteration, label) if contexts else ({}, [], [], [])
    )
    if config.reward.source == "generated":
        questions = generated_question_rows(written, selections, iteration)
    if rows:
        check_success_fraction(rows, config.inner_loop.min_success_fraction, iteration)
    e_step_seconds = time.perf_counter() - start
    new_policy = policy
    if pairs:
        new_policy = verified_policy(
            update_policy,
            policy,
            config.model,
            pairs,
            f"iteration-{iteration}",
            config.policy_update,
            config.lora.target_modules,
        )
    metrics = {
        "reward_mean": _mean([r["reward"] for r in rows]),
        "positive_fraction": _mean([float(r["reward"] > 0) for r in rows]),
        "kept_count": float(len(pairs)),
        "baseline_accuracy": _mean([s.baseline_accuracy for s in selections.values()]),
        "no_adaptation_accuracy": _mean(no_adaptation),
        "adapted_accuracy": _mean([r["accuracy"] for r in rows]),
        "failed_self_edits": float(sum(1 for r in rows if r["failure"])),
        "train_seconds": sum(r["train_seconds"] for r in rows),
        "eval_seconds": sum(r["eval_seconds"] for r in rows),
        "ties": float(sum(1 for s in selections.values() if s.tie)),
        "e_step_seconds": e_step_seconds,
        "m_step_seconds": time.perf_counter() - start - e_step_seconds,
        **edit_measures(rows, domain.edit_measures),
        **generated_question_metrics(questions),
    }
    return IterationResult(iteration, new_policy, list(selections.values()), rows, metrics, questions)


def _mean(values: list[float]) -> float:
    """The mean, 0 for none (an iteration whose every context lacked generated questions)."""
    return sum(values) / len(values) if values else 0.0


def _e_step(
    config: SealConfig, policy: PolicyRef, contexts: list, iteration: int, label: str
) -> tuple[dict[str, SelectionRecord], list[dict], list[tuple[str, str]], list[float]]:
    """K self-edits per context, an inner loop each, rewards and the kept self-edits.

    Returns:
        The selections by context id, a row per self-edit, the kept (prompt, self-edit) pairs and
        each context's no-adaptation accuracy.
    """
    domain = domain_for(config)
    samples = dict(
        zip(
            [c.id for c in contexts],
            domain.sample_self_edits(
                policy,
                config,
                contexts,
                [stable_seed(config.seed, iteration, c.id) for c in contexts],
                config.self_edit.num_samples,
                label,
            ),
        )
    )
    baselines = dict(zip([c.id for c in contexts], domain.evaluate_baselines(policy, config, contexts, label)))
    items = [(c, edit, f"edit{edit.index}") for c in contexts for edit in samples[c.id].result()]
    # reward.baseline=passage_only: one more inner loop per context, on the passage alone.
    passage_baseline = config.reward.baseline == "passage_only"
    passages = [(c, None, "passage") for c in contexts] if passage_baseline else []
    loops = domain.inner_loops(policy, config, items + passages)
    loops, passage_loops = loops[: len(items)], dict(zip([c.id for c in contexts], loops[len(items) :]))
    progress = Progress(
        f"iteration-{iteration}",
        {
            "sampling": len(contexts),
            "training": len(items) + len(passages),
            "evaluation": len(items) + len(passages) + len(contexts),
        },
    )
    progress.advance("sampling", len(contexts))
    scores = {c.id: [loop for (context, _, _), loop in zip(items, loops) if context.id == c.id] for c in contexts}
    for c in contexts:
        baselines[c.id].wait()
        progress.advance("evaluation")
    for loop in [*loops, *passage_loops.values()]:
        loop.adapter.wait()
        progress.advance("training")
        loop.score.wait()
        progress.advance("evaluation")
    progress.close()
    reward_baselines = {
        c.id: passage_loops[c.id].result()[1] if passage_baseline else baselines[c.id].result() for c in contexts
    }
    selections = {
        c.id: domain.select_self_edits(
            config, c.id, reward_baselines[c.id], [loop.result()[1] for loop in scores[c.id]], samples[c.id].result()
        )
        for c in contexts
    }
    rows, pairs = [], []
    for c in contexts:
        selection = selections[c.id]
        for edit, loop, reward, failure in zip(
            samples[c.id].result(), scores[c.id], selection.rewards, selection.failures
        ):
            adapter, score = loop.result()
            kept = edit.index in selection.kept_indices
            rows.append(
                {
                    "iteration": iteration,
                    "context_id": c.id,
                    "self_edit": edit.index,
                    "reward": reward,
                    "kept": kept,
                    "baseline_accuracy": selection.baseline_accuracy,
                    "accuracy": score.accuracy,
                    "f1": score.mean_f1,
                    **domain.describe(c, edit),
                    "failure": failure,
                    "train_seconds": adapter.seconds,
                    "eval_seconds": score.seconds,
                    "adapter": adapter.path,
                    "text": edit.text,
                }
            )
            if kept:
                pairs.append((edit.prompt, edit.text))
    no_adaptation = [baselines[c.id].result().accuracy for c in contexts]
    return selections, rows, pairs, no_adaptation


NO_GENERATED_QUESTIONS = "no checkable question-answer pairs: nothing to reward against"


def generated_question_rows(
    written: list[GeneratedQuestionsRecord], selections: dict[str, SelectionRecord], iteration: int
) -> list[dict]:
    """A row per training context (``reward.source: generated``): the pairs written from its
    passage, what each filter dropped, and its self-edits' rewards (0 when it had no pair)."""
    rows = []
    for w in written:
        selection = selections.get(w.context.id)
        rows.append(
            {
                "iteration": iteration,
                "context_id": w.context.id,
                "title": w.context.title,
                "writer": w.writer,
                "parsed": w.parsed,
                "kept": w.kept,
                **{f"dropped_{name}": count for name, count in w.dropped.items()},
                "rewards": list(selection.rewards) if selection else [0.0],
                "skipped": None if selection else NO_GENERATED_QUESTIONS,
                "pairs": [{"question": q, "answer": a[0]} for q, a in zip(w.context.questions, w.context.answers)],
                "text": w.text,
            }
        )
    return rows


def generated_question_metrics(rows: list[dict]) -> dict[str, float]:
    """Per-iteration summary of the generated questions: the share of parsed pairs kept, pairs
    per context, and contexts left with none (``generated_questions/...``)."""
    if not rows:
        return {}
    parsed, kept = sum(r["parsed"] for r in rows), sum(r["kept"] for r in rows)
    return {
        "generated_questions/kept_fraction": kept / parsed if parsed else 0.0,
        "generated_questions/mean_pairs": kept / len(rows),
        "generated_questions/contexts_without_pairs": float(sum(1 for r in rows if not r["kept"])),
    }


def edit_measures(rows: list[dict], measures: tuple[str, ...]) -> dict[str, float]:
    """Per-iteration means of the self-edits' measures (``self_edit/<measure>``), and of the
    kept ones' (``self_edit/kept_<measure>``): what RL changes in the self-edits it keeps."""
    metrics = {}
    for prefix, chosen in (("", rows), ("kept_", [r for r in rows if r["kept"]])):
        for measure in measures:
            if chosen:
                metrics[f"self_edit/{prefix}{measure}"] = sum(float(r[measure]) for r in chosen) / len(chosen)
    return metrics


def log_iteration_tables(tracker: Tracker, result: IterationResult) -> None:
    """The iteration's self-edits and, with generated rewards, the pairs written per context."""
    t = result.iteration
    tracker.log_table(result.rows, f"self_edits/iteration-{t}.json")
    if result.questions:
        tracker.log_table(result.questions, f"generated_questions/iteration-{t}.json")


def _log_held_out(tracker: Tracker, result: HeldOutResult, step: int) -> None:
    tracker.log_metrics(held_out_metrics(result), step=step)
    tracker.log_table(result.per_context, f"held_out/step-{step}.json")


@dataclass
class TrainingResult:
    policy: PolicyRef
    held_out: list[tuple[str, HeldOutResult]]
    iterations: list[IterationResult]
    run_id: str | None
    tracking_uri: str


def link_mlflow_run(tracker: Tracker, description: str) -> None:
    """A Prefect link artifact from the flow run to its MLflow run (the UI at $SEAL_MLFLOW_UI)."""
    create_link_artifact(
        link=f"{os.environ.get('SEAL_MLFLOW_UI', 'http://127.0.0.1:5000')}/#/experiments/"
        f"{tracker.experiment_id}/runs/{tracker.run_id}",
        link_text=f"MLflow run {tracker.run_id}",
        key="mlflow-run",
        description=description,
    )


# No log_prints: it patches print(), which breaks libraries that capture their own stdout
# (dill's global-variable detection, used by datasets' fingerprints, then floods the log).
@flow(name="seal-training")
def seal_training(config: SealConfig) -> TrainingResult:
    """Train a policy to write better self-edits (ReST-EM); see the module docstring."""
    tracking_uri = default_tracking_uri(seal_home())
    # A retried or rerun flow continues its MLflow run rather than starting a second one.
    tracker = flow_run_tracker(
        tracking_uri,
        config.tracking,
        config.model.name,
        config.digest(),
        str(flow_run.id),
        flow_run.name or "seal-training",
    )
    if tracker.resumed:
        get_run_logger().info("continuing MLflow run %s", tracker.run_id)
    link_mlflow_run(tracker, "The MLflow run that tracks this training flow run.")
    with finishing(tracker), ray_cluster(config.runner):
        result = _train(config, tracker)
    return TrainingResult(result.policy, result.held_out, result.iterations, tracker.run_id, tracking_uri)


def _train(config: SealConfig, tracker: Tracker) -> TrainingResult:
    tracker.log_params(config.flat())
    domain = domain_for(config)
    base = verified_policy(with_storage(resolve_base_policy, config.runner), config.model)
    policy = base
    held_out = [("base", domain.evaluate_policy(config, base, base))]
    _log_held_out(tracker, held_out[-1][1], step=0)
    get_run_logger().info("%s\n%s", domain.held_out_title, format_held_out(held_out))
    best_score = -1.0  # "best" points at the best evaluated registered version
    version = None  # the registry version of the current policy (None: the base model)
    iterations = []
    for t in range(1, config.rl.iterations + 1):
        result = on_runner(run_iteration, config.runner)(config, policy, t)
        iterations.append(result)
        tracker.log_metrics(result.metrics, step=t)
        log_iteration_tables(tracker, result)
        if config.tracking.log_adapters:
            for row in result.rows:
                if row["adapter"]:
                    tracker.log_artifacts(
                        Path(row["adapter"]), f"adapters/iteration-{t}/{row['context_id']}/edit{row['self_edit']}"
                    )
        create_table_artifact(
            key=f"self-edits-iteration-{t}",
            table=[{k: v for k, v in row.items() if k != "text"} | {"text": row["text"][:200]} for row in result.rows],
            description=f"Self-edits and rewards of iteration {t}",
        )
        new_policy = result.policy
        if new_policy.digest != policy.digest:
            version = tracker.register_policy(
                Path(new_policy.path),
                aliases=["latest"],
                description=f"SEAL policy after iteration {t}",
                digest=new_policy.digest,
            )
        policy = new_policy
        last = t == config.rl.iterations
        if last or (config.rl.eval_every and t % config.rl.eval_every == 0):
            held_out.append((policy.name, domain.evaluate_policy(config, policy, base)))
            _log_held_out(tracker, held_out[-1][1], step=t)
            get_run_logger().info("%s\n%s", domain.held_out_title, format_held_out(held_out))
            score = held_out[-1][1].accuracy(domain.policy_column)
            if version is not None and score > best_score:
                tracker.set_alias(version, "best")
                best_score = score
    tracker.log_figure(curves(iterations, held_out), "curves.png")
    return TrainingResult(policy, held_out, iterations, tracker.run_id, "")


def curves(iterations: list[IterationResult], held_out: list[tuple[str, HeldOutResult]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot([r.iteration for r in iterations], [r.metrics["reward_mean"] for r in iterations], marker="o")
    left.set(title="mean reward per iteration", xlabel="iteration", ylabel="reward")
    steps = range(len(held_out))
    for offset, column in enumerate(held_out[0][1].correct):
        values = [r.accuracy(column) for _, r in held_out]
        estimates = [r.interval(column) for _, r in held_out]
        errors = [[v - e.low for v, e in zip(values, estimates)], [e.high - v for v, e in zip(values, estimates)]]
        # Columns side by side at each evaluation, so their error bars do not hide each other.
        right.errorbar(
            [x + 0.06 * (offset - 1.5) for x in steps],
            values,
            yerr=errors,
            marker="o",
            capsize=3,
            label=column.replace("_", " "),
        )
    right.set(
        title="held-out accuracy (95 % intervals)",
        xlabel="evaluation",
        ylabel="accuracy",
        xticks=list(steps),
        xticklabels=[label for label, _ in held_out],
    )
    right.legend(fontsize=7)
    figure.tight_layout()
    return figure
