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
    # The paired differences reported, (SEAL's column, the one it is compared with); the first is
    # the headline (``held_out/difference``).
    comparisons: tuple[tuple[str, str], ...]
    per_context: list[dict] = field(default_factory=list)

    @property
    def comparison(self) -> tuple[str, str]:
        return self.comparisons[0]

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

    def difference(self, comparison: tuple[str, str] | None = None) -> Estimate:
        """One column minus another on the same contexts, with its 95 % interval (default: the
        headline comparison)."""
        first, second = comparison or self.comparison
        return paired_difference(self.counts[first], self.counts[second])


def format_held_out(results: list[tuple[str, HeldOutResult]]) -> str:
    """The held-out table: one row per evaluation, correct/total per column with its 95 %
    interval (a bootstrap over contexts), then the paired differences the domain reports."""
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
    for comparison in results[0][1].comparisons:
        first, second = (c.replace("_", " ") for c in comparison)
        for label, result in results:
            difference = result.difference(comparison)
            if result.counts[comparison[0]] == result.counts[comparison[1]]:
                note = " (the same on every context)"  # e.g. before any update, the policy is the base
            else:
                note = "" if difference.excludes_zero() else " (interval includes 0)"
            lines.append(
                f"{label}: {first} - {second} = {100 * difference.value:+.1f} points "
                f"[{100 * difference.low:+.1f}, {100 * difference.high:+.1f}]{note}"
            )
    return "\n".join(lines)


def held_out_metrics(result: HeldOutResult) -> dict[str, float]:
    """A held-out result as MLflow metrics: per column its accuracy, counts and interval, and each
    paired difference with its interval (``held_out/<first>-<second>``; the headline one also as
    ``held_out/difference``)."""
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
    for comparison in result.comparisons:
        difference = result.difference(comparison)
        names = ["-".join(comparison)] + (["difference"] if comparison == result.comparison else [])
        for name in names:
            metrics |= {
                f"held_out/{name}": difference.value,
                f"held_out/{name}_low": difference.low,
                f"held_out/{name}_high": difference.high,
            }
    return metrics
