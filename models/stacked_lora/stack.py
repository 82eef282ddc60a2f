"""An adapter stack: LoRA adapters attached to every target layer of one model, reused group
after group, with the routing of batch rows and packed spans to them and saving and loading in
PEFT's format.

    with stacked_adapters(model, lora, seeds=[0, 1, 2]) as stack:
        stack.route_spans(adapter_spans(row_adapters, batch))  # before each packed forward pass
        stack.save(1, folder)  # PEFT format: loads with peft.PeftModel.from_pretrained
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from models.config import LoraConfig
from models.inner_loop import atomic_folder, lora_config
from models.packing import PackedBatch
from models.stacked_lora.layers import RowSpans, StackedLoraLinear, TokenSpans


class AdapterStack:
    """``slots`` LoRA adapters attached to every target layer of a model, reused across groups.

    Attach once (:meth:`attach`), then for each group of inner loops :meth:`reset` the first
    adapters from their seeds (or :meth:`load` saved ones), :meth:`route` batch rows to them,
    and :meth:`save` each. While no rows are routed the model computes exactly its base outputs.
    :meth:`close` puts the original layers back.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        layers: dict[str, StackedLoraLinear],
        lora: LoraConfig,
        slots: int,
        frozen: list[nn.Parameter],
    ):
        self.model = model
        self.layers = layers
        self.lora = lora
        self.slots = slots
        self.count = slots  # adapters in use by the current group
        self._frozen = frozen

    @classmethod
    def attach(cls, model: PreTrainedModel, lora: LoraConfig, slots: int) -> AdapterStack:
        """Wrap every linear layer named in ``lora.target_modules`` with ``slots`` adapters.

        Raises:
            ValueError: if no layer matches ``lora.target_modules``.
        """
        targets = [
            (name, module)
            for name, module in model.named_modules()
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
            layers[name] = StackedLoraLinear(module, lora.rank, lora.alpha, lora.dropout, slots)
            setattr(model.get_submodule(parent_name), child, layers[name])
        return cls(model, layers, lora, slots, frozen)

    def matches(self, lora: LoraConfig) -> bool:
        """Whether ``lora`` describes this stack's layers (module order aside)."""
        return (lora.rank, lora.alpha, lora.dropout, set(lora.target_modules)) == (
            self.lora.rank,
            self.lora.alpha,
            self.lora.dropout,
            set(self.lora.target_modules),
        )

    def reset(self, seeds: Sequence[int]) -> None:
        """Fresh adapters 0..len(seeds)-1 for a new group; adapter k's A comes from ``seeds[k]``
        alone, so it starts the same whether it is trained alone or with others."""
        if not 0 < len(seeds) <= self.slots:
            raise ValueError(f"a group of {len(seeds)} adapters does not fit a stack of {self.slots}")
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
        if not 0 < len(folders) <= self.slots:
            raise ValueError(f"a group of {len(folders)} adapters does not fit a stack of {self.slots}")
        expected = {f"base_model.model.{name}.lora_{ab}.weight" for name in self.layers for ab in "AB"}
        for index, folder in enumerate(folders):
            state = load_file(Path(folder) / "adapter_model.safetensors")
            if set(state) != expected:
                missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
                raise ValueError(
                    f"adapter {folder} does not fit this stack: missing {missing[:2]}, unexpected {extra[:2]}"
                )
            for name, layer in self.layers.items():
                layer.lora_A[index].copy_(state[f"base_model.model.{name}.lora_A.weight"])
                layer.lora_B[index].copy_(state[f"base_model.model.{name}.lora_B.weight"])
        self.count = len(folders)

    @contextmanager
    def resized(self, slots: int) -> Iterator[AdapterStack]:
        """This stack with room for ``slots`` adapters (zero, no gradients) for the block, its
        own put back on exit: evaluating more adapters than training holds costs their weights
        only."""
        kept = {name: (layer.lora_A, layer.lora_B) for name, layer in self.layers.items()}, self.slots, self.count
        for layer in self.layers.values():
            a, b = layer.lora_A, layer.lora_B
            layer.lora_A = nn.Parameter(a.new_zeros((slots, *a.shape[1:])), requires_grad=False)
            layer.lora_B = nn.Parameter(b.new_zeros((slots, *b.shape[1:])), requires_grad=False)
        self.slots = self.count = slots
        try:
            yield self
        finally:
            weights, self.slots, self.count = kept
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
