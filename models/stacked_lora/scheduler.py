"""Training a stack's adapters in shared batches, each as if alone, its slots kept busy.

:func:`train_slots` is continuous batching, for fine-tunes: when an adapter finishes its steps it
is handed over (saved) and its slot starts the next self-edit at the next step, so self-edits of 2
and 8 documents never leave a slot idle while the longest runs on. A step's rows are packed end to
end (:mod:`models.packing`) in batches of at most ``max_batch_tokens`` tokens, each adapter's rows
one span of a packed row. :func:`train_stacked` trains one group, one adapter per slot.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from models.config import InnerLoopConfig
from models.errors import NonFiniteLossError
from models.inner_loop import TrainResult, tokenize_documents
from models.lm_loss import token_losses
from models.packing import pack_sequences, packed_attention
from models.stacked_lora.optimizer import StackedAdamW
from models.stacked_lora.stack import AdapterStack, adapter_spans


def train_stacked(
    stack: AdapterStack,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[Sequence[str]],
    config: InnerLoopConfig,
) -> list[TrainResult | NonFiniteLossError]:
    """Train adapter k of the stack, as it is now, on ``documents[k]``, all adapters in shared
    batches (:func:`train_slots`, one adapter per slot).

    Returns:
        One entry per adapter: its result (``seconds`` is the shared wall time), or, if its loss
        became NaN or infinite, the :class:`NonFiniteLossError` at which it stopped (the other
        adapters train on: rows never interact).

    Raises:
        ValueError: if an adapter has no documents.
    """
    if len(documents) != stack.count or any(not docs for docs in documents):
        raise ValueError(f"need a non-empty document list for each of the {stack.count} adapters")
    jobs = iter([TrainJob(k, docs, seed=None) for k, docs in enumerate(documents)])
    results: list = [None] * stack.count
    start = time.perf_counter()
    train_slots(
        stack,
        tokenizer,
        lambda: next(jobs, None),
        config,
        lambda job, slot, result: results.__setitem__(job.index, result),
    )
    seconds = time.perf_counter() - start
    return [r if isinstance(r, NonFiniteLossError) else dataclasses.replace(r, seconds=seconds) for r in results]


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """An adapter to train: ``index`` in its group, its documents, and the seed of its fresh
    weights (None: train the slot's adapter as it is)."""

    index: int
    documents: Sequence[str]
    seed: int | None


@dataclasses.dataclass
class _Slot:
    """The adapter training in one slot of a stack: its job, its steps' rows, how far it is."""

    job: TrainJob
    batches: list[list[list[int]]]
    started: float
    step: int = 0
    tokens: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    failure: NonFiniteLossError | None = None

    def result(self) -> TrainResult | NonFiniteLossError:
        if self.failure is not None:
            return self.failure
        return TrainResult(
            steps=len(self.batches),
            tokens=self.tokens,
            mean_loss=sum(self.losses) / len(self.losses),
            final_loss=self.losses[-1],
            seconds=time.perf_counter() - self.started,
        )


def train_slots(
    stack: AdapterStack,
    tokenizer: PreTrainedTokenizerBase,
    take: Callable[[], TrainJob | None],
    config: InnerLoopConfig,
    finished: Callable[[TrainJob, int, TrainResult | NonFiniteLossError], None],
) -> None:
    """Train adapters in the stack's slots, all busy slots in shared batches, until ``take``
    has no more jobs: continuous batching of fine-tunes.

    Every slot starts with a job from ``take``. When a slot's adapter has run all its steps, or
    its loss became NaN or infinite, ``finished(job, slot, result)`` is called while its weights
    are still in the slot (to save them), and the slot starts the next job at the next step: a
    short self-edit never leaves its slot idle while the longest of its group finishes. Each
    adapter sees exactly the steps it would see alone: its documents reshuffled every epoch from
    ``config.seed``, ``config.batch_size`` of them per step, learning rate decaying linearly to
    zero over its own step count, its own AdamW moments and bias correction
    (:class:`StackedAdamW`); rows of different adapters never interact.

    Raises:
        ValueError: if a job has no documents.
    """
    model = stack.model
    optimizer = StackedAdamW(stack.weights(), stack.slots, max_grad_norm=config.max_grad_norm)

    def start(slot: int) -> _Slot | None:
        job = take()
        if job is None:
            return None
        if not job.documents:
            raise ValueError(f"adapter {job.index} has no documents")
        if job.seed is not None:
            stack.reset_slot(slot, job.seed)
        optimizer.reset(slot)
        return _Slot(
            job, _schedule(tokenize_documents(tokenizer, job.documents, config.max_length), config), time.perf_counter()
        )

    slots = [start(slot) for slot in range(stack.slots)]
    model.train()
    try:
        while any(slots):
            busy = [(k, s) for k, s in enumerate(slots) if s is not None]
            rows = [(k, seq) for k, s in busy for seq in s.batches[s.step]]
            # Adapter k's loss is the mean over its tokens this step, as alone, whichever parts hold them.
            label_counts = {k: sum(len(seq) - 1 for seq in s.batches[s.step]) for k, s in busy}
            step_loss = dict.fromkeys(label_counts, 0.0)
            for part in token_budget_parts(rows, config.max_batch_tokens):
                batch = pack_sequences([seq for _, seq in part], model.device)
                spans = adapter_spans([k for k, _ in part], batch)
                stack.route_spans(spans)
                with packed_attention(model):
                    # Next-token loss per token, (tokens - 1,); 0 at each row's last token
                    token_loss = token_losses(model, batch.input_ids, batch.labels, **batch.model_kwargs())[0]
                total = None
                for k, first, stop in spans:
                    s = slots[k]
                    if s.failure is not None:
                        continue
                    loss_k = token_loss[first:stop].sum() / label_counts[k]
                    if not torch.isfinite(loss_k):
                        s.failure = NonFiniteLossError(
                            f"loss became {loss_k.item()} at step {s.step}; "
                            f"lower inner_loop.learning_rate (now {config.learning_rate})"
                        )
                        continue
                    step_loss[k] += loss_k.item()
                    s.tokens += stop - first
                    total = loss_k if total is None else total + loss_k
                if total is not None:
                    total.backward()  # gradients add up over the step's parts
                del token_loss, total
            # Each adapter's learning rate decays linearly to zero over its own steps; an adapter
            # that failed part-way through this step is frozen, its gradient ignored.
            rates = [0.0] * stack.slots
            for k, s in busy:
                if s.failure is None:
                    rates[k] = config.learning_rate * (1 - s.step / len(s.batches))
            if any(rates):
                optimizer.step(rates)
            optimizer.zero_grad()
            for k, s in busy:
                if s.failure is None:
                    s.losses.append(step_loss[k])
                    s.step += 1
                if s.failure is not None or s.step == len(s.batches):
                    finished(s.job, k, s.result())
                    slots[k] = start(k)
    finally:
        stack.route(None)
        model.eval()


def _schedule(sequences: list[list[int]], config: InnerLoopConfig) -> list[list[list[int]]]:
    """One adapter's steps as train_adapter draws them: its documents reshuffled every epoch
    from ``config.seed``, ``config.batch_size`` of them per step."""
    generator = torch.Generator().manual_seed(config.seed)
    steps = []
    for _ in range(config.epochs):
        order = torch.randperm(len(sequences), generator=generator).tolist()
        steps += [
            [sequences[i] for i in order[s : s + config.batch_size]] for s in range(0, len(order), config.batch_size)
        ]
    return steps


def length_groups(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices of items grouped ``size`` at a time, in order of length (ties in item order).

    A group trains for as many steps as its longest member (one document per adapter per step),
    so members of similar length go together. Results do not depend on the grouping, only the
    time does."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[first : first + size] for first in range(0, len(order), size)]


def token_budget_parts(rows: Sequence[tuple[int, list[int]]], max_tokens: int) -> list[list[tuple[int, list[int]]]]:
    """Split a step's ``(adapter, token ids)`` rows into packed batches of at most ``max_tokens``
    tokens (a longer row goes alone), longest rows first, each into the first batch it fits;
    each batch lists its rows by adapter, so an adapter's rows are one span of the packed row."""
    parts: list[list[tuple[int, list[int]]]] = []
    sizes: list[int] = []
    for row in sorted(rows, key=lambda r: -len(r[1])):
        fits = next((i for i, size in enumerate(sizes) if size + len(row[1]) <= max_tokens), None)
        if fits is None:
            parts.append([row])
            sizes.append(len(row[1]))
        else:
            parts[fits].append(row)
            sizes[fits] += len(row[1])
    return [sorted(part, key=lambda r: r[0]) for part in parts]
