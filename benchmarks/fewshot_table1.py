"""The paper's Table 1 (few-shot ARC) measured with SmolLM2 on this CPU, with CPU time per self-edit.

    SEAL_HOME=/tmp/table1 python benchmarks/fewshot_table1.py \\
        --json benchmarks/results/fewshot-smollm2-cpu.json

Runs the SEAL training flow (``seal run``) of ``deployments/configs/fewshot-smollm2.yaml`` on a
few small-grid tasks, with the overrides below (sized to stay within ~25 minutes on 2 cores),
in a fresh SEAL_HOME: held-out Table 1 of the base model, one ReST-EM iteration on training
tasks, Table 1 again with the trained policy writing the configs. The four rows are the final
evaluation's: in-context learning; test-time training with the base model's self-edits (before
RL); SEAL (the policy's self-edits, after RL); oracle test-time training (a task counts when any
config of the grid search solves it). Self-edit rows count self-edits, the others tasks.

Time per self-edit = one inner loop (test-time training and prediction) of a valid config;
equal configs share one adapter, so each adapter counts once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from flows.cli import prepare_process

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "deployments" / "configs" / "fewshot-smollm2.yaml"
OVERRIDES = [
    "fewshot.train_task_ids=[6150a2bd, 5582e5ca, 8be77c9e, 67e8384a]",
    "fewshot.eval_task_ids=[66e6c45b, e633a9e5, 68b67ca3, 2072aba6]",
    "data.num_train_contexts=4",
    "data.num_eval_contexts=4",
    "self_edit.num_samples=5",
    "rl.iterations=1",
    "tracking.experiment=fewshot-table1",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the measurements to this file")
    parser.add_argument("overrides", nargs="*", help="more section.key=value overrides")
    args = parser.parse_args()
    prepare_process()  # as the seal command does
    import psutil

    from flows.fewshot import FEWSHOT
    from flows.held_out import format_held_out
    from flows.training import seal_training
    from models.config import load_config

    overrides = OVERRIDES + args.overrides
    config = load_config(CONFIG, overrides)
    cpu = psutil.Process()
    start, cpu_start = time.perf_counter(), cpu.cpu_times()
    result = seal_training(config)
    wall = time.perf_counter() - start
    cpu_end = cpu.cpu_times()
    cpu_seconds = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)

    final = result.held_out[-1][1]
    table = {
        column: {"solved": final.correct[column], "of": final.total_of(column), "rate": final.accuracy(column)}
        for column in final.correct
    }
    inner_loops = {}  # adapter folder -> seconds (an adapter counts once)
    for iteration in result.iterations:
        for row in iteration.rows:
            if row["adapter"]:
                inner_loops[row["adapter"]] = row["train_seconds"] + row["eval_seconds"]
    for _, held_out in result.held_out:
        for context in held_out.per_context:
            inner_loops.update({path: seconds for path, seconds in context["inner_loops"]})
    iteration = result.iterations[0]
    report = {
        "command": "SEAL_HOME=<fresh folder> python benchmarks/fewshot_table1.py "
        + " ".join(args.overrides)
        + " --json benchmarks/results/fewshot-smollm2-cpu.json",
        "config": str(CONFIG.relative_to(ROOT)),
        "overrides": overrides,
        "machine": f"{psutil.cpu_count()} CPU cores, no GPU",
        "model": config.model.name,
        "dtype": config.model.dtype,
        "table_1": table,
        "table_1_base_policy": {
            c: {"solved": result.held_out[0][1].correct[c], "of": result.held_out[0][1].total_of(c)}
            for c in result.held_out[0][1].correct
        },
        "per_task": final.per_context,
        "rl_iteration": {k: iteration.metrics[k] for k in ("reward_mean", "kept_count", "failed_self_edits")}
        | {
            "valid_configs": sum(1 for r in iteration.rows if r["config"]),
            "self_edits": len(iteration.rows),
            "policy_updated": result.policy.name != "base",
        },
        "inner_loops": len(inner_loops),
        "median_seconds_per_self_edit": statistics.median(inner_loops.values()) if inner_loops else None,
        "wall_seconds": wall,
        "process_cpu_seconds": cpu_seconds,
        "iteration_rows": [
            {
                k: r[k]
                for k in ("context_id", "self_edit", "reward", "config", "failure", "train_seconds", "eval_seconds")
            }
            for r in iteration.rows
        ],
        "mlflow_run_id": result.run_id,
    }
    print(FEWSHOT.held_out_title)
    print(format_held_out(result.held_out))
    print(
        f"median {report['median_seconds_per_self_edit'] or 0:.1f} s per self-edit over {len(inner_loops)} inner "
        f"loops; {wall:.0f} s wall, {cpu_seconds:.0f} s CPU (this process)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
