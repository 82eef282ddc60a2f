"""The held-out table of a policy: what a domain's held-out flow returns, printed and logged.

Each domain's held-out flow (``flows/knowledge.py``: the paper's Table 2, ``flows/fewshot.py``:
Table 1) fills in a :class:`HeldOutResult`; the training, evaluation and nightly flows print it
(:func:`format_held_out`) and log it to MLflow (:func:`held_out_metrics`) the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.stats import Estimate, accuracy_interval, paired_difference
from tasks.records import PolicyRef


@dataclass
class HeldOutResult:
    """A held-out table. Everything it prints is derived from ``counts``: per column (in table
    order), per context, (correct, total), where correct may be a mean over self-edits and seeds."""

    policy: PolicyRef
    counts: dict[str, list[tuple[float, int]]]
    seconds: float
    comparison: tuple[str, str]  # the paired difference reported: (SEAL's column, the one it must beat)
    per_context: list[dict] = field(default_factory=list)

    @property
    def correct(self) -> dict[str, float]:
        return {column: sum(n for n, _ in counts) for column, counts in self.counts.items()}

    @property
    def total(self) -> int:
        """The contexts' targets: what the first column (no adaptation, in-context) counts."""
        return self.total_of(next(iter(self.counts)))

    def total_of(self, column: str) -> int:
        """The column's denominator (few-shot: the self-edit rows count self-edits, not tasks)."""
        return sum(t for _, t in self.counts[column])

    def accuracy(self, column: str) -> float:
        return self.correct[column] / self.total_of(column) if self.total_of(column) else 0.0

    def interval(self, column: str) -> Estimate:
        """The column's accuracy with a 95 % interval from a bootstrap over contexts."""
        return accuracy_interval(self.counts[column])

    def difference(self) -> Estimate:
        """``comparison[0]`` minus ``comparison[1]`` on the same contexts, with its 95 % interval."""
        return paired_difference(self.counts[self.comparison[0]], self.counts[self.comparison[1]])


def format_held_out(results: list[tuple[str, HeldOutResult]]) -> str:
    """The held-out table: one row per evaluation, correct/total per column with its 95 %
    interval (a bootstrap over contexts), then the paired difference the domain reports."""
    columns = list(results[0][1].correct)
    width = 26
    header = f"{'policy':<16}" + "".join(f"{c.replace('_', ' '):>{width}}" for c in columns)
    lines = [header, "-" * len(header)]
    for label, result in results:
        cells = ""
        for c in columns:
            estimate = result.interval(c)
            cell = (
                f"{result.correct[c]:g}/{result.total_of(c)} ({result.accuracy(c):.0%})"
                f" [{estimate.low:.0%},{estimate.high:.0%}]"
            )
            cells += f"{cell:>{width}}"
        lines.append(f"{label:<16}{cells}")
    lines.append("(95 % intervals: a bootstrap over held-out contexts)")
    for label, result in results:
        difference = result.difference()
        first, second = (c.replace("_", " ") for c in result.comparison)
        lines.append(
            f"{label}: {first} - {second} = {100 * difference.value:+.1f} points "
            f"[{100 * difference.low:+.1f}, {100 * difference.high:+.1f}]"
            + ("" if difference.excludes_zero() else " (interval includes 0)")
        )
    return "\n".join(lines)


def held_out_metrics(result: HeldOutResult) -> dict[str, float]:
    """A held-out result as MLflow metrics: per column its accuracy, counts and interval, and the
    paired difference (``held_out/difference``) with its interval."""
    metrics = {}
    for c, correct in result.correct.items():
        estimate = result.interval(c)
        metrics |= {
            f"held_out/{c}": result.accuracy(c),
            f"held_out/{c}_correct": correct,
            f"held_out/{c}_total": result.total_of(c),
            f"held_out/{c}_low": estimate.low,
            f"held_out/{c}_high": estimate.high,
        }
    difference = result.difference()
    return metrics | {
        "held_out/difference": difference.value,
        "held_out/difference_low": difference.low,
        "held_out/difference_high": difference.high,
    }
