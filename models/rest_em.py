"""ReST-EM's E-step bookkeeping: rewards for self-edits and which ones the M-step keeps.

Reward (paper, Eq. 2) is binary: 1 if adapting with the self-edit beats the policy's
no-adaptation score on the context's questions. The baseline may instead be an adapter trained
on the passage alone (the self-edit must add to it), and the reward graded: the accuracy gain.
Knowledge incorporation keeps, per context, the single best self-edit, and only if it beats the
baseline (the reference code forgot that check). Ties on accuracy are broken by mean token F1,
then by sample index, and recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Outcome = Literal["kept", "none-beat-baseline", "no-valid-self-edit"]


@dataclass(frozen=True)
class Candidate:
    """One self-edit's score on its context (``failure`` set when it could not be scored)."""

    index: int
    accuracy: float
    f1: float
    failure: str | None = None


RewardKind = Literal["binary", "graded"]


@dataclass(frozen=True)
class Selection:
    rewards: tuple[float, ...]  # per candidate, in index order
    kept: int | None  # index of the kept self-edit
    outcome: Outcome
    tie: bool  # several candidates shared the best accuracy


def compute_reward(baseline_accuracy: float, candidate: Candidate, kind: RewardKind = "binary") -> float:
    """``binary``: 1 if the adapted model answered more of the questions than the baseline, else 0.
    ``graded``: its accuracy minus the baseline's (negative when below). A failed candidate gets 0."""
    if candidate.failure is not None:
        return 0.0
    if kind == "graded":
        return candidate.accuracy - baseline_accuracy
    return float(candidate.accuracy > baseline_accuracy)


def select_self_edits(baseline_accuracy: float, candidates: list[Candidate], kind: RewardKind = "binary") -> Selection:
    """Rewards for a context's K self-edits and the one the policy update will imitate.

    Args:
        baseline_accuracy: the baseline's closed-book accuracy: the current policy with no
            adaptation, or adapted on the passage alone (``reward.baseline``).
        candidates: the context's scored self-edits (failed ones carry ``failure``).
        kind: ``binary`` or ``graded`` rewards (see :func:`compute_reward`); the kept self-edit is
            the same for both.

    Returns:
        Rewards, the kept index (None when no self-edit beat the baseline) and why.
    """
    rewards = tuple(compute_reward(baseline_accuracy, c, kind) for c in candidates)
    valid = [c for c in candidates if c.failure is None]
    if not valid:
        return Selection(rewards, None, "no-valid-self-edit", tie=False)
    best_accuracy = max(c.accuracy for c in valid)
    best = [c for c in valid if c.accuracy == best_accuracy]
    tie = len(best) > 1
    if best_accuracy <= baseline_accuracy:
        return Selection(rewards, None, "none-beat-baseline", tie=tie)
    winner = min(best, key=lambda c: (-c.f1, c.index))
    return Selection(rewards, winner.index, "kept", tie=tie)


@dataclass(frozen=True)
class SolvedSelection:
    rewards: tuple[int, ...]  # per candidate, in index order
    kept: tuple[int, ...]  # every rewarded candidate
    outcome: Literal["kept", "none-solved", "no-valid-self-edit"]


def select_solving_self_edits(solved: list[bool], failures: list[str | None]) -> SolvedSelection:
    """Few-shot rewards (SEAL §4.1): 1 for each self-edit whose adapted model solved the task
    exactly, and every such self-edit is kept (ARC has no partial "better than baseline").

    Args:
        solved: per self-edit, whether every test output was predicted exactly.
        failures: per self-edit, why it could not be applied (None when it was).
    """
    rewards = tuple(int(ok and failure is None) for ok, failure in zip(solved, failures))
    kept = tuple(i for i, r in enumerate(rewards) if r)
    if kept:
        return SolvedSelection(rewards, kept, "kept")
    if all(failures):
        return SolvedSelection(rewards, kept, "no-valid-self-edit")
    return SolvedSelection(rewards, kept, "none-solved")
