"""Test-time training on an ARC task: leave-one-out data, loss masks from token positions, an
adapter that learns while the base stays put, and prediction with voting over views."""

import re

import pytest
import torch

from models.config import LoraConfig
from models.fewshot import ttt
from models.fewshot.augment import BASIC
from models.fewshot.schema import TTTConfig
from models.inner_loop import fresh_adapter

PAIRS = (
    (((1, 0), (0, 0)), ((0, 1), (0, 0))),
    (((0, 0), (2, 0)), ((0, 0), (0, 2))),
    (((0, 3), (0, 0)), ((3, 0), (0, 0))),
)


def config(strategy="train_using_output_tokens", basic=False, lr=1e-2, epochs=2):
    return TTTConfig.model_validate(
        {
            "data_generation": {
                "use_basic_augmentations": basic,
                "use_size_augmentations": False,
                "use_chain_augmentations": False,
                "use_repeat_augmentations": False,
            },
            "training": {"strategy": strategy, "learning_rate": lr, "num_train_epochs": epochs},
        }
    )


def test_leave_one_out_holds_out_each_demonstration_once():
    examples = ttt.leave_one_out(PAIRS)
    assert [e.query for e in examples] == list(PAIRS)
    for example in examples:
        assert example.query not in example.demonstrations and len(example.demonstrations) == 2
    with pytest.raises(ValueError, match="at least 2"):
        ttt.leave_one_out(PAIRS[:1])


def test_augmented_examples_follow_the_switches():
    assert len(ttt.build_examples(PAIRS, config(), seed=0)) == 3
    examples = ttt.build_examples(PAIRS, config(basic=True), seed=0)
    assert len(examples) == 3 * 8 and {e.view for e in examples} == {"identity", *BASIC}
    assert ttt.build_examples(PAIRS, config(basic=True), seed=0) == examples  # seeded


def test_output_tokens_only_labels_exactly_the_output_grids_and_eos(tiny):
    example = ttt.leave_one_out(PAIRS)[0]
    ids, labels = ttt.tokenize_example(tiny.tokenizer, example, "compact", output_tokens_only=True)
    learned = tiny.tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    outputs = [o for _, o in example.demonstrations] + [example.query[1]]
    expected = "".join("\n".join("".join(map(str, row)) for row in grid) for grid in outputs)
    assert learned == expected + tiny.tokenizer.eos_token
    assert ids[-1] == tiny.tokenizer.eos_token_id
    _, every = ttt.tokenize_example(tiny.tokenizer, example, "compact", output_tokens_only=False)
    assert every == ids


def test_the_mask_comes_from_positions_for_a_tokenizer_with_other_ids(tiny):
    """Spaced grids (Llama-3's encoding) are masked by character offsets just the same."""
    example = ttt.leave_one_out(PAIRS)[1]
    ids, labels = ttt.tokenize_example(tiny.tokenizer, example, "spaced", output_tokens_only=True)
    learned = tiny.tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert learned.startswith("0 1\n0 0") and learned.endswith("0 0\n0 2" + tiny.tokenizer.eos_token)


def test_test_time_training_moves_the_adapter_not_the_base(tiny):
    base = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    with fresh_adapter(tiny.model, LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=0) as adapted:
        before = {n: p.detach().clone() for n, p in adapted.named_parameters() if p.requires_grad}
        result = ttt.train_ttt_adapter(
            adapted, tiny.tokenizer, PAIRS, config(basic=True), "compact", batch_size=4, max_length=512, seed=0
        )
        after = {n: p.detach() for n, p in adapted.named_parameters() if p.requires_grad}
        assert result.examples == 24 and result.steps == 6 * 2 and result.dropped == 0
        assert any(not torch.equal(before[n], after[n]) for n in before)
    for name, weight in tiny.model.named_parameters():
        assert torch.equal(weight, base[name]), name


def test_examples_longer_than_max_length_are_dropped_and_none_left_is_an_error(tiny):
    with fresh_adapter(tiny.model, LoraConfig(rank=4, alpha=8, target_modules=["q_proj"]), seed=0) as adapted:
        with pytest.raises(ValueError, match="no training example fits inner_loop.max_length=16"):
            ttt.train_ttt_adapter(
                adapted, tiny.tokenizer, PAIRS, config(), "compact", batch_size=1, max_length=16, seed=0
            )


def echo_test_input(model, tokenizer, prompts, **kwargs):
    """A stand-in model that answers each prompt with its (transformed) test input."""
    return [re.search(r"Test\nInput:\n(.*?)\nOutput:", p, re.S).group(1) + "\n" for p in prompts]


def test_voting_maps_each_view_back_with_its_inverse(tiny, monkeypatch):
    monkeypatch.setattr(ttt, "generate", echo_test_input)
    query = ((1, 2, 3), (4, 5, 6))
    (voted,) = ttt.predict_outputs(tiny.model, tiny.tokenizer, PAIRS, [query], "compact", voting=True, batch_size=3)
    assert voted.grid == query and voted.votes == voted.views == 8
    (single,) = ttt.predict_outputs(tiny.model, tiny.tokenizer, PAIRS, [query], "compact", voting=False, batch_size=3)
    assert single.grid == query and single.views == 1


def answers_in_view_order(answers):
    """A stand-in model that gives these answers to the views' prompts, in order."""
    remaining = iter(answers)
    return lambda model, tokenizer, prompts, **kwargs: [next(remaining) for _ in prompts]


@pytest.mark.parametrize(
    "answers, grid, votes",
    [
        # identity, rotate90, rotate180, then five views agreeing on a grid symmetric under all of them
        (["12\n34", "garbage", "12\n34"] + ["99\n99"] * 5, ((9, 9), (9, 9)), 5),
        # all different: the identity view's answer wins the tie
        (["12\n34", "56\n78", "11\n22", "33\n44", "55\n66", "77\n88", "19\n29", "57\n68"], ((1, 2), (3, 4)), 1),
        # nothing well-formed: no grid, a wrong answer
        (["The answer is 12"] * 8, None, 0),
    ],
)
def test_the_majority_wins_and_malformed_answers_do_not_vote(tiny, monkeypatch, answers, grid, votes):
    monkeypatch.setattr(ttt, "generate", answers_in_view_order(answers))
    (prediction,) = ttt.predict_outputs(
        tiny.model, tiny.tokenizer, PAIRS, [((1, 2), (3, 4))], "compact", voting=True, batch_size=8
    )
    assert (prediction.grid, prediction.votes, prediction.views) == (grid, votes, 8)
    assert prediction.text == answers[0]


def test_the_answer_budget_covers_the_largest_grid():
    assert ttt.answer_budget(PAIRS, ((1, 2, 3),), "compact") == 3 * 4 + 1
    assert ttt.answer_budget(PAIRS, ((1, 2, 3),), "spaced") == 3 * 7 + 1
