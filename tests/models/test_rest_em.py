import pytest

from models.rest_em import Candidate, compute_reward, select_self_edits

C = Candidate

CASES = [
    # name, baseline, candidates, rewards, kept, outcome, tie
    ("best beats baseline", 0.2, [C(0, 0.4, 0.5), C(1, 0.6, 0.7), C(2, 0.2, 0.3)], (1, 1, 0), 1, "kept", False),
    ("none beats baseline", 0.6, [C(0, 0.4, 0.5), C(1, 0.6, 0.9)], (0, 0), None, "none-beat-baseline", False),
    ("equal to baseline is no reward", 0.5, [C(0, 0.5, 0.9)], (0,), None, "none-beat-baseline", False),
    ("tie broken by f1", 0.0, [C(0, 0.5, 0.4), C(1, 0.5, 0.6)], (1, 1), 1, "kept", True),
    ("tie on f1 broken by index", 0.0, [C(0, 0.5, 0.6), C(1, 0.5, 0.6)], (1, 1), 0, "kept", True),
    ("failed ones earn nothing", 0.0, [C(0, 0.0, 0.0, "empty self-edit"), C(1, 0.2, 0.3)], (0, 1), 1, "kept", False),
    (
        "all failed",
        0.0,
        [C(0, 0.0, 0.0, "non-finite loss"), C(1, 0.0, 0.0, "empty")],
        (0, 0),
        None,
        "no-valid-self-edit",
        False,
    ),
    ("no candidates", 0.0, [], (), None, "no-valid-self-edit", False),
    ("tie below baseline recorded", 0.8, [C(0, 0.4, 0.1), C(1, 0.4, 0.2)], (0, 0), None, "none-beat-baseline", True),
]


@pytest.mark.parametrize("name, baseline, candidates, rewards, kept, outcome, tie", CASES, ids=[c[0] for c in CASES])
def test_select_self_edits(name, baseline, candidates, rewards, kept, outcome, tie):
    selection = select_self_edits(baseline, candidates)
    assert (selection.rewards, selection.kept, selection.outcome, selection.tie) == (rewards, kept, outcome, tie)


def test_reward_is_binary_improvement_over_the_baseline():
    assert compute_reward(0.2, C(0, 0.4, 0.0)) == 1
    assert compute_reward(0.4, C(0, 0.4, 1.0)) == 0
    assert compute_reward(0.0, C(0, 1.0, 1.0, failure="oom")) == 0


GRADED = [
    # name, baseline, candidates, rewards, kept
    ("gain is the reward", 0.2, [C(0, 0.6, 0.5), C(1, 0.4, 0.9)], (0.4, 0.2), 0),
    ("below the baseline is negative", 0.5, [C(0, 0.25, 0.5)], (-0.25,), None),
    ("failed is zero, not negative", 0.5, [C(0, 0.0, 0.0, "non-finite loss"), C(1, 0.75, 0.1)], (0.0, 0.25), 1),
]


@pytest.mark.parametrize("name, baseline, candidates, rewards, kept", GRADED, ids=[c[0] for c in GRADED])
def test_graded_rewards_keep_what_binary_keeps(name, baseline, candidates, rewards, kept):
    graded = select_self_edits(baseline, candidates, kind="graded")
    assert graded.rewards == pytest.approx(rewards) and graded.kept == kept
    assert select_self_edits(baseline, candidates).kept == kept
