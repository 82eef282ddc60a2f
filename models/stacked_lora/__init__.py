"""K independent LoRA fine-tunes of one frozen base, trained in the same batches.

The K self-edits of a context are separate fine-tunes of the same base model. Training them one
after another multiplies small matrices K times; here one batch holds rows of every adapter,
each row routed through its own LoRA weights, so the base model's matrix multiplies get K times
more rows, which a small model's multiplies need to run near the hardware's rate
(benchmarks/README.md, "Stacked groups").

A step's rows are packed end to end (:mod:`models.packing`): no padding reaches the linear
layers, each adapter's rows are one span of the packed row, and attention stays within each row.
Each adapted layer is one function (:mod:`.layers`): the base's matrix multiply over all
tokens, then each adapter's products on its span, added in place into the base's output and
input gradient (no padding, no copies; faster than a padded ``bmm`` over the adapters, see
benchmarks/README.md). Generation routes whole batch rows: a batch grouped by adapter multiplies
each adapter's rows together, never copying weights per row.

A stack's adapters are slots (:func:`train_slots`): when one finishes its steps it is handed
over (saved) and the slot starts the next self-edit at the next step, so self-edits of 2 and 8
documents never leave a slot idle while the longest runs on: continuous batching, for fine-tunes.
How many adapters train at once is ``slots`` everywhere, from ``inner_loop.slots`` to the
leading dimension of each layer's stacked weights.

Equivalence with training each adapter alone: rows never interact in a causal LM's forward
pass, the loss is the sum of each adapter's own mean loss (so adapter k's gradient is the one
it would get alone), every adapter has its own learning-rate schedule and step count
(:class:`StackedAdamW`), and AdamW is elementwise, so its state is per adapter too.

One module per concept:

- :mod:`.layers`: the stacked LoRA layer and its autograd functions
- :mod:`.optimizer`: :class:`StackedAdamW`, AdamW per adapter
- :mod:`.stack`: :class:`AdapterStack`, the adapters on one model, routed, saved and loaded
- :mod:`.scheduler`: :func:`train_slots`, the slots kept busy; :func:`train_stacked`, one group
- :mod:`.evaluation`: :func:`evaluate_stacked`, closed-book answers in shared generations
- :mod:`.lanes`: threads sharing a model's weights; :class:`AdapterLanes`, a stack in each

    with stacked_adapters(model, lora, seeds=[0, 1, 2]) as stack:
        results = train_stacked(stack, tokenizer, [docs_0, docs_1, docs_2], config)
        stack.save(1, folder)  # PEFT format: loads with peft.PeftModel.from_pretrained
"""

from models.stacked_lora.evaluation import adapter_chunks, evaluate_stacked, row_batches
from models.stacked_lora.lanes import AdapterLanes, balance, model_replicas, run_lanes
from models.stacked_lora.layers import StackedLoraLinear
from models.stacked_lora.optimizer import StackedAdamW
from models.stacked_lora.stack import AdapterStack, adapter_spans, stacked_adapters
from models.stacked_lora.scheduler import TrainJob, length_groups, token_budget_parts, train_slots, train_stacked

__all__ = [
    "AdapterLanes",
    "AdapterStack",
    "StackedAdamW",
    "StackedLoraLinear",
    "TrainJob",
    "adapter_chunks",
    "adapter_spans",
    "balance",
    "evaluate_stacked",
    "length_groups",
    "model_replicas",
    "row_batches",
    "run_lanes",
    "stacked_adapters",
    "token_budget_parts",
    "train_slots",
    "train_stacked",
]
