"""The optimizer loop of every fine-tune in SEAL: an inner loop's adapter, few-shot test-time
training and the policy update.

AdamW without weight decay, the learning rate decaying linearly to zero over all steps,
examples reshuffled every epoch from a seed, gradients optionally clipped: the Hugging Face
Trainer's defaults, which the paper's code trains with. Each caller brings its examples and a
``step`` that turns a batch of them into gradients.

    losses = fit(model, sequences, lambda rows: backward_loss(model, pad_batch(rows, pad_id)),
                 learning_rate=1e-3, epochs=10, batch_size=1, seed=0, max_grad_norm=1.0,
                 fused=True, learning_rate_setting="inner_loop.learning_rate")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

from models.errors import NonFiniteLossError

Example = TypeVar("Example")


def fit(
    model: nn.Module,
    examples: Sequence[Example],
    step: Callable[[list[Example]], float],
    *,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    seed: int,
    max_grad_norm: float | None,
    fused: bool | None,
    learning_rate_setting: str,
) -> list[float]:
    """Train the parameters of ``model`` that require gradients for ``epochs`` passes over ``examples``.

    Every step takes the next ``batch_size`` examples of the epoch's order and calls ``step``
    on them, which backpropagates their loss and returns it; then the gradients are clipped,
    AdamW updates the parameters and the learning rate decays. The model trains in train mode
    and is left in eval mode.

    Args:
        model: the model; only the parameters that require gradients are trained.
        examples: the training examples, in whatever form ``step`` takes.
        step: backpropagates a batch's loss and returns it; a NaN or infinite loss is returned
            without backpropagating.
        learning_rate: AdamW's learning rate at the first step.
        epochs: passes over ``examples``.
        batch_size: examples per step (the last step of an epoch may have fewer).
        seed: seed of every epoch's order.
        max_grad_norm: the gradient is scaled down to at most this norm (None: no clipping).
        fused: AdamW's fused kernel (None: PyTorch's default choice).
        learning_rate_setting: where the learning rate is set, for the error message.

    Returns:
        The loss of every step, in order.

    Raises:
        NonFiniteLossError: a step's loss is NaN or infinite; the parameters are then unusable.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, fused=fused)
    total_steps = math.ceil(len(examples) / batch_size) * epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    try:
        for epoch in range(epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            for first in range(0, len(order), batch_size):
                loss = step([examples[i] for i in order[first : first + batch_size]])
                if not math.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss became {loss} at epoch {epoch}, step {len(losses)}; "
                        f"lower {learning_rate_setting} (now {learning_rate})"
                    )
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss)
    finally:
        model.eval()
    return losses


def backward_loss(model: nn.Module, batch: dict[str, torch.Tensor], **model_kwargs) -> float:
    """Run ``model`` (a transformers or peft model) on ``batch``, moved to the model's device, and
    backpropagate its loss unless that is NaN or infinite; return the loss. ``model_kwargs`` go
    to the model as they are."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    loss = model(**batch, **model_kwargs).loss
    if torch.isfinite(loss):
        loss.backward()
    return loss.item()
