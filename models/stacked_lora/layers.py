"""The stacked LoRA layer: a frozen linear layer plus several adapters, each batch row or span
of a packed row routed through its own.

:class:`StackedLoraLinear` keeps every adapter's A and B as one 3-D tensor each (adapter first).
Training routes spans of a packed row (:class:`TokenSpans`) through :class:`_LinearSpans`, the
base's matrix multiply and each adapter's products on its span in one autograd function;
generation routes whole batch rows (:class:`RowSpans`, or a slice or an index tensor, through
:class:`_LoraDelta`), never copying weights per row.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn


class StackedLoraLinear(nn.Module):
    """A frozen linear layer plus ``slots`` LoRA adapters; ``rows`` says which row uses which.

    The adapters' weights are one 3-D tensor each for A and B (adapter first), so a batch whose
    row i belongs to adapter i (one row per adapter, the usual case) multiplies by a view of
    them: no copy of the weights per step, and one gradient tensor per layer. LoRA weights are
    float32 whatever the base's dtype (as peft keeps them): a bf16 base still takes AdamW's small
    updates exactly.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: int, dropout: float, slots: int):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.dropout = dropout
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(slots, rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(slots, base.out_features, rank, device=device))
        # adapter of each batch row, or of each span of a packed row (see AdapterStack.route)
        self.rows: slice | torch.Tensor | TokenSpans | RowSpans | None = None

    @torch.no_grad()
    def reset(self, index: int, generator: torch.Generator) -> None:
        """peft's default initialization: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
        a = self.lora_A[index]
        bound = 1 / math.sqrt(a.shape[1])
        a.copy_((torch.rand(a.shape, generator=generator) * 2 - 1) * bound)
        self.lora_B[index].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return self.base(x)
        if isinstance(self.rows, RowSpans) and x.shape[1] == 1 and not torch.is_grad_enabled():
            return self._decoding_step(x, self.rows)
        if isinstance(self.rows, (TokenSpans, RowSpans)):
            spans = self.rows if isinstance(self.rows, TokenSpans) else self.rows.tokens(x.shape[1])
            flat = x.reshape(-1, x.shape[-1])
            dropped = (
                nn.functional.dropout(flat.to(self.lora_A.dtype), self.dropout, training=True)
                if self.dropout and self.training
                else None
            )
            out = _LinearSpans.apply(
                flat, dropped, self.base.weight, self.base.bias, self.lora_A, self.lora_B, spans, self.scaling
            )
            return out.view(*x.shape[:-1], -1)
        out = self.base(x)
        shape = x.shape
        if isinstance(self.rows, slice):  # rows grouped by adapter, as many for each: a batch per adapter
            x = x.reshape(self.rows.stop - self.rows.start, -1, shape[-1])
        # x: (batch, seq, in); A[rows]: (batch, rank, in); B[rows]: (batch, out, rank)
        if self.dropout and self.training:
            a, b = self.lora_A[self.rows], self.lora_B[self.rows]
            x = nn.functional.dropout(x.to(a.dtype), self.dropout, training=True)
            lora = self.scaling * torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        else:
            lora = _LoraDelta.apply(x, self.lora_A, self.lora_B, self.rows, self.scaling)
        return out + lora.reshape(*shape[:-1], -1).to(out.dtype)

    def _decoding_step(self, x: torch.Tensor, rows: RowSpans) -> torch.Tensor:
        """One generated token per row, rows of several adapters: every adapter's A product for
        every row (a few rows: cheap), each row's own kept, the B products summed. Five
        operations whatever the adapters, where a span each takes two per adapter (SmolLM2, fp32,
        2 cores, 30 questions of 6 adapters, <= 64 new tokens: 10.8 s, 11.9 s with spans)."""
        out = self.base(x)
        adapters = rows.adapters
        a, b = self.lora_A[adapters], self.lora_B[adapters]  # (n, rank, in), (n, out, rank)
        n, rank = a.shape[0], a.shape[1]
        xa = (x.reshape(-1, x.shape[-1]).to(a.dtype) @ a.reshape(n * rank, -1).T).view(-1, n, rank)
        xa = (xa * rows.one_hot.to(xa.device)).transpose(0, 1)  # (n, rows, rank), zero off the row's adapter
        delta = torch.bmm(xa, b.transpose(1, 2)).sum(0)  # (rows, out)
        return out.add_(delta.view(out.shape).to(out.dtype), alpha=self.scaling)


class _LoraDelta(torch.autograd.Function):
    """``scaling * (x @ A[rows].T) @ B[rows].T`` per batch row, in the adapters' dtype.

    What plain autograd would compute, keeping less: the input as given (autograd would keep
    a float32 copy of a bf16 input for every adapted layer, where layers sharing an input hold
    one), and the stacked weights themselves rather than the per-row copies that indexing them
    makes when rows are not ``0..n-1``. The backward pass casts and indexes again, one layer at a
    time, and adds each row's weight gradient into its adapter's slice.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rows: slice | torch.Tensor, scaling: float
    ) -> torch.Tensor:
        a, b = lora_a[rows], lora_b[rows]
        xa = torch.bmm(x.to(a.dtype), a.transpose(1, 2))  # (batch, seq, rank)
        ctx.save_for_backward(x, xa, lora_a, lora_b)
        ctx.rows, ctx.scaling = rows, scaling
        return scaling * torch.bmm(xa, b.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, xa, lora_a, lora_b = ctx.saved_tensors
        rows = ctx.rows
        a, b = lora_a[rows], lora_b[rows]
        grad = ctx.scaling * grad.to(a.dtype)  # (batch, seq, out)
        grad_xa = torch.bmm(grad, b)  # (batch, seq, rank)
        grad_x = torch.bmm(grad_xa, a).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_a = _scatter_rows(torch.bmm(grad_xa.transpose(1, 2), x.to(a.dtype)), rows, lora_a)
        if ctx.needs_input_grad[2]:
            grad_b = _scatter_rows(torch.bmm(grad.transpose(1, 2), xa), rows, lora_b)
        return grad_x, grad_a, grad_b, None, None


class TokenSpans(tuple):
    """``(adapter, start, stop)`` triples: tokens ``start:stop`` of the batch, flattened (a
    packed row, batch 1) go through ``adapter``; tokens in no span go through none."""


class RowSpans(tuple):
    """``(adapter, first, stop)`` triples: batch rows ``first:stop`` go through ``adapter`` (a
    batch grouped by adapter, as in generation, where every step has its own sequence length)."""

    def tokens(self, seq: int) -> TokenSpans:
        return TokenSpans((k, first * seq, stop * seq) for k, first, stop in self)

    @functools.cached_property
    def adapters(self) -> slice:
        """The adapters from the first row's to the last row's."""
        return slice(self[0][0], self[-1][0] + 1)

    @functools.cached_property
    def one_hot(self) -> torch.Tensor:
        """(rows, adapters, 1): 1 where the row goes through that adapter of :attr:`adapters`."""
        first = self.adapters.start
        mask = torch.zeros(self[-1][2], self.adapters.stop - first, 1)
        for k, start, stop in self:
            mask[start:stop, k - first] = 1
        return mask


class _LinearSpans(torch.autograd.Function):
    """A frozen linear layer and its adapters in one: ``x @ W.T + b`` for every token, plus
    ``scaling * (x @ A[k].T) @ B[k].T`` added in place on each ``(k, start, stop)`` span of the
    tokens (x: (tokens, in); tokens in no span get the base output alone).

    Each adapter's products are matrix multiplies on its own slice of the packed tokens, written
    into the base's output (forward) and input gradient (backward): no padding, no index copies,
    and no separate sums of the base and LoRA parts, which a padded ``bmm`` per product would
    need. LoRA runs in the adapters' dtype (float32 on a bf16 base, as peft does), on ``dropped``
    (the input after LoRA dropout) when given. The scaling goes on the (tokens x rank)
    projection; an adapter with no span gets a zero gradient.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        dropped: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        spans: TokenSpans,
        scaling: float,
    ) -> torch.Tensor:
        out = nn.functional.linear(x, weight, bias)  # (tokens, out), the base's dtype
        xl = (x if dropped is None else dropped).to(lora_a.dtype)
        xa = xl.new_empty((x.shape[0], lora_a.shape[1]))  # (tokens, rank), scaled; rows outside spans unused
        for k, start, stop in spans:
            torch.addmm(xa[start:stop], xl[start:stop], lora_a[k].T, beta=0, alpha=scaling, out=xa[start:stop])
            _add_product(out[start:stop], xa[start:stop], lora_b[k].T)
        # The input as given (a bf16 base's layer keeps bf16, cast again below), or the dropped one.
        ctx.save_for_backward(x if dropped is None else dropped, weight, xa, lora_a, lora_b)
        ctx.spans, ctx.scaling, ctx.dropped = spans, scaling, dropped is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xl, weight, xa, lora_a, lora_b = ctx.saved_tensors  # xa is scaled
        want_x, want_dropped, _, _, want_a, want_b = ctx.needs_input_grad[:6]
        xl = xl.to(lora_a.dtype) if want_a else None
        gl = grad.to(lora_a.dtype)
        gxa = gl.new_empty(xa.shape)  # gradient of the unscaled projection
        grad_x = torch.mm(grad, weight) if want_x else None  # (tokens, in), the base's dtype
        grad_dropped = gxa.new_zeros((grad.shape[0], lora_a.shape[2])) if want_dropped else None
        grad_a = _unused_zeroed(lora_a, ctx.spans) if want_a else None
        grad_b = _unused_zeroed(lora_b, ctx.spans) if want_b else None
        for k, start, stop in ctx.spans:
            span = slice(start, stop)
            torch.addmm(gxa[span], gl[span], lora_b[k], beta=0, alpha=ctx.scaling, out=gxa[span])
            if want_b:
                torch.mm(gl[span].T, xa[span], out=grad_b[k])
            if want_a:
                torch.mm(gxa[span].T, xl[span], out=grad_a[k])
            if want_dropped:
                torch.mm(gxa[span], lora_a[k], out=grad_dropped[span])
            elif want_x:
                _add_product(grad_x[span], gxa[span], lora_a[k])
        return grad_x, grad_dropped, None, None, grad_a, grad_b, None, None


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` in place: one ``addmm_`` where the dtypes agree."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out += torch.mm(a, b)


def _unused_zeroed(stacked: torch.Tensor, spans: TokenSpans) -> torch.Tensor:
    """An uninitialized gradient for ``stacked`` with the adapters outside ``spans`` zeroed
    (each adapter has at most one span; its slice is written whole)."""
    grad = torch.empty_like(stacked)
    used = {k for k, _, _ in spans}
    for k in range(stacked.shape[0]):
        if k not in used:
            grad[k].zero_()
    return grad


def _scatter_rows(row_grads: torch.Tensor, rows: slice | torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """Per-row gradients summed into a gradient of the stacked weights (zero for unused adapters)."""
    if isinstance(rows, slice) and rows.start == 0 and rows.stop == stacked.shape[0]:
        return row_grads  # every adapter, one row each, in order: already the stack's gradient
    grad = torch.zeros_like(stacked)
    if isinstance(rows, slice):
        grad[rows] = row_grads
    else:
        grad.index_add_(0, rows, row_grads)  # an adapter may have several rows
    return grad
