"""Time to finish after a SIGKILL in iteration 2, against an uninterrupted run.

    python benchmarks/resume_after_kill.py --config deployments/configs/knowledge-tiny.yaml
    python benchmarks/resume_after_kill.py --full-seconds 1500    # make run's config; reuse a
                                                                  # measured full-run time

Runs ``seal run CONFIG`` as a user does, in a fresh SEAL_HOME (the converted models are copied
in), kills it with SIGKILL once iteration 2 has finished ``--after`` inner loops, then runs the
same command again and times it. From the rerun's log it counts the task runs that were computed
(Completed) and those that came from the cache (Cached). Unless ``--full-seconds`` is given, an
uninterrupted run in another fresh SEAL_HOME gives the time to compare with.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
DEFAULT_CONFIG = ROOT / "deployments" / "configs" / "knowledge-smollm2.yaml"
FINISHED = re.compile(r"Task run '([^']+)' - Finished in state (\w+)")


def fresh_home(parent: Path, name: str) -> dict[str, str]:
    from models.paths import seal_home

    home = parent / name
    home.mkdir()
    if (seal_home() / "models").is_dir():
        shutil.copytree(seal_home() / "models", home / "models")
    return {
        **os.environ,
        "SEAL_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect" / "storage"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
    }


def seal_run(config: str, overrides: list[str], env: dict[str, str]) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", config, *overrides]


def run_to_end(command: list[str], env: dict[str, str]) -> tuple[float, list[str]]:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, (done.stdout + done.stderr).splitlines()


def run_and_kill(command: list[str], env: dict[str, str], after: int) -> tuple[float, int]:
    """Start the run; SIGKILL it once iteration 2 has finished ``after`` inner loops."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    in_iteration_2, finished = False, 0
    for line in process.stdout:
        if "Beginning subflow run 'iteration-2'" in line:
            in_iteration_2 = True
        match = FINISHED.search(line)
        if in_iteration_2 and match and match.group(1).startswith("evaluate-adapter") and "edit" in match.group(1):
            finished += 1
            if finished >= after:
                process.send_signal(signal.SIGKILL)
                break
    process.wait()
    if finished < after:
        raise SystemExit(f"the run ended (code {process.returncode}) before iteration 2 had {after} inner loops")
    return time.perf_counter() - start, finished


def count_states(lines: list[str]) -> dict[str, int]:
    states: dict[str, int] = {}
    for line in lines:
        if match := FINISHED.search(line):
            states[match.group(2)] = states.get(match.group(2), 0) + 1
    return states


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--after", type=int, default=4, help="inner loops of iteration 2 to finish before the kill")
    parser.add_argument("--full-seconds", type=float, help="a measured uninterrupted run; skips running one")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    report: dict[str, object] = {"config": args.config, "overrides": args.overrides}
    with tempfile.TemporaryDirectory(prefix="seal-resume-") as tmp:
        env = fresh_home(Path(tmp), "killed")
        command = seal_run(args.config, args.overrides, env)
        killed_s, finished = run_and_kill(command, env, args.after)
        print(f"killed after {killed_s:.1f}s, {finished} inner loops into iteration 2", flush=True)
        rerun_s, lines = run_to_end(command, env)
        states = count_states(lines)
        print(f"rerun to the end: {rerun_s:.1f}s; task runs {states}", flush=True)
        report |= {
            "killed_after_s": killed_s,
            "iteration_2_inner_loops_before_kill": finished,
            "rerun_s": rerun_s,
            "rerun_task_states": states,
        }
        if args.full_seconds is None:
            full_env = fresh_home(Path(tmp), "full")
            full_s, full_lines = run_to_end(seal_run(args.config, args.overrides, full_env), full_env)
            report["full_task_states"] = count_states(full_lines)
            print(f"uninterrupted run: {full_s:.1f}s; task runs {report['full_task_states']}", flush=True)
        else:
            full_s = args.full_seconds
        report["full_s"] = full_s
        report["rerun_fraction"] = rerun_s / full_s
    print(
        f"after a kill in iteration 2 the rerun took {report['rerun_fraction']:.0%} of a full run "
        f"({rerun_s:.0f}s vs {full_s:.0f}s); computed {states.get('Completed', 0)} task runs, "
        f"{states.get('Cached', 0)} from the cache"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
