"""Self-edits evaluated per minute with 1 and 2 Ray workers: one E-step on the bundled SmolLM2.

    python benchmarks/ray_throughput.py                    # 1 and 2 workers, 4 contexts x 3 self-edits
    python benchmarks/ray_throughput.py --workers 1 2 4 --contexts 8

For each worker count: a fresh SEAL_HOME (nothing cached; the converted model is linked in from
``--models``), a local Ray instance whose workers split this machine's cores (cores / workers
torch threads each), and one iteration from the base policy. Self-edits per minute = self-edits
/ E-step seconds: sampling, baselines, inner loops, with the workers' start (imports) inside;
the M-step after it is not counted. The per-self-edit costs in the JSON are what the throughput
model in docs/ray.md starts from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flows.cli import prepare_process

ROOT = Path(__file__).parents[1]
DEFAULT_CONFIG = ROOT / "deployments" / "configs" / "knowledge-smollm2.yaml"


# Task-run name prefixes; knowledge inner loops run in groups (train-adapters-..., one task per
# inner_loop.group_size self-edits), few-shot ones one per self-edit (train-adapter-...).
TASK_KINDS = {
    "sample-self-edits": "sampling",
    "train-adapter": "training",
    "evaluate-adapter": "evaluation",
    "evaluate-baseline": "baseline",
    "update-policy": "m_step",
}


def task_breakdown(workers: int) -> dict:
    """Where the workers' time went in the E-step of ``ray-throughput-{workers}-workers``, from the
    Prefect API: seconds per task run by kind (Prefect's run time, in the worker) and the busy
    fraction, the summed run time over workers x the E-step's wall time (first task start to last
    E-step task end). What is not busy is orchestration (task run creation, Ray dispatch, result
    round trips), worker start, and waiting on sampling."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        (parent,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[f"ray-throughput-{workers}-workers"]))
        )
        (iteration,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))
        )
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[iteration.id])), limit=200
        )
    seconds: dict[str, list[float]] = {}
    for run in runs:
        kind = next((k for prefix, k in TASK_KINDS.items() if run.name.startswith(prefix)), "other")
        if kind == "evaluation" and run.name.endswith("-baseline"):
            kind = "baseline"
        seconds.setdefault(kind, []).append(run.total_run_time.total_seconds())
    e_step = [r for r in runs if r.start_time and not r.name.startswith(("update-policy", "fetch-", "select-"))]
    wall = (max(r.end_time for r in e_step) - min(r.start_time for r in e_step)).total_seconds()
    busy = sum(r.total_run_time.total_seconds() for r in e_step)
    return {
        "task_seconds_mean": {k: round(statistics.mean(v), 2) for k, v in sorted(seconds.items())},
        "task_runs": {k: len(v) for k, v in sorted(seconds.items())},
        "e_step_task_wall_seconds": round(wall, 1),
        "worker_busy_fraction": round(busy / (workers * wall), 3),
    }


def measure(config_path: Path, overrides: list[str], workers: int, models: Path, scratch: Path) -> dict:
    """One E-step on a fresh local Ray instance of ``workers`` workers; nothing cached."""
    from prefect import flow

    from flows.runner import on_runner, ray_cluster, worker_threads
    from flows.training import run_iteration, verified_policy
    from models.config import load_config
    from tasks.policy import resolve_base_policy

    home = scratch / f"home-{workers}"
    home.mkdir(parents=True)
    (home / "models").symlink_to(models, target_is_directory=True)
    os.environ["SEAL_HOME"] = str(home)
    config = load_config(
        config_path,
        [
            *overrides,
            "runner.kind=ray",
            f"runner.num_workers={workers}",
            f"runner.result_storage={scratch / f'results-{workers}'}",
        ],
    )

    @flow(name=f"ray-throughput-{workers}-workers")
    def e_step() -> dict:
        base = verified_policy(resolve_base_policy, config.model)
        start = time.perf_counter()
        with ray_cluster(config.runner):
            ray_start = time.perf_counter() - start
            result = on_runner(run_iteration, config.runner)(config, base, 1)
        return {"ray_start_seconds": ray_start, "rows": result.rows, "metrics": result.metrics}

    load_before = os.getloadavg()
    out = e_step()
    rows, metrics = out["rows"], out["metrics"]
    inner_loops = [r["train_seconds"] + r["eval_seconds"] for r in rows if not r["failure"]]
    seconds = metrics["e_step_seconds"]
    return {
        "workers": workers,
        "torch_threads_per_worker": worker_threads(config.runner),
        "self_edits": len(rows),
        "e_step_seconds": round(seconds, 1),
        "self_edits_per_minute": round(len(rows) / seconds * 60, 2),
        # Worker-seconds one self-edit costs, all included (its share of sampling and baselines,
        # orchestration, worker start): what a cluster of W workers divides by W.
        "worker_seconds_per_self_edit": round(workers * seconds / len(rows), 1),
        "inner_loop_seconds_median": round(statistics.median(inner_loops), 1),
        "inner_loop_seconds_mean": round(statistics.mean(inner_loops), 1),
        "m_step_seconds": round(metrics["m_step_seconds"], 1),
        "ray_start_seconds": round(out["ray_start_seconds"], 1),
        **task_breakdown(workers),
        "reward_mean": metrics["reward_mean"],
        "load_average_1min_before": round(load_before[0], 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--contexts", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3, help="inner_loop.epochs (the config's: 8)")
    parser.add_argument(
        "--models",
        type=Path,
        default=None,
        help="converted models to link in (default: $SEAL_HOME/models, else ./.seal/models)",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "ray_throughput-cpu.json")
    args = parser.parse_args()
    prepare_process(prefect=False)  # as the seal command does
    models = (args.models or Path(os.environ.get("SEAL_HOME", ".seal")) / "models").absolute()
    overrides = [f"data.num_train_contexts={args.contexts}", f"inner_loop.epochs={args.epochs}"]

    scratch = Path(tempfile.mkdtemp(prefix="seal-ray-throughput-"))
    os.environ["PREFECT_HOME"] = str(scratch / "prefect")  # one temporary Prefect server for all runs
    (scratch / "prefect").mkdir()
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    runs = []
    for workers in args.workers:
        runs.append(measure(args.config, overrides, workers, models, scratch))
        print(json.dumps(runs[-1]), flush=True)
    first = runs[0]
    report = {
        "command": "python benchmarks/ray_throughput.py " + " ".join(sys.argv[1:]),
        "config": os.path.relpath(args.config, ROOT),
        "overrides": overrides + ["self_edit.num_samples from the config"],
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "runs": runs,
        "throughput_ratio_vs_first": {
            str(r["workers"]): round(r["self_edits_per_minute"] / first["self_edits_per_minute"], 2) for r in runs
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["throughput_ratio_vs_first"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
