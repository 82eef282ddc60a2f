"""AdamW over stacked adapter weights: every adapter its own learning rate, step count and
gradient clipping, as if each were optimized alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class StackedAdamW:
    """AdamW (no weight decay) over stacked adapter weights, with a learning rate per adapter.

    The same arithmetic as ``torch.optim.AdamW`` applied to each adapter's slice on its own
    (AdamW is elementwise): adapter k's bias correction counts its own updates, and
    :meth:`reset` starts a slot over for the next adapter trained in it. An adapter given
    learning rate 0 is left as it is.
    With ``max_grad_norm``, each adapter's gradient is first clipped to that norm on its own, as
    ``torch.nn.utils.clip_grad_norm_`` would clip it alone.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        slots: int,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_grad_norm: float | None = None,
    ):
        self.params, self.slots, self.betas, self.eps = params, slots, betas, eps
        self.max_grad_norm = max_grad_norm
        self.exp_avg = [torch.zeros_like(p[:slots]) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p[:slots]) for p in params]
        self.steps = [0] * slots  # updates of each adapter so far
        # Adapter k's slices of the weights and moments, made once (thousands of views per step otherwise).
        with torch.no_grad():
            self._slices = [_by_adapter(tensors, slots) for tensors in (params, self.exp_avg, self.exp_avg_sq)]

    @torch.no_grad()
    def step(self, learning_rates: Sequence[float]) -> None:
        """One update; ``learning_rates[k]`` for adapter k (0: frozen this step, its gradient
        ignored). Each adapter's slices go through torch's fused AdamW kernel (one pass over
        weights, gradients and moments) with its own learning rate; clipping is that kernel's
        gradient scale, not a pass of its own."""
        beta1, beta2 = self.betas
        stacked = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        scales = self.clip_coefficients(stacked) if self.max_grad_norm is not None else None
        grads = _by_adapter(stacked, self.slots)
        weights, exp_avg, exp_avg_sq = self._slices
        for k, lr in enumerate(learning_rates[: self.slots]):
            if lr == 0:  # finished or failed adapters: no update, and a NaN gradient stays out
                continue
            self.steps[k] += 1
            step = torch.tensor(float(self.steps[k]), device=self.params[0].device)
            torch._fused_adamw_(
                weights[k],
                grads[k],
                exp_avg[k],
                exp_avg_sq[k],
                [],
                [step] * len(weights[k]),
                lr=float(lr),
                beta1=beta1,
                beta2=beta2,
                weight_decay=0.0,
                eps=self.eps,
                amsgrad=False,
                maximize=False,
                grad_scale=None if scales is None else 1 / scales[k],  # divides the gradient
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
        ``(slots,)``. One norm per stacked tensor covers every adapter."""
        slots = self.slots
        per_tensor = torch.stack([torch.linalg.vector_norm(g[:slots].reshape(slots, -1), dim=1) for g in grads])
        norms = torch.linalg.vector_norm(per_tensor, dim=0)
        return (self.max_grad_norm / (norms + 1e-6)).clamp_(max=1.0)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def _by_adapter(stacked: Sequence[torch.Tensor], slots: int) -> list[list[torch.Tensor]]:
    """``[[t[k] for t in stacked] for k in range(slots)]``, one ``unbind`` per tensor."""
    return [list(views) for views in zip(*(t.unbind(0)[:slots] for t in stacked))]
