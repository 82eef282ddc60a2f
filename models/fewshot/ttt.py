"""Test-time training on one ARC task, as a few-shot self-edit prescribes, and its prediction.

Applying a self-edit (SEAL §4.1): leave-one-out tasks are built from the demonstrations (each
demonstration in turn becomes the query, the others stay in the prompt), augmented as the
config's switches say, and a fresh LoRA adapter is trained on them with the config's learning
rate, epochs and loss mode. The adapted model then answers the held-out test input greedily,
optionally under every dihedral view with a majority vote; reward 1 on an exact match.

Loss modes: ``train_using_all_tokens`` learns every token of the sequence;
``train_using_output_tokens`` only the output grids (of the demonstrations and of the query)
and the final EOS. Which tokens belong to an output grid comes from the tokenizer's character
offsets, never from model-specific token ids.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import peft
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.fewshot.augment import BASIC, Example, Pair, augment_example, identity, selected_transforms
from models.fewshot.grids import MAX_SIDE, Grid, GridFormat, MalformedGrid, encode_grid, parse_grid
from models.fewshot.schema import TTTConfig
from models.self_edit import generate, render_prompt
from models.training import backward_loss, fit

TASK_INSTRUCTION = (
    "Each example shows an input grid and the output grid it becomes; each digit is a colour. "
    "Write the output grid for the last input."
)


def task_prompt(
    demonstrations: Sequence[Pair], query_input: Grid, fmt: GridFormat
) -> tuple[str, list[tuple[int, int]]]:
    """The user turn for a task, and the character spans of the demonstrations' output grids."""
    text, spans = TASK_INSTRUCTION, []
    for number, (grid_in, grid_out) in enumerate(demonstrations, 1):
        text += f"\n\nExample {number}\nInput:\n{encode_grid(grid_in, fmt)}\nOutput:\n"
        encoded = encode_grid(grid_out, fmt)
        spans.append((len(text), len(text) + len(encoded)))
        text += encoded
    text += f"\n\nTest\nInput:\n{encode_grid(query_input, fmt)}\nOutput:"
    return text, spans


def rendered_task(
    tokenizer: PreTrainedTokenizerBase, demonstrations: Sequence[Pair], query_input: Grid, fmt: GridFormat
) -> tuple[str, list[tuple[int, int]]]:
    """The task as the model sees it (chat template applied), with output spans shifted to match.

    Raises:
        ValueError: if the chat template changes the user turn's text (the spans would be wrong).
    """
    content, spans = task_prompt(demonstrations, query_input, fmt)
    rendered = render_prompt(tokenizer, content)
    offset = rendered.find(content)
    if offset < 0:
        raise ValueError(
            "the chat template rewrites the prompt text, so output grids cannot be located "
            "in it; use a model whose template inserts the user turn verbatim"
        )
    return rendered, [(start + offset, end + offset) for start, end in spans]


def leave_one_out(pairs: Sequence[Pair]) -> list[Example]:
    """One example per demonstration: it is the query, the others are in the prompt."""
    if len(pairs) < 2:
        raise ValueError(f"leave-one-out needs at least 2 demonstrations, got {len(pairs)}")
    return [Example(tuple(p for j, p in enumerate(pairs) if j != i), pairs[i], "identity") for i in range(len(pairs))]


def build_examples(pairs: Sequence[Pair], config: TTTConfig, seed: int) -> list[Example]:
    """Leave-one-out examples, each as is and under every transform the config selects
    (colours permuted, demonstrations shuffled). Copies that outgrow 30x30 are left out."""
    rng = random.Random(seed)
    base = leave_one_out(pairs)
    examples = list(base)
    for name, transform in selected_transforms(config.data_generation.model_dump()).items():
        for example in base:
            augmented = augment_example(example, name, transform, rng)
            if augmented is not None:
                examples.append(augmented)
    return examples


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    fmt: GridFormat,
    output_tokens_only: bool,
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + query output + EOS, and labels (-100 where no loss is taken).

    With ``output_tokens_only`` the labels keep only tokens that overlap an output grid's
    characters (demonstrations' and the query's) and the EOS.
    """
    prompt, spans = rendered_task(tokenizer, example.demonstrations, example.query[0], fmt)
    answer = encode_grid(example.query[1], fmt)
    spans.append((len(prompt), len(prompt) + len(answer)))
    encoded = tokenizer(prompt + answer, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"]) + [tokenizer.eos_token_id]
    labels = list(ids)
    if output_tokens_only:
        for position, (start, end) in enumerate(encoded["offset_mapping"]):
            if not any(start < s_end and end > s_start for s_start, s_end in spans):
                labels[position] = -100
    return ids, labels


@dataclass(frozen=True)
class TTTResult:
    steps: int
    examples: int  # trained on
    dropped: int  # longer than max_length
    tokens: int
    mean_loss: float
    final_loss: float
    seconds: float


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids and labels; padding is masked out of attention and loss.

    Returns ``input_ids``, ``attention_mask``, ``labels``, each (batch, longest row).
    """
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_ttt_adapter(
    model: peft.PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    config: TTTConfig,
    fmt: GridFormat,
    *,
    batch_size: int,
    max_length: int,
    seed: int,
) -> TTTResult:
    """Test-time training of the attached adapter on a task's demonstrations, as ``config`` says.

    AdamW on the LoRA parameters, learning rate decaying linearly to zero, examples reshuffled
    every epoch from ``seed``, no gradient clipping (see :func:`models.training.fit`).

    Args:
        model: a model with a fresh trainable adapter attached.
        pairs: the task's demonstrations (input, output).
        config: the self-edit: augmentations, loss mode, learning rate, epochs.
        fmt: the grid encoding (see ``models.fewshot.grids.choose_format``).
        batch_size: examples per step.
        max_length: examples longer than this many tokens are left out.
        seed: augmentation and data-order seed.

    Returns:
        Steps, examples trained on and dropped, tokens, mean and final loss, seconds.

    Raises:
        ValueError: no example fits in ``max_length`` tokens.
        NonFiniteLossError: a loss became NaN or infinite.
    """
    start = time.perf_counter()
    output_only = config.training.strategy == "train_using_output_tokens"
    rows = [tokenize_example(tokenizer, e, fmt, output_only) for e in build_examples(pairs, config, seed)]
    kept = [r for r in rows if len(r[0]) <= max_length]
    if not kept:
        shortest = min(len(r[0]) for r in rows)
        raise ValueError(
            f"no training example fits inner_loop.max_length={max_length} tokens "
            f"(the shortest has {shortest}); raise it or pick tasks with smaller grids"
        )
    epochs = config.training.num_train_epochs
    losses = fit(
        model,
        kept,
        lambda batch: backward_loss(model, collate(batch, tokenizer.pad_token_id)),
        learning_rate=config.training.learning_rate,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        max_grad_norm=None,
        fused=model.device.type in ("cpu", "cuda"),
        learning_rate_setting="the self-edit's training.learning_rate",
    )
    tokens = epochs * sum(len(ids) for ids, _ in kept)  # each example once per epoch
    return TTTResult(
        steps=len(losses),
        examples=len(kept),
        dropped=len(rows) - len(kept),
        tokens=tokens,
        mean_loss=sum(losses) / len(losses),
        final_loss=losses[-1],
        seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class Prediction:
    grid: Grid | None  # None: no view gave a well-formed grid
    text: str  # the identity view's raw answer
    votes: int  # views that agreed with ``grid``
    views: int


VOTING_VIEWS = {"identity": (identity, identity), **BASIC}


def answer_budget(pairs: Sequence[Pair], query_input: Grid, fmt: GridFormat) -> int:
    """New tokens for an answer grid as large as the task's largest grid (capped at 30x30), + EOS."""
    grids = [g for pair in pairs for g in pair] + [query_input]
    side = min(MAX_SIDE, max(max(len(g), len(g[0])) for g in grids))
    per_cell = 1 if fmt == "compact" else 2
    return side * (side * per_cell + 1) + 1


@torch.no_grad()
def predict_outputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    test_inputs: Sequence[Grid],
    fmt: GridFormat,
    *,
    voting: bool,
    batch_size: int,
) -> list[Prediction]:
    """Greedy answers to each test input given all demonstrations in the prompt.

    With ``voting``, every test input is also asked under the 7 other dihedral views (the same
    transform on every grid of the prompt); each well-formed answer is mapped back with the
    inverse transform and the most frequent grid wins (ties: the identity view's, then order).
    Malformed answers get no vote.
    """
    views = VOTING_VIEWS if voting else {"identity": VOTING_VIEWS["identity"]}
    jobs = []  # (test index, view name, prompt)
    for index, query in enumerate(test_inputs):
        for name, (forward, _) in views.items():
            demos = [(forward(i), forward(o)) for i, o in pairs]
            jobs.append((index, name, rendered_task(tokenizer, demos, forward(query), fmt)[0]))
    budget = max(answer_budget(pairs, q, fmt) for q in test_inputs)
    texts: list[str] = []
    for first in range(0, len(jobs), batch_size):
        texts += generate(
            model, tokenizer, [prompt for _, _, prompt in jobs[first : first + batch_size]], max_new_tokens=budget
        )
    predictions = []
    for index in range(len(test_inputs)):
        answers = [(name, text) for (i, name, _), text in zip(jobs, texts) if i == index]
        grids = []
        for name, text in answers:
            try:
                grids.append(views[name][1](parse_grid(text, fmt)))
            except MalformedGrid:
                pass
        counts = Counter(grids)
        winner = max(counts, key=lambda g: (counts[g], -grids.index(g))) if grids else None
        predictions.append(Prediction(winner, answers[0][1], counts[winner] if grids else 0, len(answers)))
    return predictions
