"""The held-out table's paired differences, printed and logged (flows/held_out.py)."""

from __future__ import annotations

import pytest

from flows.held_out import HeldOutResult, format_held_out, held_out_metrics
from flows.knowledge import HELD_OUT_COMPARISONS


def table() -> HeldOutResult:
    # 4 contexts of 5 questions: policy self-edits answer 3, base self-edits 1 or 2, the passage 2.
    columns = {
        "no_adaptation": [0, 0, 0, 0],
        "passage_only": [2, 2, 2, 2],
        "base_self_edits": [1, 2, 1, 2],
        "policy_self_edits": [3, 3, 3, 3],
    }
    counts = {c: [(n, 5) for n in correct] for c, correct in columns.items()}
    return HeldOutResult(None, counts, 0.0, HELD_OUT_COMPARISONS)


def test_every_comparison_is_printed_per_evaluation_headline_first():
    lines = format_held_out([("base", table()), ("iteration-1", table())]).splitlines()
    differences = [line for line in lines if " points " in line]
    assert differences == [
        "base: policy self edits - passage only = +20.0 points [+20.0, +20.0]",
        "iteration-1: policy self edits - passage only = +20.0 points [+20.0, +20.0]",
        "base: policy self edits - base self edits = +30.0 points [+20.0, +40.0]",
        "iteration-1: policy self edits - base self edits = +30.0 points [+20.0, +40.0]",
    ]


def test_columns_equal_on_every_context_are_said_to_be_so():
    same = table()
    same.counts["policy_self_edits"] = list(same.counts["base_self_edits"])
    lines = format_held_out([("base", same), ("iteration-1", table())]).splitlines()
    assert "base: policy self edits - base self edits = +0.0 points [+0.0, +0.0] (the same on every context)" in lines
    assert "iteration-1: policy self edits - base self edits = +30.0 points [+20.0, +40.0]" in lines


def test_every_comparison_is_logged_and_the_headline_keeps_its_name():
    metrics = held_out_metrics(table())
    assert metrics["held_out/difference"] == metrics["held_out/policy_self_edits-passage_only"] == pytest.approx(0.2)
    low, gain, high = (metrics[f"held_out/policy_self_edits-base_self_edits{end}"] for end in ("_low", "", "_high"))
    assert gain == pytest.approx(0.3) and low < gain < high
    assert metrics["held_out/difference_low"] == metrics["held_out/policy_self_edits-passage_only_low"]
