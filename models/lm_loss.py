"""Next-token losses per token without the whole (tokens x vocabulary) logits tensor.

A causal LM's training step usually materializes the logits of every token, casts them to
float32 and keeps the log-softmax for the backward pass: for a group of six 256-token rows of
SmolLM2 (vocabulary 49,152) that is ~0.3 GB per copy and ~1 GB at the loss, the largest tensors
of the step. :func:`token_losses` runs the decoder, then the (frozen) output head and the
cross-entropy a few hundred tokens at a time; the forward pass also computes each token's
gradient with respect to its hidden state (``(softmax - one_hot) @ W``, as autograd would), so
the backward pass is a multiply and nothing vocabulary-sized is kept.

    losses = token_losses(model, input_ids, labels, attention_mask=attention_mask)  # (rows, seq - 1)
    losses[mask].mean().backward()
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from transformers import PreTrainedModel

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in float32
_BUFFERS = threading.local()  # each thread's float32 logits (lanes train in threads)


def token_losses(model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor, **model_kwargs) -> torch.Tensor:
    """Cross-entropy of each next token, ``(rows, seq - 1)``; 0 where ``labels[:, 1:]`` is -100.

    Equal to ``cross_entropy(model(...).logits[:, :-1].float(), labels[:, 1:], reduction="none")``
    up to float rounding. Models whose head is not a plain linear layer (a bias, logit scaling
    or soft-capping) take that path. ``model_kwargs`` (``attention_mask``, or a packed batch's
    :meth:`~models.packing.PackedBatch.model_kwargs`) go to the model as they are.
    """
    model_kwargs.setdefault("use_cache", False)
    targets = labels[:, 1:]
    head = model.get_output_embeddings()
    if not _plain_head(model, head):
        logits = model(input_ids=input_ids, **model_kwargs).logits
        return nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(targets.shape)
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, **model_kwargs).last_hidden_state
    losses = _LinearCrossEntropy.apply(hidden[:, :-1].flatten(0, 1), head.weight, targets.flatten())
    return losses.view(targets.shape)


def _plain_head(model: PreTrainedModel, head: nn.Module | None) -> bool:
    config = model.config
    return (
        isinstance(head, nn.Linear)
        and head.bias is None
        and not head.weight.requires_grad
        and hasattr(model, "get_decoder")
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) in (None, 1, 1.0)
    )


def _head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(hidden @ weight.T).float()``, as the model's head computes its logits, float32 ones
    written into this thread's buffer: a fresh tensor this size is a fresh mapping of memory
    from the OS each time, which costs as much as the multiply (SmolLM2, 267 tokens: 52 MB)."""
    if weight.dtype != torch.float32:
        return (hidden @ weight.T).float()
    size = hidden.shape[0] * weight.shape[0]
    buffer = getattr(_BUFFERS, "logits", None)
    if buffer is None or buffer.numel() < size or buffer.device != hidden.device:
        buffer = _BUFFERS.logits = torch.empty(size, device=hidden.device)
    return torch.mm(hidden, weight.T, out=buffer[:size].view(hidden.shape[0], weight.shape[0]))


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token ``cross_entropy(hidden @ weight.T, labels)`` in chunks of tokens; ``weight`` is
    frozen. Forward keeps each token's gradient with respect to ``hidden`` (float32, tokens x
    hidden size); backward scales it by the incoming gradient of that token's loss."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tokens = hidden.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        losses = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, chunk):
            end = min(start + chunk, tokens)
            target = labels[start:end]
            valid = target != IGNORE_INDEX
            if not valid.any():
                continue
            index = target.clamp(min=0)[:, None]
            logits = _head(hidden[start:end], weight)
            # log-softmax and softmax in place: no other vocabulary-sized tensor
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            picked = logits.gather(1, index)
            probs = logits.exp_()
            total = probs.sum(dim=-1, keepdim=True)
            losses[start:end] = torch.where(valid, (total.log() - picked).squeeze(1), 0.0)
            probs.div_(total).scatter_add_(1, index, torch.full_like(index, -1, dtype=probs.dtype))
            if not valid.all():
                probs.mul_(valid[:, None])
            grad_hidden[start:end] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        ctx.dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        weight = grad_losses[:, None]
        # A token outside the loss gets exactly 0, even where its row's values are not finite.
        grad = torch.where(weight != 0, grad_hidden * weight, 0.0)
        return grad.to(ctx.dtype), None, None
