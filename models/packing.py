"""Training rows packed end to end: no padding tokens in the linear layers.

A training step's rows differ in length (the K self-edits' documents are a few words to a few
lines). Padded to the longest, a step of five rows of 40-95 tokens multiplies a third more
rows than it trains on, and on a CPU the linear layers are nearly all of the time. Packed, the
rows are one sequence of their total length: the linear layers (and the LoRA adapters, routed
by token span) see only real tokens, positions restart at 0 for each row, and attention stays
within each row.

Attention is the one part that must know where rows start. Flash-attention-2/3 models take
the boundaries natively (``cu_seq_lens_q``/``cu_seq_lens_k``, transformers' varlen kwargs).
Every other implementation runs, inside :func:`packed_attention`, the ``seal_packed``
attention: it gathers each row's queries, keys and values into a right-padded batch, calls
causal SDPA, and scatters the outputs back. Causal attention never looks right, so a row's
padding never reaches its tokens, and attention costs what it would unpacked (transformers'
own packed path for SDPA builds a dense tokens x tokens mask instead, several times slower on a
CPU: benchmarks/README.md).

    batch = pack_sequences([[1, 2, 3], [4, 5]])
    with packed_attention(model):
        losses = token_losses(model, batch.input_ids, batch.labels, **batch.model_kwargs())
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from models.lm_loss import IGNORE_INDEX

PACKED_ATTENTION = "seal_packed"
_NATIVE_VARLEN = ("flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class PackedBatch:
    """Rows concatenated into one sequence of ``sum(lengths)`` tokens (batch dimension 1)."""

    input_ids: torch.Tensor  # (1, tokens)
    position_ids: torch.Tensor  # (1, tokens): 0..len-1 for each row
    labels: torch.Tensor  # (1, tokens): the input ids, IGNORE_INDEX at each row's first token
    lengths: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def starts(self) -> list[int]:
        """Offset of each row's first token."""
        offsets, total = [], 0
        for length in self.lengths:
            offsets.append(total)
            total += length
        return offsets

    def model_kwargs(self) -> dict:
        """What a transformers decoder needs besides ``input_ids``: positions restarting per
        row, the row boundaries (transformers' varlen kwargs) and no 2-D mask (none is padding)."""
        cumulative = torch.tensor([0, *self.lengths], device=self.input_ids.device).cumsum(0).to(torch.int32)
        longest = max(self.lengths)
        return {
            "attention_mask": None,
            "position_ids": self.position_ids,
            "use_cache": False,
            "cu_seq_lens_q": cumulative,
            "cu_seq_lens_k": cumulative,
            "max_length_q": longest,
            "max_length_k": longest,
        }


def pack_sequences(sequences: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> PackedBatch:
    """Concatenate token id rows. A row's first label is ignored: the token before it belongs
    to another row, so the loss has exactly the ``len - 1`` next-token targets of each row.

    Raises:
        ValueError: if there are no rows, or a row is empty.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pack_sequences needs at least one row and no empty rows")
    input_ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    position_ids = torch.cat([torch.arange(len(s)) for s in sequences])
    labels = input_ids.clone()
    first = torch.tensor([0, *[len(s) for s in sequences[:-1]]]).cumsum(0)
    labels[first] = IGNORE_INDEX
    return PackedBatch(
        input_ids=input_ids[None].to(device),
        position_ids=position_ids[None].to(device),
        labels=labels[None].to(device),
        lengths=tuple(len(s) for s in sequences),
    )


def _padded_layout(cu_seq_lens: torch.Tensor, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows ``cu_seq_lens[i]:cu_seq_lens[i+1]``, the packed position of each cell of a
    (rows, longest) right-padded batch (padding cells repeat the row's last token), and the
    flat cell of each packed token."""
    starts, lengths = cu_seq_lens[:-1].long(), cu_seq_lens.diff().long()
    column = torch.arange(longest, device=cu_seq_lens.device)
    gather = starts[:, None] + torch.minimum(column[None], lengths[:, None] - 1)
    cells = (column[None] < lengths[:, None]).flatten().nonzero().squeeze(1)
    return gather.flatten(), cells


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA within each packed row. ``query``: (1, heads, tokens, dim), keys and values
    likewise with their own head count; returns (1, tokens, heads, dim) as transformers'
    attention functions do. Without ``cu_seq_lens_q`` (generation, an unpacked batch) it is
    plain SDPA with the given mask."""
    cu_seq_lens = kwargs.pop("cu_seq_lens_q", None)
    if cu_seq_lens is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError(f"packed attention needs one packed row, got a batch of {query.shape[0]}")
    rows, longest = len(cu_seq_lens) - 1, int(kwargs.get("max_length_q") or cu_seq_lens.diff().max())
    gather, cells = _padded_layout(cu_seq_lens, longest)

    def padded(states: torch.Tensor) -> torch.Tensor:  # (1, h, tokens, d) -> (rows, h, longest, d)
        heads, dim = states.shape[1], states.shape[3]
        return states[0, :, gather].view(heads, rows, longest, dim).transpose(0, 1)

    out, _ = sdpa_attention_forward(
        module, padded(query), padded(key), padded(value), None, dropout=dropout, scaling=scaling, is_causal=True
    )
    # out: (rows, longest, heads, dim) -> the packed tokens' rows
    return out.flatten(0, 1)[cells][None], None


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_forward)
# Masks as for SDPA: an unpacked call keeps its padding mask (a packed one ignores its mask).
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


@contextmanager
def packed_attention(model: PreTrainedModel) -> Iterator[None]:
    """Within the block, ``model``'s attention honours packed rows (:meth:`PackedBatch.model_kwargs`).

    Flash-attention models already do; any other implementation is swapped for the
    ``seal_packed`` one (SDPA per row) and put back on exit. Unpacked calls inside the block
    (no ``cu_seq_lens_q``) are plain SDPA.
    """
    config = model.config
    original = config._attn_implementation
    if original in _NATIVE_VARLEN:
        yield
        return
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = original
