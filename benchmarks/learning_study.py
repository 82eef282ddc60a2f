"""The learning-quality study (issue 28): does SEAL beat training on the passage alone?

    python benchmarks/learning_study.py --json benchmarks/results/learning_study-smollm2-cpu.json
    python benchmarks/learning_study.py --config deployments/configs/knowledge-tiny.yaml rl.iterations=1

Runs the training flow on ``deployments/configs/knowledge-study.yaml`` (held-out evaluation
after every iteration) and reports the paper's Table 2 after each: every column with its 95 %
interval (a bootstrap over held-out contexts) and the paired difference policy self-edits -
passage only. The flow logs the same tables, the per-iteration self-edit measures and the
figure of the four columns (with error bars) to MLflow; the script writes them to ``--json``
and the figure beside it (``.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from flows.cli import QUIET_ENV, prefect_environment
from models.process import configure_process

DEFAULT_CONFIG = Path(__file__).parents[1] / "deployments" / "configs" / "knowledge-study.yaml"


def table_row(label: str, result) -> dict:
    """One held-out evaluation as JSON: per column correct, total, accuracy and interval."""
    row = {"policy": label, "columns": {}}
    for column in result.correct:
        estimate = result.interval(column)
        row["columns"][column] = {
            "correct": result.correct[column],
            "total": result.total_of(column),
            "accuracy": estimate.value,
            "low": estimate.low,
            "high": estimate.high,
        }
    difference = result.difference()
    row["difference"] = {
        "of": list(result.comparison),
        "value": difference.value,
        "low": difference.low,
        "high": difference.high,
    }
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--json", help="write the study's tables and curves to this file (and a .png beside it)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    configure_process()  # as the seal command does (models/process.py)
    prefect_environment()

    from flows.domains import domain_for
    from flows.held_out import format_held_out
    from flows.training import curves, seal_training
    from models.config import load_config

    config = load_config(args.config, [*args.overrides, "rl.eval_every=1"])
    start = time.perf_counter()
    result = seal_training(config)
    wall = time.perf_counter() - start
    print(domain_for(config).held_out_title)
    print(format_held_out(result.held_out))
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "wall_s": wall,
        "run_id": result.run_id,
        "held_out": [table_row(label, r) for label, r in result.held_out],
        "iterations": [{"iteration": r.iteration, **r.metrics} for r in result.iterations],
    }
    if args.json:
        path = Path(args.json)
        path.write_text(json.dumps(report, indent=2))
        curves(result.iterations, result.held_out).savefig(path.with_suffix(".png"), dpi=120)
    print(f"{wall / 60:.1f} min; MLflow run {result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
