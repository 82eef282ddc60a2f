"""K independent LoRA fine-tunes of one frozen base, trained in the same batches.

The K self-edits of a context are separate fine-tunes of the same base model. Training them one
after another multiplies small matrices K times; here one batch holds rows of every adapter,
each row routed through its own LoRA weights, so the base model's matrix multiplies get K times
more rows, which a small model's multiplies need to run near the hardware's rate
(benchmarks/README.md, "Stacked groups").

A step's rows are packed end to end (:mod:`models.packing`): no padding reaches the linear
layers, each adapter's rows are one span of the packed row, and attention stays within each row.
Each adapted layer is one function (:class:`_LinearSpans`): the base's matrix multiply over all
tokens, then each adapter's products on its span, added in place into the base's output and
input gradient (no padding, no copies; faster than a padded ``bmm`` over the adapters, see
benchmarks/README.md). Generation routes whole batch rows: a batch grouped by adapter multiplies
each adapter's rows together, never copying weights per row.

A stack's adapters are slots (:func:`train_slots`): when one finishes its steps it is handed
over (saved) and the slot starts the next self-edit at the next step, so self-edits of 2 and 8
documents never leave a slot idle while the longest runs on: continuous batching, for fine-tunes.

Equivalence with training each adapter alone: rows never interact in a causal LM's forward
pass, the loss is the sum of each adapter's own mean loss (so adapter k's gradient is the one
it would get alone), every adapter has its own learning-rate schedule and step count
(:class:`StackedAdamW`), and AdamW is elementwise, so its state is per adapter too.

    with stacked_adapters(model, lora, seeds=[0, 1, 2]) as stack:
        results = train_stacked(stack, tokenizer, [docs_0, docs_1, docs_2], config)
        stack.save(1, folder)  # PEFT format: loads with peft.PeftModel.from_pretrained
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.config import EvalConfig, InnerLoopConfig, LoraConfig
from models.inner_loop import (
    EvalResult,
    NonFiniteLossError,
    TrainResult,
    atomic_folder,
    first_line,
    grade,
    lora_config,
    tokenize_documents,
)
from models.lanes import balance, model_replicas, run_lanes
from models.lm_loss import token_losses
from models.packing import PackedBatch, pack_sequences, packed_attention
from models.self_edit import QUESTION_PROMPT, answer_lines, render_prompt


class StackedLoraLinear(nn.Module):
    """A frozen linear layer plus ``capacity`` LoRA adapters; ``rows`` says which row uses which.

    The adapters' weights are one 3-D tensor each for A and B (adapter first), so a batch whose
    row i belongs to adapter i (one row per adapter, the usual case) multiplies by a view of
    them: no copy of the weights per step, and one gradient tensor per layer. LoRA weights are
    float32 whatever the base's dtype (as peft keeps them): a bf16 base still takes AdamW's small
    updates exactly.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: int, dropout: float, capacity: int):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.dropout = dropout
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(capacity, rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(capacity, base.out_features, rank, device=device))
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
            dropped = (nn.functional.dropout(flat.to(self.lora_A.dtype), self.dropout, training=True)
                       if self.dropout and self.training else None)
            out = _LinearSpans.apply(flat, dropped, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                                     spans, self.scaling)
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
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                rows: slice | torch.Tensor, scaling: float) -> torch.Tensor:
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
    def forward(ctx, x: torch.Tensor, dropped: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, spans: TokenSpans, scaling: float) -> torch.Tensor:
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


class StackedAdamW:
    """AdamW (no weight decay) over stacked adapter weights, with a learning rate per adapter.

    The same arithmetic as ``torch.optim.AdamW`` applied to each adapter's slice on its own
    (AdamW is elementwise): adapter k's bias correction counts its own updates, and
    :meth:`reset` starts a slot over for the next adapter trained in it. An adapter given
    learning rate 0 is left as it is.
    With ``max_grad_norm``, each adapter's gradient is first clipped to that norm on its own, as
    ``torch.nn.utils.clip_grad_norm_`` would clip it alone.
    """

    def __init__(self, params: list[nn.Parameter], count: int, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, max_grad_norm: float | None = None):
        self.params, self.count, self.betas, self.eps = params, count, betas, eps
        self.max_grad_norm = max_grad_norm
        self.exp_avg = [torch.zeros_like(p[:count]) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p[:count]) for p in params]
        self.steps = [0] * count  # updates of each adapter so far
        # Adapter k's slices of the weights and moments, made once (thousands of views per step otherwise).
        with torch.no_grad():
            self._slices = [_by_adapter(tensors, count) for tensors in (params, self.exp_avg, self.exp_avg_sq)]

    @torch.no_grad()
    def step(self, learning_rates: Sequence[float]) -> None:
        """One update; ``learning_rates[k]`` for adapter k (0: frozen this step, its gradient
        ignored). Each adapter's slices go through torch's fused AdamW kernel (one pass over
        weights, gradients and moments) with its own learning rate; clipping is that kernel's
        gradient scale, not a pass of its own."""
        beta1, beta2 = self.betas
        stacked = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        scales = self.clip_coefficients(stacked) if self.max_grad_norm is not None else None
        grads = _by_adapter(stacked, self.count)
        weights, exp_avg, exp_avg_sq = self._slices
        for k, lr in enumerate(learning_rates[: self.count]):
            if lr == 0:  # finished or failed adapters: no update, and a NaN gradient stays out
                continue
            self.steps[k] += 1
            step = torch.tensor(float(self.steps[k]), device=self.params[0].device)
            torch._fused_adamw_(
                weights[k], grads[k], exp_avg[k], exp_avg_sq[k], [], [step] * len(weights[k]),
                lr=float(lr), beta1=beta1, beta2=beta2, weight_decay=0.0, eps=self.eps, amsgrad=False,
                maximize=False, grad_scale=None if scales is None else 1 / scales[k],  # divides the gradient
            )

    @torch.no_grad()
    def reset(self, index: int) -> None:
        """Adapter ``index`` starts over: zero moments, no updates counted."""
        for moments in (self._slices[1][index], self._slices[2][index]):
            for tensor in moments:
                tensor.zero_()
        self.steps[index] = 0

    def clip_coefficients(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """For each adapter, the factor that scales its gradient (its slice of each stacked
        gradient in ``grads``, adapter first) to at most ``max_grad_norm`` over all its weights,
        as ``torch.nn.utils.clip_grad_norm_`` computes it for one model's parameters;
        ``(count,)``. One norm per stacked tensor covers every adapter."""
        count = self.count
        per_tensor = torch.stack([torch.linalg.vector_norm(g[:count].reshape(count, -1), dim=1) for g in grads])
        norms = torch.linalg.vector_norm(per_tensor, dim=0)
        return (self.max_grad_norm / (norms + 1e-6)).clamp_(max=1.0)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def _by_adapter(stacked: Sequence[torch.Tensor], count: int) -> list[list[torch.Tensor]]:
    """``[[t[k] for t in stacked] for k in range(count)]``, one ``unbind`` per tensor."""
    return [list(views) for views in zip(*(t.unbind(0)[:count] for t in stacked))]


class AdapterStack:
    """``capacity`` LoRA adapters attached to every target layer of a model, reused across groups.

    Attach once (:meth:`attach`), then for each group of inner loops :meth:`reset` the first
    adapters from their seeds (or :meth:`load` saved ones), :meth:`route` batch rows to them,
    and :meth:`save` each. While no rows are routed the model computes exactly its base outputs.
    :meth:`close` puts the original layers back.
    """

    def __init__(self, model: PreTrainedModel, layers: dict[str, StackedLoraLinear], lora: LoraConfig,
                 capacity: int, frozen: list[nn.Parameter]):
        self.model = model
        self.layers = layers
        self.lora = lora
        self.capacity = capacity
        self.count = capacity  # adapters in use by the current group
        self._frozen = frozen

    @classmethod
    def attach(cls, model: PreTrainedModel, lora: LoraConfig, capacity: int) -> AdapterStack:
        """Wrap every linear layer named in ``lora.target_modules`` with ``capacity`` adapters.

        Raises:
            ValueError: if no layer matches ``lora.target_modules``.
        """
        targets = [
            (name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in lora.target_modules
        ]
        if not targets:
            raise ValueError(f"lora.target_modules {lora.target_modules} matched no linear layer of the model")
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        layers: dict[str, StackedLoraLinear] = {}
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            layers[name] = StackedLoraLinear(module, lora.rank, lora.alpha, lora.dropout, capacity)
            setattr(model.get_submodule(parent_name), child, layers[name])
        return cls(model, layers, lora, capacity, frozen)

    def matches(self, lora: LoraConfig) -> bool:
        """Whether ``lora`` describes this stack's layers (module order aside)."""
        return (lora.rank, lora.alpha, lora.dropout, set(lora.target_modules)) == (
            self.lora.rank, self.lora.alpha, self.lora.dropout, set(self.lora.target_modules))

    def reset(self, seeds: Sequence[int]) -> None:
        """Fresh adapters 0..len(seeds)-1 for a new group; adapter k's A comes from ``seeds[k]``
        alone, so it starts the same whether it is trained alone or with others."""
        if not 0 < len(seeds) <= self.capacity:
            raise ValueError(f"a group of {len(seeds)} adapters does not fit a stack of {self.capacity}")
        for k, seed in enumerate(seeds):
            self.reset_slot(k, seed)
        self.count = len(seeds)

    def reset_slot(self, index: int, seed: int) -> None:
        """A fresh adapter in slot ``index``, its A drawn from ``seed`` alone."""
        generator = torch.Generator().manual_seed(seed)
        for layer in self.layers.values():
            layer.reset(index, generator)

    def route(self, row_adapter: torch.Tensor | None) -> None:
        """Send batch row i through adapter ``row_adapter[i]`` (None: the bare base model)."""
        rows = row_adapter
        if row_adapter is not None:
            adapters = row_adapter.tolist()
            if adapters == sorted(adapters):  # grouped by adapter: no per-row copies of the weights
                spans = _runs(adapters)
                first, size = spans[0][0], spans[0][2]
                if all(k == first + j and stop - start == size for j, (k, start, stop) in enumerate(spans)):
                    rows = slice(first, first + len(spans))  # consecutive adapters, equal groups: one bmm
                else:
                    rows = RowSpans(spans)  # one matrix multiply per adapter
        for layer in self.layers.values():
            layer.rows = rows

    def route_spans(self, spans: Sequence[tuple[int, int, int]]) -> None:
        """Send tokens ``start:stop`` of a packed row through ``adapter``, for each
        ``(adapter, start, stop)`` (see :mod:`models.packing`)."""
        routed = TokenSpans(spans)
        for layer in self.layers.values():
            layer.rows = routed

    def weights(self) -> list[nn.Parameter]:
        """Every layer's stacked A and B (adapter first)."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    def parameters(self, index: int) -> list[torch.Tensor]:
        """Adapter ``index``'s weights, as views into the stack."""
        return [w[index] for w in self.weights()]

    def save(self, index: int, folder: Path) -> Path:
        """Adapter ``index`` in PEFT's format (safetensors + adapter_config.json), atomically."""
        with atomic_folder(folder) as tmp:
            tensors = {}
            for name, layer in self.layers.items():
                tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[index].detach().contiguous().cpu()
                tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[index].detach().contiguous().cpu()
            save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
            lora_config(self.lora).save_pretrained(tmp)
        return Path(folder)

    @torch.no_grad()
    def load(self, folders: Sequence[Path]) -> None:
        """Adapters 0..len(folders)-1 from PEFT-format adapters saved with this stack's LoRA
        settings (by :meth:`save` or peft), for a group to evaluate.

        Raises:
            ValueError: if there are more folders than adapters, or a saved adapter's layers do
                not fit this stack.
        """
        if not 0 < len(folders) <= self.capacity:
            raise ValueError(f"a group of {len(folders)} adapters does not fit a stack of {self.capacity}")
        expected = {f"base_model.model.{name}.lora_{ab}.weight" for name in self.layers for ab in "AB"}
        for index, folder in enumerate(folders):
            state = load_file(Path(folder) / "adapter_model.safetensors")
            if set(state) != expected:
                missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
                raise ValueError(f"adapter {folder} does not fit this stack: "
                                 f"missing {missing[:2]}, unexpected {extra[:2]}")
            for name, layer in self.layers.items():
                layer.lora_A[index].copy_(state[f"base_model.model.{name}.lora_A.weight"])
                layer.lora_B[index].copy_(state[f"base_model.model.{name}.lora_B.weight"])
        self.count = len(folders)

    @contextmanager
    def resized(self, capacity: int) -> Iterator[AdapterStack]:
        """This stack with room for ``capacity`` adapters (zero, no gradients) for the block, its
        own put back on exit: evaluating more adapters than training holds costs their weights
        only."""
        kept = {name: (layer.lora_A, layer.lora_B) for name, layer in self.layers.items()}, self.capacity, self.count
        for layer in self.layers.values():
            a, b = layer.lora_A, layer.lora_B
            layer.lora_A = nn.Parameter(a.new_zeros((capacity, *a.shape[1:])), requires_grad=False)
            layer.lora_B = nn.Parameter(b.new_zeros((capacity, *b.shape[1:])), requires_grad=False)
        self.capacity = self.count = capacity
        try:
            yield self
        finally:
            weights, self.capacity, self.count = kept
            for name, layer in self.layers.items():
                layer.lora_A, layer.lora_B = weights[name]

    def close(self) -> None:
        """Put the original layers back: the model is as it was before :meth:`attach`."""
        self.route(None)
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, layer.base)
        for p in self._frozen:
            p.requires_grad_(True)


_STEP_CHARS = 120


class AdapterLanes:
    """Adapters spread over :class:`AdapterStack` s on replicas of one model (:mod:`models.lanes`),
    each stack's share trained in its own lane (a thread with its share of the cores); with one
    lane, a single stack on the model itself, in the calling thread. Evaluation loads saved
    adapters into lane 0's stack: generation gains from one batch over many of them.

    Adapter i of a group that fits lives in slot ``placement[i]`` = ``(lane, slot)``, where
    :meth:`train` placed it by its documents' length (lanes of near-equal work); :meth:`save`
    follows the placement. A larger group trains as a queue over the slots, each adapter saved
    to its folder as it finishes. Either way a group is evaluated from its folders
    (:meth:`evaluate_saved`). Results do not depend on the lanes or the slots: each adapter
    trains exactly as alone (see :func:`train_slots`).

        lanes = AdapterLanes.attach(model, tokenizer, lora, capacity=4, lanes=2)
        results = lanes.train(documents, config, seeds=[0] * len(documents), folders=folders)
        scores = lanes.evaluate_saved(folders, questions, answers, eval_config)
        lanes.close()
    """

    def __init__(self, stacks: Sequence[AdapterStack], tokenizers: Sequence[PreTrainedTokenizerBase]):
        self.stacks, self.tokenizers = list(stacks), list(tokenizers)
        self.groups: list[list[int]] = []  # the group's adapter indices in each lane, lane 0 first

    @classmethod
    def attach(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lora: LoraConfig,
               capacity: int, lanes: int = 1) -> AdapterLanes:
        """A stack on each of ``lanes`` replicas of ``model`` (the first is ``model`` itself),
        room for ``capacity`` adapters in all. ``model`` must have no adapters attached."""
        replicas = model_replicas(model, lanes)
        per_lane = -(-capacity // lanes)
        stacks = [AdapterStack.attach(replica, lora, per_lane) for replica in replicas]
        return cls(stacks, [tokenizer] + [copy.deepcopy(tokenizer) for _ in range(lanes - 1)])

    @property
    def capacity(self) -> int:
        """Adapters that fit: every lane's stack full."""
        return sum(stack.capacity for stack in self.stacks)

    def matches(self, lora: LoraConfig) -> bool:
        return self.stacks[0].matches(lora)

    @property
    def placement(self) -> list[tuple[int, int]]:
        """``(lane, slot)`` of each adapter of the group, in order (none after a group that
        did not fit: its adapters went to their folders)."""
        where = {index: (lane, slot) for lane, items in enumerate(self.groups) for slot, index in enumerate(items)}
        return [where[index] for index in range(len(where))]

    def train(self, documents: Sequence[Sequence[str]], config: InnerLoopConfig, seeds: Sequence[int],
              folders: Sequence[Path] | None = None) -> list[TrainResult | NonFiniteLossError]:
        """Fresh adapters (adapter i from ``seeds[i]``), adapter i trained on ``documents[i]``
        (:func:`train_slots` in each lane); one result per adapter, in order, its ``seconds``
        from its first step to its last.

        Adapters start longest first. With ``folders``, adapter i is saved to ``folders[i]`` as
        soon as it finishes (unless its loss became non-finite) and its slot takes the next
        adapter not yet started, whichever lane frees first: the group may be larger than the
        lanes hold, and every slot stays busy until the last adapters. Without ``folders`` the
        group must fit; its adapters stay in place for :meth:`save`.

        Raises:
            ValueError: if the group does not fit without ``folders``, or the lists differ in length.
        """
        if len(seeds) != len(documents) or (folders is not None and len(folders) != len(documents)):
            given = f"{len(seeds)} seeds" + ("" if folders is None else f" and {len(folders)} folders")
            raise ValueError(f"{given} for {len(documents)} adapters")
        if not documents or (folders is None and len(documents) > self.capacity):
            raise ValueError(f"a group of {len(documents)} adapters does not fit {len(self.stacks)} lane(s) "
                             f"of {self.stacks[0].capacity}")
        # An adapter's work: its characters (tokens) plus, per document (a step each epoch), what
        # a step costs besides its rows (benchmarks/README.md: a step's fixed cost, in characters).
        costs = [sum(len(d) + _STEP_CHARS for d in docs) for docs in documents]
        order = sorted(range(len(documents)), key=lambda i: (-costs[i], i))
        first, rest = order[: self.capacity], order[self.capacity :]
        lanes = [sorted(first[j] for j in items) for items in balance([costs[i] for i in first], len(self.stacks))]
        self.groups = [] if rest else lanes  # slot j of lane l holds lanes[l][j] at the start
        queue, lock = iter(rest), threading.Lock()
        results: list[TrainResult | NonFiniteLossError | None] = [None] * len(documents)

        def lane_work(lane: int) -> None:
            own = iter(lanes[lane])

            def take() -> TrainJob | None:
                index = next(own, None)
                if index is None:
                    with lock:
                        index = next(queue, None)
                return None if index is None else TrainJob(index, documents[index], seeds[index])

            def finished(job: TrainJob, slot: int, result: TrainResult | NonFiniteLossError) -> None:
                if folders is not None and not isinstance(result, NonFiniteLossError):
                    self.stacks[lane].save(slot, folders[job.index])
                results[job.index] = result

            train_slots(self.stacks[lane], self.tokenizers[lane], take, config, finished)
            self.stacks[lane].count = max(1, len(lanes[lane]))

        run_lanes([partial(lane_work, lane) for lane in range(len(lanes))])
        return results

    def evaluate_saved(self, folders: Sequence[Path], questions: Sequence[Sequence[str]],
                       answers: Sequence[Sequence[Sequence[str]]], config: EvalConfig) -> list[EvalResult]:
        """:func:`evaluate_stacked` of saved adapters (``questions[i]`` for the one in
        ``folders[i]``), in the calling thread with all its threads: as many adapters at a time
        as one generation of ``config.batch_size`` rows takes, loaded straight into lane 0's
        stack, enlarged for the call (:meth:`AdapterStack.resized`). The lanes' own adapters
        are as they were afterwards."""
        if not len(folders) == len(questions) == len(answers):
            raise ValueError(f"{len(folders)} adapters, questions for {len(questions)}, answers for {len(answers)}")
        if not folders:
            return []
        chunks = adapter_chunks([len(q) for q in questions], config.batch_size)
        stack, results = self.stacks[0], []
        with stack.resized(max(stop - first for first, stop in chunks)):
            for first, stop in chunks:
                stack.load(folders[first:stop])
                results += evaluate_stacked(stack, self.tokenizers[0], questions[first:stop], answers[first:stop],
                                            config)
        return results

    def save(self, index: int, folder: Path) -> Path:
        """Adapter ``index`` of the group in PEFT's format (see :meth:`AdapterStack.save`).

        Raises:
            ValueError: if the adapter is not in a slot (a group that did not fit was saved to its
                folders as it trained)."""
        placement = self.placement
        if index >= len(placement):
            raise ValueError(f"adapter {index} is not in the lanes' slots: a group larger than they hold "
                             "is saved to its folders while it trains")
        lane, slot = placement[index]
        return self.stacks[lane].save(slot, folder)

    def close(self) -> None:
        """Put the original layers back on every replica."""
        for stack in self.stacks:
            stack.close()


@contextmanager
def stacked_adapters(model: PreTrainedModel, lora: LoraConfig, seeds: Sequence[int]) -> Iterator[AdapterStack]:
    """Attach ``len(seeds)`` fresh LoRA adapters to every target layer for the block; on exit
    the original layers are put back. (A worker keeps one :class:`AdapterStack` instead.)"""
    stack = AdapterStack.attach(model, lora, len(seeds))
    try:
        stack.reset(seeds)
        yield stack
    finally:
        stack.close()


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
    train_slots(stack, tokenizer, lambda: next(jobs, None), config,
                lambda job, slot, result: results.__setitem__(job.index, result))
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
        return TrainResult(steps=len(self.batches), tokens=self.tokens, mean_loss=sum(self.losses) / len(self.losses),
                           final_loss=self.losses[-1], seconds=time.perf_counter() - self.started)


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
    optimizer = StackedAdamW(stack.weights(), stack.capacity, max_grad_norm=config.max_grad_norm)

    def start(slot: int) -> _Slot | None:
        job = take()
        if job is None:
            return None
        if not job.documents:
            raise ValueError(f"adapter {job.index} has no documents")
        if job.seed is not None:
            stack.reset_slot(slot, job.seed)
        optimizer.reset(slot)
        return _Slot(job, _schedule(tokenize_documents(tokenizer, job.documents, config.max_length), config),
                     time.perf_counter())

    slots = [start(slot) for slot in range(stack.capacity)]
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
            rates = [0.0] * stack.capacity
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
        steps += [[sequences[i] for i in order[s : s + config.batch_size]]
                  for s in range(0, len(order), config.batch_size)]
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


def adapter_spans(row_adapters: Sequence[int], batch: PackedBatch) -> list[tuple[int, int, int]]:
    """``(adapter, start, stop)`` of each adapter's tokens in a packed batch whose rows are
    grouped by adapter (``row_adapters[i]``: row i's adapter)."""
    runs = _runs(row_adapters)
    if len({k for k, _, _ in runs}) != len(runs):
        raise ValueError(f"rows must be grouped by adapter, got {list(row_adapters)}")
    starts = batch.starts()
    return [(k, starts[first], starts[stop - 1] + batch.lengths[stop - 1]) for k, first, stop in runs]


def _runs(adapters: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(adapter, first, stop)`` of each run of equal consecutive entries of ``adapters``."""
    runs: list[tuple[int, int, int]] = []
    for i, k in enumerate(adapters):
        if runs and runs[-1][0] == k:
            runs[-1] = (k, runs[-1][1], i + 1)
        else:
            runs.append((k, i, i + 1))
    return runs


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
            outputs = answer_lines(stack.model, tokenizer, prompts[first:stop], max_new_tokens=config.max_new_tokens,
                                   on_rows=lambda left, adapters=adapters: stack.route(adapters[left]))
            predictions += [first_line(text) for text in outputs]
    finally:
        stack.route(None)
    return grade(predictions, answers, time.perf_counter() - start)
