"""Seconds per stacked training step against the number of adapters in it (issue 8's cost model).

    python benchmarks/step_scaling.py --json benchmarks/results/step_scaling-smollm2-cpu.json
    python benchmarks/step_scaling.py --adapters 1 2 5 --tokens 120

Each adapter trains on one row of ``--tokens`` tokens per step (batch size 1, as the paper's
inner loop), so a step of n adapters holds n rows. The script times ``--steps`` steps for each n
(best of ``--repeats`` runs, after an untimed one) with issue 8's LoRA settings (r=32, alpha=64,
fp32 unless overridden), and fits step time = fixed + n x per-row over the counts up to
``--fit-up-to`` adapters. The fixed part is what a step costs whatever it holds (per-layer
operations, the autograd engine, Python); the per-row part is set against the base model's
matrix-multiply floor at this machine's measured ``torch.mm`` peak (4 x parameters FLOPs per
token trained, as ``benchmarks/inner_loop.py`` counts them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

from benchmarks.inner_loop import COMPARISON, matmul_peak_gflops  # noqa: E402
from models.base_model import load_model  # noqa: E402
from models.config import load_config  # noqa: E402
from models.process import configure_process  # noqa: E402
from models.stacked_lora import stacked_adapters, train_stacked  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parents[1] / "deployments" / "configs" / "knowledge-smollm2.yaml"
# Issue 8's hyperparameters, as benchmarks/inner_loop.py sets them; every row of a step in one batch.
SETTINGS = [*COMPARISON, "inner_loop.max_batch_tokens=100000"]
WORDS = "the river floods every spring and its mayor is elected by lot while the old bridge".split()


def filler_row(words: int) -> str:
    """A document of ``words`` words (about as many tokens), :data:`WORDS` repeated."""
    return " ".join((WORDS * (words // len(WORDS) + 1))[:words])


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``ys`` against ``xs``."""
    try:
        slope, intercept = statistics.linear_regression(xs, ys)
    except statistics.StatisticsError as exc:
        raise ValueError(f"a line needs at least two different adapter counts, got {xs}") from exc
    return intercept, slope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 5, 10], help="adapter counts to time")
    parser.add_argument("--tokens", type=int, default=60, help="words per row (about as many tokens)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per count (the best is kept)")
    parser.add_argument("--fit-up-to", type=int, default=5, help="fit the line over counts up to this")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides, after the settings above")
    args = parser.parse_args(argv)
    configure_process()  # as the seal command does (models/process.py)

    config = load_config(args.config, SETTINGS + [f"inner_loop.epochs={args.steps}", *args.overrides])
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
    parameters = sum(p.numel() for p in loaded.model.parameters())
    peak = matmul_peak_gflops(args.matmul_size, loaded.device, loaded.model.dtype)
    row = filler_row(args.tokens)
    warm = config.inner_loop.model_copy(update={"epochs": 1})
    points = []
    for count in args.adapters:
        documents = [[row]] * count
        with stacked_adapters(loaded.model, config.lora, list(range(count))) as stack:
            train_stacked(stack, loaded.tokenizer, documents, warm)
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                results = train_stacked(stack, loaded.tokenizer, documents, config.inner_loop)
                runs.append((time.perf_counter() - start) / results[0].steps)
        tokens = results[0].tokens // results[0].steps
        points.append(
            {
                "adapters": count,
                "tokens_per_row": tokens,
                "ms_per_step": min(runs) * 1000,
                "runs_ms": [r * 1000 for r in runs],
            }
        )
        print(
            f"{count:3} adapters x {tokens} tokens: {min(runs) * 1000:.0f} ms per step "
            f"({min(runs) * 1000 / count:.0f} ms per row)",
            flush=True,
        )

    fitted = [p for p in points if p["adapters"] <= args.fit_up_to]
    fixed, per_row = fit_line([p["adapters"] for p in fitted], [p["ms_per_step"] for p in fitted])
    tokens = points[0]["tokens_per_row"]
    floor = 4 * parameters / (peak * 1e9) * 1000  # ms per token at the matmul peak
    print(
        f"fit over {[p['adapters'] for p in fitted]} adapters: {fixed:.0f} ms per step + {per_row:.0f} ms per row "
        f"({per_row / tokens:.2f} ms per token); base model's matmul floor at {peak:.1f} GFLOP/s: "
        f"{floor:.2f} ms per token"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "config": args.config,
                    "overrides": SETTINGS + args.overrides,
                    "model": config.model.name,
                    "device": str(loaded.device),
                    "threads": torch.get_num_threads(),
                    "parameters": parameters,
                    "matmul_peak_gflops": peak,
                    "steps": args.steps,
                    "points": points,
                    "fit": {
                        "adapters": [p["adapters"] for p in fitted],
                        "fixed_ms_per_step": fixed,
                        "ms_per_row": per_row,
                        "ms_per_token": per_row / tokens,
                    },
                    "matmul_floor_ms_per_token": floor,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
