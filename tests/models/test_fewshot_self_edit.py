"""Few-shot self-edits: strict JSON configs, bounds and a step cap, bounded sampling retries."""

import json

import pytest

from models.config import FewshotConfig
from models.fewshot import self_edit
from models.fewshot.self_edit import InvalidSelfEdit, parse_self_edit, planned_steps, validate_self_edit

VALID = {
    "data_generation": {
        "use_basic_augmentations": True,
        "use_size_augmentations": False,
        "use_chain_augmentations": False,
        "use_repeat_augmentations": False,
    },
    "training": {"strategy": "train_using_output_tokens", "learning_rate": 1e-4, "num_train_epochs": 2},
}
BOUNDS = FewshotConfig(min_learning_rate=1e-5, max_learning_rate=1e-2, max_epochs=5, max_steps=64)


def edited(section, key, value):
    config = json.loads(json.dumps(VALID))
    if value is KeyError:
        del config[section][key]
    else:
        config[section][key] = value
    return json.dumps(config)


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(VALID),
        "Sure! Here is the config:\n```json\n" + json.dumps(VALID, indent=2) + "\n```\nGood luck.",
        json.dumps(VALID) + " {not json after the object is ignored",
        edited("training", "learning_rate", 1),  # an integer is a number
    ],
)
def test_valid_configs_parse(text):
    config = parse_self_edit(text)
    assert config.data_generation.use_basic_augmentations is True
    assert json.loads(config.canonical())["training"]["strategy"] == "train_using_output_tokens"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("I would use rotations.", "no '{'"),
        (json.dumps(VALID)[:-30], "invalid JSON"),  # cut off
        ('{"data_generation": {}, "data_generation": {}}', "appears twice"),
        (edited("training", "learning_rate", float("nan")), "NaN is not a number"),
        (edited("training", "momentum", 0.9), "training.momentum: Extra inputs"),
        (edited("data_generation", "use_size_augmentations", KeyError), "Field required"),
        (edited("data_generation", "use_basic_augmentations", "true"), "valid boolean"),
        (edited("data_generation", "use_basic_augmentations", 1), "valid boolean"),
        (edited("training", "num_train_epochs", 2.0), "valid integer"),
        (edited("training", "num_train_epochs", True), "valid integer"),
        (edited("training", "learning_rate", "1e-4"), "learning_rate"),
        (edited("training", "strategy", "train_on_everything"), "strategy"),
        ("{'data_generation': 1}", "invalid JSON"),  # Python, not JSON
        ("[1, 2]", "no '{'"),
    ],
)
def test_invalid_configs_say_why(text, fragment):
    with pytest.raises(InvalidSelfEdit, match=fragment):
        parse_self_edit(text)


@pytest.mark.parametrize(
    "section, key, value, fragment",
    [
        ("training", "learning_rate", 0.5, "learning_rate 0.5 outside"),
        ("training", "learning_rate", 1e-7, "outside"),
        ("training", "num_train_epochs", 0, "num_train_epochs 0 outside"),
        ("training", "num_train_epochs", 6, "num_train_epochs 6 outside"),
        ("training", "num_train_epochs", 5, "needs 120 training steps, more than fewshot.max_steps=64"),
    ],
)
def test_bounds_and_the_step_cap(section, key, value, fragment):
    with pytest.raises(InvalidSelfEdit, match=fragment):
        validate_self_edit(edited(section, key, value), BOUNDS, num_demonstrations=3, batch_size=1)


def test_planned_steps_count_leave_one_out_examples_and_their_augmented_copies():
    config = parse_self_edit(json.dumps(VALID))  # basic: 7 transforms + the original
    assert planned_steps(3, config, batch_size=1) == 3 * 8 * 2
    assert planned_steps(3, config, batch_size=4) == 6 * 2
    assert validate_self_edit(json.dumps(VALID), BOUNDS, num_demonstrations=4, batch_size=1)  # 64 steps


def test_sampling_retries_invalid_self_edits_a_bounded_number_of_times(monkeypatch, tiny):
    calls = []

    def fake_generate(model, tokenizer, prompts, *, num_return_sequences, seed, **kwargs):
        calls.append((num_return_sequences, seed))
        # The first sample is valid at once; the second never is; the third on the 2nd attempt.
        if len(calls) == 1:
            return [json.dumps(VALID), "no config", "no config"]
        return ["still no config", json.dumps(VALID)]

    monkeypatch.setattr(self_edit, "generate", fake_generate)
    bounds = BOUNDS.model_copy(update={"max_attempts": 3})
    edits = self_edit.sample_self_edits(
        tiny.model,
        tiny.tokenizer,
        "prompt",
        bounds=bounds,
        num_demonstrations=3,
        batch_size=1,
        num_samples=3,
        temperature=1.0,
        top_p=0.95,
        max_new_tokens=8,
        seed=5,
    )
    assert [e.attempts for e in edits] == [1, 3, 2]
    assert edits[0].config is not None and edits[2].config is not None
    assert edits[1].config is None and "no '{'" in edits[1].failure
    # 3 rounds: all three, then the two invalid ones, then the one still invalid; new seeds each time.
    assert [n for n, _ in calls] == [3, 2, 1] and len({s for _, s in calls}) == 3


def test_sampling_stops_after_max_attempts_even_if_nothing_is_ever_valid(monkeypatch, tiny):
    calls = []
    monkeypatch.setattr(
        self_edit, "generate", lambda *a, num_return_sequences, **k: calls.append(1) or ["{"] * num_return_sequences
    )
    edits = self_edit.sample_self_edits(
        tiny.model,
        tiny.tokenizer,
        "prompt",
        bounds=BOUNDS.model_copy(update={"max_attempts": 2}),
        num_demonstrations=3,
        batch_size=1,
        num_samples=4,
        temperature=1.0,
        top_p=0.95,
        max_new_tokens=8,
        seed=0,
    )
    assert len(calls) == 2 and all(e.config is None and e.attempts == 2 for e in edits)


def test_the_answer_prefix_is_part_of_the_self_edit(monkeypatch, tiny):
    prefix = '{"data_generation": {"use_basic_augmentations":'
    rest = json.dumps(VALID).removeprefix(prefix)
    seen = []
    monkeypatch.setattr(self_edit, "generate", lambda m, t, prompts, **k: seen.append(prompts[0]) or [rest])
    (edit,) = self_edit.sample_self_edits(
        tiny.model,
        tiny.tokenizer,
        "prompt",
        bounds=BOUNDS.model_copy(update={"answer_prefix": prefix}),
        num_demonstrations=3,
        batch_size=1,
        num_samples=1,
        temperature=1.0,
        top_p=0.95,
        max_new_tokens=8,
        seed=0,
    )
    assert seen[0].endswith(prefix) and edit.text == json.dumps(VALID) and edit.config is not None


def test_the_prompt_shows_the_demonstrations_and_the_bounds():
    prompt = self_edit.self_edit_prompt([(((1, 2),), ((2, 1),))], "compact", BOUNDS)
    assert "Input:\n12\nOutput:\n21" in prompt
    assert "from 1e-05 to 0.01" in prompt and "from 1 to 5" in prompt
    example = json.loads(prompt[prompt.index("{") :])
    assert parse_self_edit(json.dumps(example))  # the example in the prompt is itself valid
