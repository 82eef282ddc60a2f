"""Closed-book answers of a stack's adapters, all of them in shared batched generations, each
batch row routed to its adapter."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from models.config import EvalConfig
from models.inner_loop import EvalResult, first_line, grade
from models.self_edit import QUESTION_PROMPT, answer_lines, render_prompt
from models.stacked_lora.stack import AdapterStack


def evaluate_stacked(
    stack: AdapterStack,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Sequence[str]],
    answers: Sequence[Sequence[Sequence[str]]],
    config: EvalConfig,
) -> list[EvalResult]:
    """Closed-book answers of adapter k to ``questions[k]``, all adapters in shared generations
    of at most ``config.batch_size`` rows.

    Rows are routed to their adapter as in training; generation keeps the batch's rows in
    place, so the routing holds for every decoding step. A batch holds whole adapters' questions
    where they fit (equal groups take the one-``bmm`` route of :meth:`AdapterStack.route`).
    """
    rows = [(k, q) for k in range(stack.count) for q in questions[k]]
    prompts = [render_prompt(tokenizer, QUESTION_PROMPT.format(question=q)) for _, q in rows]
    start = time.perf_counter()
    predictions: list[str] = []
    try:
        for first, stop in row_batches([len(q) for q in questions[: stack.count]], config.batch_size):
            adapters = torch.tensor([k for k, _ in rows[first:stop]], device=stack.model.device)
            stack.route(adapters)
            # rows that have answered leave the batch: route those left
            outputs = answer_lines(
                stack.model,
                tokenizer,
                prompts[first:stop],
                max_new_tokens=config.max_new_tokens,
                on_rows=lambda left, adapters=adapters: stack.route(adapters[left]),
            )
            predictions += [first_line(text) for text in outputs]
    finally:
        stack.route(None)
    return grade(predictions, answers, time.perf_counter() - start)


def row_batches(counts: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """``(first, stop)`` row ranges of at most ``batch_size`` rows over groups of ``counts[k]``
    consecutive rows, cut between groups where a group fits (in order, greedily); a group larger
    than a batch is split."""
    batches, first, stop = [], 0, 0
    for count in counts:
        if stop - first + count > batch_size and stop > first:
            batches.append((first, stop))
            first = stop
        stop += count
        while stop - first > batch_size:
            batches.append((first, first + batch_size))
            first += batch_size
    if stop > first:
        batches.append((first, stop))
    return batches


def adapter_chunks(counts: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """``(first, stop)`` ranges of consecutive adapters, ``counts[k]`` rows each, holding at most
    ``batch_size`` rows (an adapter with more goes alone), greedily in order."""
    chunks: list[tuple[int, int]] = []
    first, rows = 0, 0
    for k, count in enumerate(counts):
        if rows + count > batch_size and k > first:
            chunks.append((first, k))
            first, rows = k, 0
        rows += count
    if counts:
        chunks.append((first, len(counts)))
    return chunks
