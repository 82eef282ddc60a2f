"""Wall time, orchestration overhead and peak memory of the training flow, first run and rerun.

    python benchmarks/training_flow.py                                        # make run's config
    python benchmarks/training_flow.py --config deployments/configs/knowledge-tiny.yaml

Runs ``seal_training`` twice in one process (the second run must come from Prefect's cache),
then reads every task run from the Prefect API: overhead = flow wall time minus the sum of the
task runs' own run times, as a fraction of the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flows.cli import prepare_process

DEFAULT_CONFIG = Path(__file__).parents[1] / "deployments" / "configs" / "knowledge-smollm2.yaml"


def task_runs(since) -> list:
    """The leaf task runs that started after ``since`` (a subflow shows up as a task run wrapping
    it; its time is its tasks' time)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs, offset = {}, 0
        # Pages need a total order, or offsets skip some runs and repeat others.
        while batch := client.read_task_runs(
            task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=since)),
            sort=TaskRunSort.ID_DESC,
            offset=offset,
            limit=200,
        ):
            runs.update((run.id, run) for run in batch)
            offset += len(batch)
    return [r for r in runs.values() if not (r.state and r.state.state_details.child_flow_run_id)]


def task_seconds(runs: list) -> tuple[float, dict[str, int], dict[str, float]]:
    """Sum of the task runs' own run times, their states, and the run time by task function."""
    states: dict[str, int] = {}
    by_task: dict[str, float] = {}
    for run in runs:
        states[run.state_name] = states.get(run.state_name, 0) + 1
        name = run.task_key.rsplit("-", 1)[0]  # the task function, without its source hash
        by_task[name] = by_task.get(name, 0.0) + run.total_run_time.total_seconds()
    by_task = dict(sorted(by_task.items(), key=lambda item: -item[1]))
    return sum(r.total_run_time.total_seconds() for r in runs), states, by_task


def memory_by_task_run(samples: list[tuple[float, float]], runs: list) -> list[tuple[str, float, float, float]]:
    """``(name, start s, lowest MB, highest MB)`` of each task run that memory was sampled
    during (``samples``: ``(unix time, MB)``), in order of start: the highest says which task
    makes the peak, the lowest what stays resident between tasks."""
    if not samples:
        return []
    origin, rows = samples[0][0], []
    for run in sorted((r for r in runs if r.start_time and r.end_time), key=lambda r: r.start_time):
        first, last = run.start_time.timestamp(), run.end_time.timestamp()
        during = [mb for at, mb in samples if first <= at <= last]
        if during:
            rows.append((run.name, round(first - origin, 1), round(min(during)), round(max(during))))
    return rows


class TreeMemory:
    """Peak resident memory of this process plus its children (Prefect's temporary server),
    sampled every ``interval`` seconds in a background thread."""

    def __init__(self, interval: float = 0.5) -> None:
        import threading

        self.peak_mb = 0.0
        self.peak_at = 0.0  # seconds after the start
        self.peak_parts: dict[str, float] = {}  # MB per process at the peak
        self.samples: list[tuple[float, float]] = []  # (unix time, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)

    def _sample(self, interval: float) -> None:
        import psutil

        me, start = psutil.Process(), time.perf_counter()
        while not self._stop.wait(interval):
            parts = {}
            for proc in [me, *me.children(recursive=True)]:
                try:
                    parts[f"{proc.pid} {' '.join(proc.cmdline()[1:3])[:60]}"] = proc.memory_info().rss / 2**20
                except psutil.Error:  # exited between listing and reading
                    pass
            total = sum(parts.values())
            self.samples.append((time.time(), total))
            if total > self.peak_mb:
                self.peak_mb, self.peak_at, self.peak_parts = total, time.perf_counter() - start, parts

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    prepare_process()  # as the seal command does

    from datetime import datetime, timezone

    from flows.held_out import format_held_out
    from flows.training import seal_training
    from models.config import load_config
    from models.demo import peak_memory_mb

    config = load_config(args.config, args.overrides)
    report = {}
    with TreeMemory() as memory:
        for attempt in ("first", "rerun"):
            since = datetime.now(timezone.utc)
            start = time.perf_counter()
            result = seal_training(config)
            wall = time.perf_counter() - start
            runs = task_runs(since)
            busy, states, by_task = task_seconds(runs)
            report[attempt] = {
                "wall_s": wall,
                "task_s": busy,
                "tasks": len(runs),
                "states": states,
                "task_s_by_task": by_task,
                # each task run's lowest and highest memory, with the Prefect server
                "tree_memory_mb_by_task_run": memory_by_task_run(memory.samples, runs),
                "overhead_fraction": (wall - busy) / wall,
                "held_out": {label: r.correct | {"total": r.total} for label, r in result.held_out},
                "rewards": [r.metrics["reward_mean"] for r in result.iterations],
            }
            print(
                f"{attempt}: {wall:.1f}s wall, {busy:.1f}s in {len(runs)} task runs {states}, "
                f"overhead {report[attempt]['overhead_fraction']:.1%}; by task: "
                + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in by_task.items()),
                flush=True,
            )
        report["rerun_fraction"] = report["rerun"]["wall_s"] / report["first"]["wall_s"]
    report["peak_memory_mb"] = peak_memory_mb()
    report["peak_tree_memory_mb"] = memory.peak_mb
    report["peak_tree_memory_at_s"] = memory.peak_at  # when it happened, from the first run's start
    report["peak_tree_memory_parts_mb"] = memory.peak_parts
    print(format_held_out(result.held_out))
    print(
        f"rerun took {report['rerun_fraction']:.1%} of the first run; "
        f"same metrics: {report['first']['held_out'] == report['rerun']['held_out']}; "
        f"peak memory {report['peak_memory_mb']:.0f} MB (with the Prefect server: "
        f"{report['peak_tree_memory_mb']:.0f} MB)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
