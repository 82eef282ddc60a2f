"""Continual self-adaptation as a Prefect flow: self-edits merged one after another, and the
forgetting matrix they leave (SEAL §5; the reference code's ``continual_self_edits``).

    seal continual deployments/configs/continual-smollm2.yaml
    seal continual deployments/configs/continual-smollm2.yaml continual.training=passage_only
    seal continual deployments/configs/continual-smollm2.yaml continual.policy=models:/seal-policy@best

The experiment:

    for each of S sequences of K held-out passages:
        model_0 = continual.policy; score model_0 on every passage          (row 0)
        for k in 0..K-1:
            self_edit = sample from model_k for passage k                   (continual.training=self_edit)
            model_{k+1} = model_k + merged LoRA trained on self_edit + passage k
                          (+ continual.replay documents of the earlier steps)
            score model_{k+1} on passages 0..k                              (row k+1)
            drift_{k+1} = KL(model_0 || model_{k+1}) on fixed probe texts
    report the mean and std matrices over sequences, forgetting, backward transfer, the
    accuracy on a passage after d more merges, and how drift correlates with forgetting

Departures from the reference code, on purpose:
- The passages come from the held-out split (``data``), so a trained policy never saw them.
- A self-edit with no usable line trains on the passage alone, as the inner loop does; the
  reference code fell back to the passage as its own self-edit.
- Replay (``continual.replay``) and routed adapters (``continual.adapters=routed``: each step's
  LoRA trained on the starting model and kept apart, each question answered by the adapter under
  which it is most likely) are this project's mitigations, not the paper's; both off by default.

Each step is one cached task keyed by the incoming checkpoint's digest, the passage and the
self-edit (and the settings): a killed run resumes at the step it was in, a rerun recomputes
nothing. Merged checkpoints are full models, so a sequence deletes each one once the next step
has used it; a later run that needs a deleted one (a changed setting downstream of it) rebuilds
it from the step before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.evaluation import resolve_policy
from flows.progress import Progress
from flows.runner import SERIAL, on_runner, placement, ray_cluster, with_storage
from flows.tracking import Tracker, default_tracking_uri, finishing, flow_run_tracker
from flows.training import link_mlflow_run, verified_policy
from models.config import SealConfig
from models.continual import (
    ContinualSummary,
    accuracy_matrix,
    format_matrix,
    remove_checkpoint,
    summarize,
)
from models.errors import ModelNotFoundError
from models.paths import seal_home
from tasks import knowledge
from tasks.continual import ContinualStepRecord, checkpoint_root, continual_step
from tasks.policy import resolve_base_policy
from tasks.records import Context, EvalRecord, PolicyRef, SelfEditRecord, StaleArtifact, stable_seed


@dataclass
class SequenceResult:
    sequence: int
    contexts: list[Context]
    row0: list[EvalRecord]  # the unedited model on each passage
    edits: list[SelfEditRecord | None]
    steps: list[ContinualStepRecord]

    @property
    def matrix(self) -> np.ndarray:
        return accuracy_matrix(
            [s.accuracy for s in self.row0], [[s.accuracy for s in step.scores] for step in self.steps]
        )


@dataclass
class ContinualResult:
    start: PolicyRef
    sequences: list[SequenceResult]
    summary: ContinualSummary
    run_id: str | None
    tracking_uri: str


class _Sequence:
    """The steps of one sequence, each run (or found cached) in order, a missing checkpoint rebuilt."""

    def __init__(self, config: SealConfig, start: PolicyRef, sequence: int, contexts: list[Context]) -> None:
        self.config, self.start, self.sequence, self.contexts = config, start, sequence, contexts
        self.edits: list[SelfEditRecord | None] = []
        self.steps: list[ContinualStepRecord] = []

    @property
    def routed(self) -> bool:
        return self.config.continual.adapters == "routed"

    def before(self, k: int) -> PolicyRef:
        """The checkpoint step k starts from (and that writes its self-edit): routed adapters
        are all trained on the starting model."""
        return self.start if k == 0 or self.routed else self.steps[k - 1].checkpoint

    def label(self, k: int) -> str:
        return f"seq{self.sequence}-step{k}"

    def run(self, k: int, refresh: bool = False) -> tuple[SelfEditRecord | None, ContinualStepRecord]:
        """Step k: its self-edit, then its merge. A checkpoint it needs that was deleted (or
        altered) is rebuilt from the step before, then step k runs again."""
        try:
            return self._submit(k, refresh)
        except (StaleArtifact, ModelNotFoundError) as exc:
            # Sampling from a deleted checkpoint fails to find the model; any other failure to load is real.
            if k == 0 or (isinstance(exc, ModelNotFoundError) and Path(self.before(k).path).is_dir()):
                raise
            get_run_logger().warning("%s; rebuilding step %d's checkpoint", exc, k - 1)
            self.edits[k - 1], self.steps[k - 1] = self.run(k - 1, refresh=True)
            return self._submit(k, refresh)

    def _submit(self, k: int, refresh: bool) -> tuple[SelfEditRecord | None, ContinualStepRecord]:
        config, cont = self.config, self.config.continual
        policy, label = self.before(k), self.label(k)
        edit = None
        if cont.training == "self_edit":
            (edits,) = knowledge.sample_self_edits.submit(
                policy,
                config.model,
                [self.contexts[k]],
                config.self_edit,
                [stable_seed(config.seed, "continual", self.sequence, k)],
                1,
                label,
            ).result()
            edit = edits[0]
        step = continual_step.with_options(refresh_cache=True) if refresh else continual_step
        record = step.submit(
            policy,
            self.start,
            config.model,
            self.contexts[: k + 1],
            edit,
            [s.documents for s in self.steps[:k]],
            cont.replay,
            stable_seed(cont.seed, "replay", self.sequence, k),
            [s.checkpoint for s in self.steps[:k]] if self.routed else None,
            config.lora,
            config.inner_loop,
            config.eval,
            cont.probe_prompts,
            label,
        ).result()
        return edit, record


@flow(flow_run_name="sequence-{sequence}", task_runner=SERIAL)
def run_sequence(config: SealConfig, start: PolicyRef, sequence: int, keep_final: bool = False) -> SequenceResult:
    """One sequence: the unedited model's row, then K steps, each merged into the next."""
    with placement(config.runner):
        cont = config.continual
        contexts = knowledge.fetch_contexts(
            config.data, "validation", cont.passages, seed=stable_seed(cont.seed, "continual", sequence)
        )
        if len(contexts) < cont.passages:
            raise ValueError(
                f"continual.passages is {cont.passages} but the held-out split has only "
                f"{len(contexts)} passages; lower it or add data (data.num_passages)"
            )
        row0 = knowledge.evaluate_baselines.submit(
            start, config.model, contexts, config.eval, f"seq{sequence}-unedited"
        ).result()
        chain = _Sequence(config, start, sequence, contexts)
        root = checkpoint_root()
        progress = Progress(f"continual-sequence-{sequence}", {"steps": cont.passages})
        for k in range(cont.passages):
            edit, record = chain.run(k)
            chain.edits.append(edit)
            chain.steps.append(record)
            progress.advance("steps")
            if k > 0 and not chain.routed:  # step k has used checkpoint k-1; no later step needs it
                remove_checkpoint(chain.steps[k - 1].checkpoint.path, root)
        # Also any earlier checkpoint a rebuild brought back; routed adapters are all the final model.
        kept = (len(chain.steps) if chain.routed else 1) if keep_final else 0
        for step in chain.steps[: len(chain.steps) - kept]:
            remove_checkpoint(step.checkpoint.path, root)
        progress.close()
        return SequenceResult(sequence, contexts, row0, chain.edits, chain.steps)


@flow(name="seal-continual")
def seal_continual(config: SealConfig, keep_final: bool = False) -> ContinualResult:
    """Continual self-adaptation and its forgetting matrix; see the module docstring.

    ``keep_final`` keeps each sequence's last merged checkpoint (otherwise deleted with the others).
    """
    if config.domain != "knowledge":
        raise ValueError(
            f"seal continual runs the knowledge domain (passages and questions); the config's domain "
            f"is {config.domain!r}: use domain=knowledge"
        )
    tracking_uri = default_tracking_uri(seal_home())
    digest = f"continual-{config.digest()}"  # never continues a training run of the same config
    tracker = flow_run_tracker(
        tracking_uri,
        config.tracking,
        config.model.name,
        digest,
        str(flow_run.id),
        flow_run.name or "seal-continual",
        **{"seal.flow": "continual", "seal.continual.policy": config.continual.policy},
    )
    link_mlflow_run(tracker, "The MLflow run of this continual flow run: matrices, heatmap, curves, drift.")
    with finishing(tracker), ray_cluster(config.runner):
        result = _continual(config, tracker, keep_final)
    return ContinualResult(result.start, result.sequences, result.summary, tracker.run_id, tracking_uri)


def _continual(config: SealConfig, tracker: Tracker, keep_final: bool) -> ContinualResult:
    tracker.log_params(config.flat())
    base = verified_policy(with_storage(resolve_base_policy, config.runner), config.model)
    start = resolve_policy(config.continual.policy, base)
    sequences = []
    for s in range(config.continual.sequences):
        result = on_runner(run_sequence, config.runner)(config, start, s, keep_final)
        sequences.append(result)
        for k, step in enumerate(result.steps):
            tracker.log_metrics(
                {
                    f"sequence_{s}/kl": step.kl,
                    f"sequence_{s}/newest_accuracy": step.scores[-1].accuracy,
                    f"sequence_{s}/mean_accuracy": float(np.mean([x.accuracy for x in step.scores])),
                    **({} if step.routed is None else {f"sequence_{s}/routed_to_own_adapter": step.routed}),
                },
                step=k + 1,
            )
    summary = summarize([r.matrix for r in sequences], [[step.kl for step in r.steps] for r in sequences])
    routed = [step.routed for r in sequences for step in r.steps if step.routed is not None]
    if routed:
        summary.metrics["routed_to_own_adapter"] = float(np.mean(routed))
    _report(tracker, sequences, summary)
    return ContinualResult(start, sequences, summary, tracker.run_id, "")


def _report(tracker: Tracker, sequences: list[SequenceResult], summary: ContinualSummary) -> None:
    """The matrix, curves and measures to MLflow, and the matrix as Prefect artifacts."""
    kls = np.array([[step.kl for step in r.steps] for r in sequences])  # (S, K)
    for k, kl in enumerate(kls.mean(0)):
        tracker.log_metrics({"continual/kl": float(kl)}, step=k + 1)
    for d, accuracy in enumerate(summary.lag):
        tracker.log_metrics({"continual/accuracy_after_more_merges": accuracy}, step=d)
    metrics = {f"continual/{name}": value for name, value in summary.metrics.items()}
    if summary.kl_forgetting_correlation is not None:
        metrics["continual/kl_forgetting_correlation"] = summary.kl_forgetting_correlation
    tracker.log_metrics(metrics, step=0)
    tracker.log_text(
        json.dumps(
            {
                **summary.as_json(),
                "per_sequence": [
                    {
                        "sequence": r.sequence,
                        "contexts": [c.id for c in r.contexts],
                        "matrix": [[None if np.isnan(v) else float(v) for v in row] for row in r.matrix],
                        "kl": [step.kl for step in r.steps],
                    }
                    for r in sequences
                ],
            },
            indent=1,
        ),
        "continual/matrix.json",
    )
    tracker.log_table(
        [
            {
                "sequence": r.sequence,
                "step": k,
                "context_id": r.contexts[k].id,
                "kl": step.kl,
                "accuracies": [s.accuracy for s in step.scores],
                "documents": len(step.documents),
                "replayed": step.replayed,
                "routed_to_own_adapter": step.routed,
                "train_steps": step.steps,
                "mean_loss": step.mean_loss,
                "train_seconds": step.seconds,
                "self_edit": edit.text if edit else None,
            }
            for r in sequences
            for k, (edit, step) in enumerate(zip(r.edits, r.steps))
        ],
        "continual/steps.json",
    )
    tracker.log_figure(figures(summary), "continual/forgetting.png")
    passages = summary.mean.shape[1]
    create_table_artifact(
        key="continual-matrix",
        table=[
            {
                "merges": r,
                **{
                    f"p{j}": (
                        "" if np.isnan(summary.mean[r, j]) else f"{summary.mean[r, j]:.2f} ± {summary.std[r, j]:.2f}"
                    )
                    for j in range(passages)
                },
            }
            for r in range(passages + 1)
        ],
        description=f"Accuracy on passage j (column) after r merges (row), mean ± std over {len(sequences)} "
        "sequence(s); row 0 is the model before any merge.",
    )
    create_table_artifact(
        key="continual-forgetting-curve",
        table=[{"more_merges": d, "accuracy": round(a, 4)} for d, a in enumerate(summary.lag)],
        description="Accuracy on a passage after d more merges than its own (d = 0: right after it), mean over "
        "passages and sequences.",
    )
    create_markdown_artifact(
        key="continual-summary",
        markdown=format_summary(summary, len(sequences), markdown=True),
        description="Continual self-adaptation: forgetting, transfer and drift",
    )
    get_run_logger().info("\n%s", format_summary(summary, len(sequences)))


def format_summary(summary: ContinualSummary, sequences: int, markdown: bool = False) -> str:
    """The mean ± std matrix and the measures, as text (``markdown``: fenced as code, for an artifact)."""
    m = summary.metrics
    correlation = summary.kl_forgetting_correlation
    fence = ["```"] if markdown else []
    lines = [
        f"accuracy on passage j (column) after r merges (row), mean ± std over {sequences} sequence(s):",
        *fence,
        format_matrix(summary.mean, summary.std),
        f"newest passage (right after its merge): {m['newest_accuracy']:.3f} ± {m['newest_accuracy_std']:.3f}",
        f"forgetting (after own merge -> end):    {m['forgetting']:.3f} ± {m['forgetting_std']:.3f}",
        f"forgetting from best:                   {m['forgetting_max']:.3f} ± {m['forgetting_max_std']:.3f}",
        f"backward transfer (GEM):                {m['backward_transfer']:+.3f}",
        f"end minus unedited:                     {m['gain_over_base']:+.3f} ± {m['gain_over_base_std']:.3f}",
        f"after d more merges (d = 0..K-1):       {' '.join(f'{a:.2f}' for a in summary.lag)}",
        f"probe KL after the last merge:          {m['kl_final']:.4f}",
        "correlation of KL with forgetting:      " + ("undefined" if correlation is None else f"{correlation:+.2f}"),
        *(
            [f"questions routed to their own adapter: {m['routed_to_own_adapter']:.3f}"]
            if "routed_to_own_adapter" in m
            else []
        ),
        *fence,
    ]
    return "\n".join(lines)


def figures(summary: ContinualSummary):
    """The mean matrix as a heatmap, and the accuracy on a passage after d more merges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    image = left.imshow(np.ma.masked_invalid(summary.mean), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    left.set(title="accuracy after r merges (mean over sequences)", xlabel="passage j", ylabel="merges r")
    figure.colorbar(image, ax=left)
    passages = summary.mean.shape[1]
    for r in range(passages + 1):
        for j in range(passages):
            if not np.isnan(summary.mean[r, j]):
                left.text(j, r, f"{summary.mean[r, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    right.plot(range(passages), summary.lag, marker="o")
    right.set(title="accuracy on a passage after d more merges", xlabel="d", ylabel="accuracy", ylim=(0, 1))
    figure.tight_layout()
    return figure
