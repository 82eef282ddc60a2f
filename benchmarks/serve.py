"""Time until `seal serve` answers on both health endpoints, and the memory of the idle servers.

    python benchmarks/serve.py --json benchmarks/results/serve-cpu.json

Starts `seal serve` on free ports in a fresh SEAL_HOME, polls the Prefect (`/api/health`) and
MLflow (`/health`) endpoints from the moment the command starts, waits until the deployments are
registered and the servers idle, then sums the resident memory of the whole process tree (the
serving process, the Prefect server, the MLflow server and its workers). Stops it with SIGTERM
and checks that nothing is left running.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def tree_rss_mb(pid: int) -> dict[str, float]:
    import psutil

    root = psutil.Process(pid)
    memory: dict[str, float] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            cmd = " ".join(proc.cmdline())
            name = (
                "seal serve (flows, deployments)"
                if proc.pid == pid
                else "prefect server"
                if "prefect" in cmd
                else "mlflow server"
                if "mlflow" in cmd or "uvicorn" in cmd or "gunicorn" in cmd
                else "other"
            )
            memory[name] = memory.get(name, 0.0) + proc.memory_info().rss / 2**20
        except psutil.Error:
            pass
    return memory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=15, help="seconds to idle before measuring memory")
    parser.add_argument("--json")
    args = parser.parse_args()
    import psutil

    prefect_port, mlflow_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="seal-serve-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env["SEAL_HOME"] = home
        start = time.monotonic()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "serve",
                "--prefect-port",
                str(prefect_port),
                "--mlflow-port",
                str(mlflow_port),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        urls = {
            "prefect": f"http://127.0.0.1:{prefect_port}/api/health",
            "mlflow": f"http://127.0.0.1:{mlflow_port}/health",
        }
        healthy: dict[str, float] = {}
        while len(healthy) < 2:
            if process.poll() is not None:
                raise SystemExit(f"seal serve exited with code {process.returncode}")
            for name, url in urls.items():
                if name not in healthy and answers(url):
                    healthy[name] = time.monotonic() - start
            time.sleep(0.1)
        deployments_url = f"http://127.0.0.1:{prefect_port}/api/deployments/filter"
        while True:
            request = urllib.request.Request(deployments_url, data=b"{}", headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as response:
                if len(json.load(response)) >= 4:
                    break
            time.sleep(0.5)
        registered = time.monotonic() - start
        time.sleep(args.idle)
        memory = tree_rss_mb(process.pid)
        children = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        time.sleep(1)
        left = [p.pid for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    report = {
        "healthy_s": max(healthy.values()),
        "prefect_healthy_s": healthy["prefect"],
        "mlflow_healthy_s": healthy["mlflow"],
        "deployments_registered_s": registered,
        "idle_rss_mb": memory,
        "idle_rss_total_mb": sum(memory.values()),
        "left_running": left,
    }
    print(
        f"both servers healthy after {report['healthy_s']:.1f}s (Prefect {healthy['prefect']:.1f}s, "
        f"MLflow {healthy['mlflow']:.1f}s); deployments served after {registered:.1f}s"
    )
    print(
        "idle memory: "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in memory.items())
        + f"; total {report['idle_rss_total_mb']:.0f} MB"
    )
    print(f"after SIGTERM: {len(left)} process(es) left running")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
