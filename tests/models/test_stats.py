"""Cluster-bootstrap intervals over contexts: what the held-out tables report."""

import pytest

from models.stats import accuracy_interval, gain_recovery, paired_difference, recovery_margin


def test_the_interval_holds_the_pooled_accuracy_and_is_reproducible():
    counts = [(2, 5), (0, 4), (5, 5), (1, 5), (3, 5)]
    estimate = accuracy_interval(counts)
    assert estimate.value == pytest.approx(11 / 24)
    assert estimate.low < estimate.value < estimate.high
    assert accuracy_interval(counts) == estimate  # a fixed seed: the same table prints the same


def test_correlated_questions_widen_the_interval():
    # The same 10/20 correct, as 2 contexts all-or-nothing or as 2 contexts half right each time:
    # the clustered one knows less.
    clustered = accuracy_interval([(10, 10), (0, 10)] * 5)
    spread = accuracy_interval([(5, 10), (5, 10)] * 5)
    assert clustered.value == spread.value == 0.5
    assert clustered.high - clustered.low > spread.high - spread.low == 0.0


CASES = [
    # name, first, second, value, excludes zero
    ("always one more", [(3, 5), (2, 5), (4, 5), (1, 5)] * 3, [(2, 5), (1, 5), (3, 5), (0, 5)] * 3, 0.2, True),
    ("no difference", [(3, 5), (1, 5)] * 4, [(3, 5), (1, 5)] * 4, 0.0, False),
    ("mixed", [(3, 5), (0, 5), (2, 5), (1, 5)], [(2, 5), (1, 5), (2, 5), (1, 5)], 0.0, False),
    ("always less", [(0, 4), (1, 4)] * 5, [(2, 4), (3, 4)] * 5, -0.5, True),
]


@pytest.mark.parametrize("name, first, second, value, excludes_zero", CASES, ids=[c[0] for c in CASES])
def test_paired_difference(name, first, second, value, excludes_zero):
    difference = paired_difference(first, second)
    assert difference.value == pytest.approx(value)
    assert difference.low <= difference.value <= difference.high
    assert difference.excludes_zero() == excludes_zero


def test_fractional_counts_and_empty_columns():
    assert accuracy_interval([(1.5, 5), (2.5, 5)]).value == pytest.approx(0.4)  # means over seeds
    assert (accuracy_interval([]).low, accuracy_interval([]).high) == (0.0, 1.0)
    with pytest.raises(ValueError, match="same contexts"):
        paired_difference([(1, 2)], [(1, 2), (0, 2)])


def test_gain_recovery_is_the_ratio_of_two_paired_gains():
    base = [(1, 5), (2, 5), (0, 5), (1, 5)] * 3
    real = [(3, 5), (4, 5), (2, 5), (3, 5)] * 3  # 2 more per context than the base: +40 points
    half = [(2, 5), (3, 5), (1, 5), (2, 5)] * 3  # 1 more everywhere: half the gain, in every resample
    recovery = gain_recovery((half, base), (real, base))
    assert recovery.value == pytest.approx(0.5) and recovery.low == pytest.approx(0.5) == recovery.high
    noisy = [(3, 5), (2, 5), (1, 5), (2, 5)] * 3  # +2, 0, +1, +1: half the gain on average, varying
    estimate = gain_recovery((noisy, base), (real, base))
    assert estimate.value == pytest.approx(0.5) and estimate.low < 0.5 < estimate.high
    with pytest.raises(ValueError, match="nothing to recover"):
        gain_recovery((real, base), (base, base))
    with pytest.raises(ValueError, match="-40.0 points, not above 0"):  # a loss has no share to recover
        gain_recovery((real, base), (base, real))
    with pytest.raises(ValueError, match="same contexts"):
        gain_recovery((real, base), (real[:-1], base[:-1]))


def test_recovery_margin_is_the_gain_less_a_share_of_the_reference_gain():
    base = [(1, 5), (2, 5), (0, 5), (1, 5)] * 3
    real = [(3, 5), (4, 5), (2, 5), (3, 5)] * 3  # +40 points everywhere
    half = [(2, 5), (3, 5), (1, 5), (2, 5)] * 3  # +20 points everywhere
    margin = recovery_margin((half, base), (real, base), share=0.8)
    assert margin.value == pytest.approx(0.2 - 0.8 * 0.4) and margin.high < 0  # falls short, surely
    assert recovery_margin((real, base), (half, base), share=0.8).low > 0  # more than the reference
    # A reference gain of about 0, where a ratio's interval runs through infinity: finite here.
    mixed = [(2, 5), (1, 5), (1, 5), (1, 5)] * 3  # +1, -1, +1, 0: +1 on average
    near_zero = recovery_margin((half, base), (mixed, base), share=0.8)
    assert near_zero.low < near_zero.value < near_zero.high and near_zero.high - near_zero.low < 1
    with pytest.raises(ValueError, match="same contexts"):
        recovery_margin((real, base), (real[:-1], base[:-1]), share=0.8)
