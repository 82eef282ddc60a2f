"""Continual self-adaptation (issue 29): wall time of the 8 x 8 forgetting experiment and its matrix.

    python benchmarks/continual.py --json benchmarks/results/continual-smollm2-cpu.json
    python benchmarks/continual.py --variants self_edit,passage_only,replay --json out.json
    python benchmarks/continual.py --variants self_edit,policy --policy models:/seal-policy@best
    python benchmarks/continual.py --config deployments/configs/knowledge-tiny.yaml \\
        continual.sequences=1 continual.passages=2

Runs the continual flow (``flows/continual.py``) once per variant, in this process:

- ``self_edit``: the config as it is (target on a 2-core CPU with the bundled SmolLM2: <= 30 min
  for 8 sequences x 8 passages);
- ``passage_only``: the comparison row, each step trained on its passage alone;
- ``replay``: a mitigation, ``continual.replay=--replay``;
- ``routed``: a mitigation, ``continual.adapters=routed`` (each step's adapter kept apart, each
  question routed to one);
- ``policy``: the self-edits written by ``--policy`` (a folder or ``models:/NAME@ALIAS``).

Each variant reports its wall time (a second run of the same config comes from the cache: use a
fresh ``SEAL_HOME`` to time it again; ``--rerun`` times that cached second run too), seconds per
step, where the time went by task (sampling, the merge steps, the unedited rows), the peak memory
of the process tree, the mean and std matrices and the measures. ``--json`` writes them all, and a
figure per variant beside it (``<name>-<variant>.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from flows.cli import prepare_process

DEFAULT_CONFIG = Path(__file__).parents[1] / "deployments" / "configs" / "continual-smollm2.yaml"
TARGET_S = 30 * 60  # 8 x 8 on the bundled SmolLM2, 2-core CPU


def variant_overrides(variant: str, args: argparse.Namespace) -> list[str]:
    """The overrides that make ``variant`` out of the config."""
    if variant == "self_edit":
        return []
    if variant == "passage_only":
        return ["continual.training=passage_only"]
    if variant == "replay":
        return [f"continual.replay={args.replay}"]
    if variant == "routed":
        return ["continual.adapters=routed"]
    if variant == "policy":
        if not args.policy:
            raise SystemExit("--variants policy needs --policy (a folder or models:/NAME@ALIAS)")
        return [f"continual.policy={args.policy}"]
    raise SystemExit(f"unknown variant {variant!r}; choose self_edit, passage_only, replay, routed or policy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument(
        "--variants",
        type=lambda text: text.split(","),
        default=["self_edit"],
        help="comma-separated: self_edit (default), passage_only, replay, routed, policy",
    )
    parser.add_argument("--replay", type=int, default=4, help="documents replayed per step (variant replay)")
    parser.add_argument("--policy", help="the trained writer of variant policy")
    parser.add_argument("--json", help="write the report here (and a figure per variant beside it)")
    parser.add_argument("--rerun", action="store_true", help="also time a second, cached run of each variant")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, for every variant")
    args = parser.parse_args(argv)
    prepare_process()  # as the seal command does

    from datetime import datetime, timezone

    import torch

    from benchmarks.training_flow import TreeMemory, task_runs, task_seconds
    from flows.continual import figures, format_summary, seal_continual
    from models.base_model import select_device
    from models.config import load_config

    configs = {v: load_config(args.config, [*args.overrides, *variant_overrides(v, args)]) for v in args.variants}
    first = next(iter(configs.values()))
    device, dtype = select_device(first.model.device, first.model.dtype)
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "processor": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        },
        "target_s": TARGET_S,
        "variants": {},
    }
    for variant, config in configs.items():
        since, start = datetime.now(timezone.utc), time.perf_counter()
        with TreeMemory() as memory:
            result = seal_continual(config)
        wall = time.perf_counter() - start
        busy, states, by_task = task_seconds(task_runs(since))
        rerun = None
        if args.rerun:
            again = time.perf_counter()
            seal_continual(config)
            rerun = time.perf_counter() - again
        steps = [step for r in result.sequences for step in r.steps]
        sequences, passages = config.continual.sequences, config.continual.passages
        report["variants"][variant] = {
            "continual": config.continual.model_dump(mode="json"),
            "wall_s": wall,
            "seconds_per_step": wall / len(steps),
            "train_seconds_per_step": sum(s.seconds for s in steps) / len(steps),
            "train_steps_per_step": sum(s.steps for s in steps) / len(steps),
            # The target is the paper's size (8 x 8); other sizes are scaled to it.
            "projected_8x8_s": wall * 64 / (sequences * passages),
            "meets_target": wall * 64 / (sequences * passages) <= TARGET_S,
            "task_s": busy,
            "task_states": states,
            "task_s_by_task": by_task,
            "peak_tree_memory_mb": memory.peak_mb,
            "rerun_wall_s": rerun,
            "run_id": result.run_id,
            **result.summary.as_json(),
            "kl": [[step.kl for step in r.steps] for r in result.sequences],
        }
        print(
            f"== {variant}: {wall / 60:.1f} min for {sequences} x {passages} ({wall / len(steps):.1f} s a step; "
            + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in by_task.items())
            + f"; peak {memory.peak_mb:.0f} MB)"
            + (f"; cached rerun {rerun:.1f}s" if rerun is not None else "")
            + f"; MLflow run {result.run_id}"
        )
        print(format_summary(result.summary, sequences))
        if args.json:  # after every variant: a run stopped later keeps the finished ones
            path = Path(args.json)
            figures(result.summary).savefig(path.with_name(f"{path.stem}-{variant}.png"), dpi=120)
            path.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
