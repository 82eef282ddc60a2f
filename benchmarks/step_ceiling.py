"""A stacked LoRA training step against the frozen model's own forward and backward (issue 8's ceiling).

    python benchmarks/step_ceiling.py --json benchmarks/results/step_ceiling-smollm2-cpu.json
    python benchmarks/step_ceiling.py --rows 2 4 --tokens 60 --steps 4

Every LoRA step computes at least what the frozen base model computes on its own: the forward
pass, the loss, and the backward pass through the frozen weights down to the first layer (the
gradients of the activations, which reach the adapters). LoRA adds its own products and the
optimizer. So the frozen model's forward and backward over the same rows, at the same
parallelism, bounds what any LoRA implementation on this model and framework can reach, and
the fraction of the matrix-multiply peak it achieves is the ceiling for issue 8's target.

For each ``--rows`` count r, in the config's ``inner_loop.lanes`` lanes (a thread each, with its
share of the cores, as the training flow runs them), the script times ``--steps`` steps twice on
the same rows (each row one document of ``--tokens`` words, as ``benchmarks/step_scaling.py``):

- **ours**: ``AdapterLanes.train`` of r adapters per lane, one row each per step (issue 8's LoRA
  settings, fp32 unless overridden): forward, loss, backward, per-adapter AdamW;
- **frozen**: each lane's r rows packed the same way through its replica of the model with no
  adapters: forward, loss, and backward to the input embeddings; no optimizer.

Both count 4 x parameters x tokens FLOPs (``benchmarks/inner_loop.py``'s formula) against this
machine's ``torch.mm`` peak, measured here. The best of ``--repeats`` timed runs is kept, after
an untimed one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Run as a script: the repository root on the path; offline and quiet as the seal command,
# before transformers reads its settings.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.cli import QUIET_ENV  # noqa: E402

for key, value in QUIET_ENV.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from benchmarks.inner_loop import COMPARISON, FLOPS_FORMULA, matmul_peak_gflops  # noqa: E402
from benchmarks.step_scaling import filler_row  # noqa: E402
from models.base_model import load_model  # noqa: E402
from models.config import load_config  # noqa: E402
from models.inner_loop import tokenize_documents  # noqa: E402
from models.lm_loss import token_losses  # noqa: E402
from models.packing import PackedBatch, pack_sequences, packed_attention  # noqa: E402
from models.process import configure_process  # noqa: E402
from models.stacked_lora import AdapterLanes, model_replicas, run_lanes  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parents[1] / "deployments" / "configs" / "knowledge-smollm2.yaml"


def frozen_step(model: PreTrainedModel, batch: PackedBatch) -> float:
    """The frozen model's forward pass over a packed batch, the sum of its next-token losses,
    and the backward pass down to the input embeddings (no parameter gets a gradient); returns
    the loss."""
    model.train()
    embeddings = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_()
    with packed_attention(model):
        losses = token_losses(model, None, batch.labels, inputs_embeds=embeddings, **batch.model_kwargs())
    total = losses.sum()
    total.backward()
    return total.item()


def _best_seconds(run, repeats: int) -> float:
    run()  # untimed: threads, allocator, first-call costs
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def time_ours(model: PreTrainedModel, tokenizer, config, row: str, rows: int, steps: int, repeats: int) -> float:
    """Seconds per step of ``rows`` adapters in each of the config's lanes, one row each."""
    lanes = config.inner_loop.lanes
    count = rows * lanes
    stack = AdapterLanes.attach(model, tokenizer, config.lora, slots=count, lanes=lanes)
    inner = config.inner_loop.model_copy(update={"epochs": steps, "max_batch_tokens": 1_000_000})
    try:
        seconds = _best_seconds(lambda: stack.train([[row]] * count, inner, seeds=list(range(count))), repeats)
    finally:
        stack.close()
    return seconds / steps


def time_frozen(model: PreTrainedModel, ids: list[int], lanes: int, rows: int, steps: int, repeats: int) -> float:
    """Seconds per step of :func:`frozen_step` over ``rows`` packed rows in each of ``lanes`` lanes."""
    requires_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    replicas = model_replicas(model, lanes)
    batch = pack_sequences([ids] * rows, model.device)

    def lane(replica: PreTrainedModel) -> None:
        for _ in range(steps):
            frozen_step(replica, batch)

    try:
        seconds = _best_seconds(lambda: run_lanes([lambda r=r: lane(r) for r in replicas]), repeats)
    finally:
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
        model.eval()
    return seconds / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 4], help="rows (adapters) per lane to time")
    parser.add_argument("--tokens", type=int, default=60, help="words per row (about as many tokens)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per count (the best is kept)")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides, after issue 8's")
    args = parser.parse_args(argv)
    configure_process()  # as the seal command does (models/process.py)

    config = load_config(args.config, COMPARISON + args.overrides)
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    parameters = sum(p.numel() for p in model.parameters())
    peak = matmul_peak_gflops(args.matmul_size, loaded.device, model.dtype)
    row = filler_row(args.tokens)
    (ids,) = tokenize_documents(tokenizer, [row], config.inner_loop.max_length)  # as training tokenizes it
    lanes = config.inner_loop.lanes
    print(
        f"{config.model.name} ({parameters / 1e6:.1f}M parameters, {config.model.dtype}), "
        f"{torch.get_num_threads()} threads in {lanes} lane(s); rows of {len(ids)} tokens; "
        f"{FLOPS_FORMULA}; matmul peak {peak:.1f} GFLOP/s",
        flush=True,
    )

    def rate(seconds: float, rows: int) -> tuple[float, float]:
        gflops = 4 * parameters * len(ids) * rows * lanes / seconds / 1e9
        return gflops, gflops / peak

    points = []
    for rows in args.rows:
        ours = time_ours(model, tokenizer, config, row, rows, args.steps, args.repeats)
        frozen = time_frozen(model, ids, lanes, rows, args.steps, args.repeats)
        (ours_gflops, ours_peak), (frozen_gflops, frozen_peak) = rate(ours, rows), rate(frozen, rows)
        points.append(
            {
                "rows_per_lane": rows,
                "tokens_per_row": len(ids),
                "ours_ms_per_step": ours * 1000,
                "ours_gflops": ours_gflops,
                "ours_fraction_of_peak": ours_peak,
                "frozen_ms_per_step": frozen * 1000,
                "frozen_gflops": frozen_gflops,
                "frozen_fraction_of_peak": frozen_peak,
                "ours_fraction_of_frozen": frozen / ours,
            }
        )
        print(
            f"{rows} rows x {lanes} lane(s): ours {ours * 1000:.0f} ms per step ({ours_gflops:.1f} GFLOP/s, "
            f"{ours_peak:.0%} of peak); frozen model alone {frozen * 1000:.0f} ms ({frozen_gflops:.1f} GFLOP/s, "
            f"{frozen_peak:.0%} of peak); ours at {frozen / ours:.0%} of the frozen model's rate",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "config": args.config,
                    "overrides": COMPARISON + args.overrides,
                    "model": config.model.name,
                    "device": str(loaded.device),
                    "threads": torch.get_num_threads(),
                    "lanes": lanes,
                    "parameters": parameters,
                    "flops_formula": FLOPS_FORMULA,
                    "matmul_peak_gflops": peak,
                    "steps": args.steps,
                    "repeats": args.repeats,
                    "points": points,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
