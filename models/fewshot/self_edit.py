"""Few-shot self-edits: the policy reads a task's demonstrations and writes a JSON config for
test-time training (SEAL §4.1). Parsing is strict and never ``eval``s; a config that does not
parse or breaks a bound is recorded with the reason and earns reward 0. Sampling redraws
invalid configs a bounded number of times (the reference code loops until one is valid).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from pydantic import ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.config import FewshotConfig
from models.fewshot.augment import count_transforms
from models.fewshot.grids import GridFormat, encode_grid
from models.fewshot.schema import TTTConfig
from models.self_edit import generate, render_prompt

SELF_EDIT_PROMPT = (
    "Here is a puzzle. Each example shows an input grid and the output grid it becomes; each "
    "digit is a colour.\n\n{examples}\n\n"
    "A model will learn this puzzle by fine-tuning on these examples. Configure that training. "
    "Data generation tools, each on (true) or off (false): use_basic_augmentations (rotations, "
    "flips, transposes), use_size_augmentations (grids scaled up twice), use_chain_augmentations "
    "(a rotation or flip, then scaling up), use_repeat_augmentations (grids tiled). Training: "
    "strategy is train_using_all_tokens or train_using_output_tokens, learning_rate a number from "
    "{min_lr:g} to {max_lr:g}, num_train_epochs an integer from 1 to {max_epochs}.\n"
    "Answer with one JSON object and nothing else, for example:\n"
    '{{"data_generation": {{"use_basic_augmentations": true, "use_size_augmentations": false, '
    '"use_chain_augmentations": false, "use_repeat_augmentations": false}}, "training": '
    '{{"strategy": "train_using_output_tokens", "learning_rate": {example_lr:g}, "num_train_epochs": 2}}}}'
)


def format_examples(pairs, fmt: GridFormat) -> str:
    return "\n\n".join(
        f"Example {n}\nInput:\n{encode_grid(i, fmt)}\nOutput:\n{encode_grid(o, fmt)}"
        for n, (i, o) in enumerate(pairs, 1)
    )


def self_edit_prompt(pairs, fmt: GridFormat, bounds: FewshotConfig) -> str:
    """The raw (not chat-rendered) prompt asking for a config for the task with these
    demonstration ``pairs``."""
    return SELF_EDIT_PROMPT.format(
        examples=format_examples(pairs, fmt),
        min_lr=bounds.min_learning_rate,
        max_lr=bounds.max_learning_rate,
        max_epochs=bounds.max_epochs,
        example_lr=math.sqrt(bounds.min_learning_rate * bounds.max_learning_rate),
    )


class InvalidSelfEdit(ValueError):
    """A generated config that does not parse or breaks a bound; the message lists why."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise InvalidSelfEdit(f"invalid JSON: key {duplicated[0]!r} appears twice")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise InvalidSelfEdit(f"invalid JSON: {name} is not a number")


def parse_self_edit(text: str) -> TTTConfig:
    """The first JSON object in ``text`` as a config (text after it is ignored).

    Raises:
        InvalidSelfEdit: no object, invalid JSON (duplicate keys and NaN/Infinity included),
            a missing or unknown key, or a value of the wrong type.
    """
    start = text.find("{")
    if start < 0:
        raise InvalidSelfEdit("invalid JSON: no '{' in the generation")
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    try:
        value, _ = decoder.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise InvalidSelfEdit(f"invalid JSON: {exc.msg} at character {exc.pos - start}") from None
    try:
        return TTTConfig.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()[:4])
        raise InvalidSelfEdit(f"invalid config: {problems}") from None


def num_examples(num_demonstrations: int, config: TTTConfig) -> int:
    """Leave-one-out examples, each once as is and once per selected transform."""
    return num_demonstrations * (1 + count_transforms(config.data_generation.model_dump()))


def planned_steps(num_demonstrations: int, config: TTTConfig, batch_size: int) -> int:
    """Optimizer steps the config asks for (before examples too long to train on are dropped)."""
    return math.ceil(num_examples(num_demonstrations, config) / batch_size) * config.training.num_train_epochs


def check_bounds(config: TTTConfig, bounds: FewshotConfig, num_demonstrations: int, batch_size: int) -> list[str]:
    """Every bound the config breaks (empty when it is acceptable)."""
    problems = []
    lr = config.training.learning_rate
    if not bounds.min_learning_rate <= lr <= bounds.max_learning_rate:
        problems.append(f"learning_rate {lr:g} outside [{bounds.min_learning_rate:g}, {bounds.max_learning_rate:g}]")
    epochs = config.training.num_train_epochs
    if not 1 <= epochs <= bounds.max_epochs:
        problems.append(f"num_train_epochs {epochs} outside [1, {bounds.max_epochs}]")
    elif (steps := planned_steps(num_demonstrations, config, batch_size)) > bounds.max_steps:
        problems.append(f"needs {steps} training steps, more than fewshot.max_steps={bounds.max_steps}")
    return problems


def validate_self_edit(text: str, bounds: FewshotConfig, num_demonstrations: int, batch_size: int) -> TTTConfig:
    """Parse ``text`` and check its bounds.

    Raises:
        InvalidSelfEdit: with every reason it is rejected.
    """
    config = parse_self_edit(text)
    problems = check_bounds(config, bounds, num_demonstrations, batch_size)
    if problems:
        raise InvalidSelfEdit("out of bounds: " + "; ".join(problems))
    return config


@dataclass(frozen=True)
class SampledSelfEdit:
    text: str
    config: TTTConfig | None
    failure: str | None  # why the config is rejected (None when valid)
    attempts: int  # generations it took (1 = valid, or invalid with no retry left, at once)


def sample_self_edits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    bounds: FewshotConfig,
    num_demonstrations: int,
    batch_size: int,
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
) -> list[SampledSelfEdit]:
    """K configs for one task, each redrawn while invalid, at most ``bounds.max_attempts`` times.

    Each round is one batched ``generate`` call over the samples still invalid, with its own seed.
    The answer starts with ``bounds.answer_prefix`` (if any), which is part of each self-edit's
    text: the policy update then teaches the prefix too.

    Returns:
        ``num_samples`` self-edits; those still invalid after the last attempt carry the reason.
    """
    rendered = render_prompt(tokenizer, prompt) + bounds.answer_prefix
    samples: list[SampledSelfEdit | None] = [None] * num_samples
    pending = list(range(num_samples))
    for attempt in range(1, bounds.max_attempts + 1):
        texts = generate(
            model,
            tokenizer,
            [rendered],
            max_new_tokens=max_new_tokens,
            num_return_sequences=len(pending),
            temperature=temperature,
            top_p=top_p,
            seed=seed + 7919 * (attempt - 1),
        )
        still = []
        for index, text in zip(pending, texts):
            text = bounds.answer_prefix + text
            try:
                config = validate_self_edit(text, bounds, num_demonstrations, batch_size)
                samples[index] = SampledSelfEdit(text, config, None, attempt)
            except InvalidSelfEdit as exc:
                samples[index] = SampledSelfEdit(text, None, str(exc), attempt)
                still.append(index)
        pending = still
        if not pending:
            break
    return samples
