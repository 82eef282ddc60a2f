"""Intervals for held-out scores whose questions come in correlated groups (one context each).

The questions of one passage (or the self-edits of one ARC task) succeed or fail together: an
adapter that learned the passage answers several of them. A binomial interval over questions
would be too narrow, so the unit resampled here is the context (a cluster bootstrap): each
replicate draws contexts with replacement and recomputes the pooled accuracy. A paired
difference between two columns resamples the same contexts for both, so what the contexts
share cancels out.

    >>> interval = accuracy_interval([(2, 5), (0, 4), (5, 5)])
    >>> difference = paired_difference([(2, 5), (0, 4)], [(1, 5), (0, 4)])

How much of one gain another recovers (:func:`gain_recovery`: a policy trained on generated
questions against one trained on real ones) is a ratio of two paired differences, resampled the
same way; it means something only where the reference gain's own interval excludes 0. Whether
a gain reaches a share of another (:func:`recovery_margin`, gain - share x reference) is a
difference instead, with an interval that stays finite when the reference gain is near 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Counts = Sequence[tuple[float, float]]  # per context: (correct, total); correct may be a seed mean

REPLICATES = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A pooled accuracy (or a difference of two) with its percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.value:.1%} [{self.low:.1%}, {self.high:.1%}]"


def accuracy_interval(counts: Counts, replicates: int = REPLICATES, seed: int = 0) -> Estimate:
    """Pooled accuracy ``sum(correct) / sum(total)`` with a 95 % cluster-bootstrap interval.

    Args:
        counts: per context, (correct, total); ``correct`` may be fractional (a mean over seeds).
        replicates: bootstrap replicates (fixed ``seed``: the same counts give the same interval).

    Returns:
        The estimate; with no questions, 0 with the interval [0, 1].
    """
    correct, total = _arrays(counts)
    if total.sum() == 0:
        return Estimate(0.0, 0.0, 1.0)
    picks = _picks(len(total), replicates, seed)
    return _estimate(correct.sum() / total.sum(), _ratio(correct, total, picks))


def paired_difference(first: Counts, second: Counts, replicates: int = REPLICATES, seed: int = 0) -> Estimate:
    """Accuracy of ``first`` minus that of ``second`` on the same contexts (in the same order),
    with a 95 % cluster-bootstrap interval that resamples contexts for both at once.

    Raises:
        ValueError: if the two columns do not cover the same number of contexts.
    """
    if len(first) != len(second):
        raise ValueError(f"a paired difference needs the same contexts: {len(first)} against {len(second)}")
    a, na = _arrays(first)
    b, nb = _arrays(second)
    if na.sum() == 0 or nb.sum() == 0:
        return Estimate(0.0, -1.0, 1.0)
    picks = _picks(len(na), replicates, seed)
    value = a.sum() / na.sum() - b.sum() / nb.sum()
    return _estimate(value, _ratio(a, na, picks) - _ratio(b, nb, picks))


def gain_recovery(
    gain: tuple[Counts, Counts], reference: tuple[Counts, Counts], replicates: int = REPLICATES, seed: int = 0
) -> Estimate:
    """The share of ``reference``'s gain that ``gain`` recovers, each gain a paired difference
    (first column minus second) on the same contexts, with a 95 % cluster-bootstrap interval
    that resamples the contexts for all four columns at once.

    Replicates whose reference gain is 0 have no ratio and are left out of the interval.

    Raises:
        ValueError: if the four columns do not cover the same number of contexts, or the
            reference gain is not above 0 (nothing to recover: a share of a loss means nothing).
    """
    (gained, referenced), (numerator, denominator) = _two_gains(gain, reference, replicates, seed)
    if referenced <= 0:
        raise ValueError(
            f"the reference gain is {referenced * 100:+.1f} points, not above 0: there is nothing to recover"
        )
    defined = denominator != 0
    return _estimate(gained / referenced, numerator[defined] / denominator[defined])


def recovery_margin(
    gain: tuple[Counts, Counts],
    reference: tuple[Counts, Counts],
    share: float,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> Estimate:
    """``gain`` minus ``share`` times ``reference``'s gain (accuracy, as :func:`paired_difference`),
    both paired differences on the same contexts, with a 95 % cluster-bootstrap interval that
    resamples the contexts for all four columns at once.

    A low end above 0 says the gain reaches ``share`` of the reference gain; a high end below 0
    says it falls short. Unlike :func:`gain_recovery` it is defined whatever the reference gain,
    but "a share of it" means something only where that gain is above 0.

    Raises:
        ValueError: if the four columns do not cover the same number of contexts.
    """
    (gained, referenced), (numerator, denominator) = _two_gains(gain, reference, replicates, seed)
    return _estimate(gained - share * referenced, numerator - share * denominator)


def _two_gains(
    gain: tuple[Counts, Counts], reference: tuple[Counts, Counts], replicates: int, seed: int
) -> tuple[tuple[float, float], tuple[np.ndarray, np.ndarray]]:
    """Both gains pooled, and per bootstrap replicate (the same contexts drawn for all four)."""
    columns = [*gain, *reference]
    if len({len(c) for c in columns}) != 1:
        raise ValueError(f"a recovery needs the same contexts in every column: {[len(c) for c in columns]}")
    arrays = [_arrays(c) for c in columns]
    pooled = [a.sum() / n.sum() if n.sum() else 0.0 for a, n in arrays]
    picks = _picks(len(columns[0]), replicates, seed)
    resampled = [_ratio(a, n, picks) for a, n in arrays]
    return (pooled[0] - pooled[1], pooled[2] - pooled[3]), (resampled[0] - resampled[1], resampled[2] - resampled[3])


def _arrays(counts: Counts) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(counts, dtype=np.float64).reshape(-1, 2)
    return array[:, 0], array[:, 1]


def _picks(contexts: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, contexts) indices of contexts drawn with replacement."""
    return np.random.default_rng(seed).integers(0, contexts, size=(replicates, contexts))


def _ratio(correct: np.ndarray, total: np.ndarray, picks: np.ndarray) -> np.ndarray:
    totals = total[picks].sum(1)
    # A replicate that drew only contexts without questions has no accuracy: count it as 0.
    return np.divide(correct[picks].sum(1), totals, out=np.zeros(len(picks)), where=totals > 0)


def _estimate(value: float, replicates: np.ndarray) -> Estimate:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Estimate(float(value), float(low), float(high))
