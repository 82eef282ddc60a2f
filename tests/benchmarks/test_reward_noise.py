"""benchmarks/reward_noise.py: how much of a one-seed reward is the self-edit's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not an installed package

from benchmarks import reward_noise  # noqa: E402

TINY = ROOT / "deployments" / "configs" / "knowledge-tiny.yaml"


def scores(edit_effect: float, seed_noise: float, contexts: int = 200, edits: int = 4, seeds: int = 4):
    """Correct answers out of 10 per (context, self-edit, seed): a self-edit's own quality plus
    seed noise."""
    rng = np.random.default_rng(0)
    quality = rng.normal(5, edit_effect, size=(contexts, edits, 1))
    return np.clip(quality + rng.normal(0, seed_noise, size=(contexts, edits, seeds)), 0, 10), np.full(contexts, 10)


def test_reliability_is_the_self_edits_share_of_the_variance():
    for effect, noise, expected in ((1.0, 0.0, 1.0), (1.0, 1.0, 0.5), (0.0, 1.0, 0.0)):
        correct, totals = scores(effect, noise)
        assert reward_noise.reliability(correct / 10) == pytest.approx(expected, abs=0.06)
    assert reward_noise.spearman_brown(0.5, 3) == pytest.approx(0.75)


def test_a_pick_on_noise_looks_better_than_it_is():
    # Pure seed noise: the seed a self-edit was picked on flatters it; the other seeds do not.
    correct, totals = scores(0.0, 1.0)
    f1 = np.zeros_like(correct)
    apparent = reward_noise.selection_advantage(correct, f1, totals, select_on=1, honest=False)
    honest = reward_noise.selection_advantage(correct, f1, totals, select_on=1)
    gain = [sum(p for p, _ in picked) - sum(a for a, _ in average) for picked, average in (apparent, honest)]
    assert gain[0] / correct.shape[0] > 0.5 and abs(gain[1] / correct.shape[0]) < 0.15
    # No noise: what the pick sees is what it gets, on any seeds.
    correct, totals = scores(1.0, 0.0)
    picked, average = reward_noise.selection_advantage(correct, f1, totals, select_on=3)
    assert sum(p for p, _ in picked) > sum(a for a, _ in average)
    same = reward_noise.selection_advantage(correct, f1, totals, select_on=3, honest=False)[0]
    assert [p for p, _ in picked] == pytest.approx([p for p, _ in same])


def test_ties_on_accuracy_go_to_f1_then_the_first():
    accuracy = np.array([[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]])
    assert reward_noise.pick(accuracy, np.array([[0.1, 0.1], [0.3, 0.1], [0.0, 0.0]]), [0, 1]) == 1
    assert reward_noise.pick(accuracy, np.zeros((3, 2)), [0, 1]) == 0
    assert reward_noise.pick(accuracy, np.zeros((3, 2)), [1]) == 2


def test_script_scores_the_flows_first_iteration_under_each_seed(seal_home, tmp_path):
    from flows.training import train_contexts
    from models.config import load_config

    out = tmp_path / "noise.json"
    assert reward_noise.main(["--config", str(TINY), "--seeds", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    config = load_config(TINY)
    expected = [c.id for c in train_contexts(config, 1, [])]
    assert [c["context_id"] for c in report["per_context"]] == expected  # the flow's iteration-1 draw
    for context in report["per_context"]:
        assert np.array(context["correct"]).shape == (config.self_edit.num_samples, 2)
    assert set(report["advantage"]) == {"apparent_one_seed", "one_seed", "all_seeds_but_one"}
    with pytest.raises(SystemExit):
        reward_noise.main(["--config", str(TINY), "--seeds", "1"])
