"""``seal doctor``: check a stack from a user's seat, one line per check, each failure with its fix.

    seal doctor                                   # this shell's PREFECT_API_URL, MLFLOW_TRACKING_URI, SEAL_HOME
    seal doctor --pool seal --config deployments/configs/knowledge-qwen2.5-7b.yaml
    docker compose exec worker seal doctor        # what the runners see

Checks: the Prefect server answers and accepts this shell's PREFECT_API_AUTH_STRING; the MLflow
server answers and accepts MLFLOW_TRACKING_USERNAME/PASSWORD (and neither accepts anyone when it
is shared); the work pool exists, is not paused and has a worker whose heartbeat is recent;
SEAL_HOME is absolute, writable, holds the results storage, and lies on a shared filesystem
where the runner is a Ray cluster; the config's model resolves here.
"""

from __future__ import annotations

import base64
import json
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

OK, WARN, FAIL = "ok", "warn", "FAIL"
# Filesystems that other machines see as well (SEAL_HOME on a Ray cluster).
SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "lustre", "beegfs", "gpfs", "9p", "virtiofs")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    message: str


def _get(url: str, auth: str | None = None, body: dict | None = None, timeout: float = 5) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a GET, or a POST when ``body`` is given; status 0: no answer."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode(errors="replace")
            status = response.status
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (OSError, ValueError) as error:
        return 0, str(getattr(error, "reason", error))
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def _loopback(url: str) -> bool:
    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def check_prefect(api_url: str | None, auth: str | None, timeout: float = 5) -> list[Check]:
    """The Prefect server answers its health check, and an API call with ``auth``."""
    if not api_url:
        return [
            Check(
                "prefect",
                FAIL,
                "PREFECT_API_URL is not set: each run would start a temporary server of "
                "its own. export PREFECT_API_URL=http://HOST:4200/api (the team stack's Prefect server)",
            )
        ]
    status, answer = _get(f"{api_url.rstrip('/')}/health", timeout=timeout)
    if status != 200:
        return [
            Check(
                "prefect",
                FAIL,
                f"no Prefect server at {api_url} ({status or answer}): is it running, and "
                "is PREFECT_API_URL its address with /api at the end?",
            )
        ]
    probe = f"{api_url.rstrip('/')}/flow_runs/filter"
    status, answer = _get(probe, auth, {"limit": 1}, timeout)
    if status == 401 and not auth:
        return [
            Check(
                "prefect",
                FAIL,
                f"the Prefect server at {api_url} requires an auth string: export "
                "PREFECT_API_AUTH_STRING=user:password (the stack's PREFECT_API_AUTH_STRING)",
            )
        ]
    if status == 401:
        return [
            Check(
                "prefect",
                FAIL,
                f"the Prefect server at {api_url} refused PREFECT_API_AUTH_STRING "
                f"({auth.split(':', 1)[0]}:***): use the user:password the server was started with",
            )
        ]
    if status != 200:
        return [
            Check("prefect", FAIL, f"the Prefect server at {api_url} answered {status} to {probe}: {str(answer)[:200]}")
        ]
    checks = [Check("prefect", OK, f"Prefect server at {api_url}" + (", authenticated" if auth else ""))]
    if not _loopback(api_url) and _get(probe, None, {"limit": 1}, timeout)[0] == 200:
        checks.append(
            Check(
                "prefect auth",
                WARN,
                f"the Prefect server at {api_url} accepts requests without "
                "credentials: anyone who reaches it can run flows. Start it with "
                "PREFECT_SERVER_API_AUTH_STRING=user:password (docker-compose.yml does)",
            )
        )
    return checks


def check_mlflow(tracking_uri: str, username: str | None, password: str | None, timeout: float = 5) -> list[Check]:
    """The MLflow server answers, and accepts this user; a local store is writable."""
    if not tracking_uri.startswith(("http://", "https://")):
        return [
            Check(
                "mlflow",
                OK if tracking_uri.startswith("sqlite:///") else WARN,
                f"MLflow store {tracking_uri} (local to this machine; a team's server is "
                "MLFLOW_TRACKING_URI=http://HOST:5000)",
            )
        ]
    base = tracking_uri.rstrip("/")
    status, answer = _get(f"{base}/health", timeout=timeout)
    if status != 200:
        return [
            Check(
                "mlflow",
                FAIL,
                f"no MLflow server at {tracking_uri} ({status or answer}): is it running, "
                "and is MLFLOW_TRACKING_URI its address?",
            )
        ]
    probe = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    auth = f"{username}:{password}" if username else None
    status, answer = _get(probe, auth, timeout=timeout)
    if status == 401 and not username:
        return [
            Check(
                "mlflow",
                FAIL,
                f"the MLflow server at {tracking_uri} asks for a user: export "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (an admin adds users in the MLflow UI)",
            )
        ]
    if status == 401:
        return [
            Check(
                "mlflow",
                FAIL,
                f"the MLflow server at {tracking_uri} refused user {username!r}: wrong "
                "MLFLOW_TRACKING_PASSWORD, or no such user (an admin adds users in the MLflow UI)",
            )
        ]
    if status == 403:
        return [
            Check(
                "mlflow",
                FAIL,
                f"MLflow user {username!r} may not read experiments at {tracking_uri}: "
                "ask an admin for READ (or more) on them",
            )
        ]
    if status != 200:
        return [Check("mlflow", FAIL, f"the MLflow server at {tracking_uri} answered {status}: {str(answer)[:200]}")]
    checks = [Check("mlflow", OK, f"MLflow server at {tracking_uri}" + (f", user {username!r}" if username else ""))]
    if not _loopback(tracking_uri) and _get(probe, None, timeout=timeout)[0] == 200:
        checks.append(
            Check(
                "mlflow auth",
                WARN,
                f"the MLflow server at {tracking_uri} accepts requests without a "
                "user: anyone who reaches it can read and delete runs. Start it with "
                "--app-name basic-auth (docker-compose.yml does)",
            )
        )
    return checks


def check_work_pool(
    api_url: str | None, auth: str | None, pool: str, now: datetime | None = None, timeout: float = 5
) -> Check:
    """The pool exists, is not paused, and a worker's heartbeat is recent."""
    if not api_url:
        return Check("work pool", FAIL, f"work pool {pool!r} not checked: PREFECT_API_URL is not set")
    base = api_url.rstrip("/")
    status, answer = _get(f"{base}/work_pools/{pool}", auth, timeout=timeout)
    if status == 404:
        return Check(
            "work pool",
            FAIL,
            f"no work pool {pool!r} on {api_url}: start a worker "
            f"(prefect worker start --pool {pool} --type process), which creates it",
        )
    if status != 200:
        return Check("work pool", FAIL, f"could not read work pool {pool!r} ({status}): see the prefect check")
    if answer.get("is_paused"):
        return Check(
            "work pool", FAIL, f"work pool {pool!r} is paused: runs wait until `prefect work-pool resume {pool}`"
        )
    status, workers = _get(f"{base}/work_pools/{pool}/workers/filter", auth, {}, timeout)
    now = now or datetime.now(timezone.utc)
    live, seen = [], []
    for worker in workers if status == 200 else []:
        if not worker.get("last_heartbeat_time"):
            continue
        beat = datetime.fromisoformat(worker["last_heartbeat_time"].replace("Z", "+00:00"))
        age = (now - beat).total_seconds()
        # Prefect calls a worker offline after 3 missed heartbeats.
        limit = 3 * (worker.get("heartbeat_interval_seconds") or 30)
        (live if worker.get("status") == "ONLINE" and age <= limit else seen).append((worker["name"], age))
    if live:
        name, age = min(live, key=lambda item: item[1])
        return Check(
            "work pool", OK, f"work pool {pool!r}: {len(live)} live worker(s), e.g. {name} (heartbeat {age:.0f}s ago)"
        )
    if seen:
        name, age = min(seen, key=lambda item: item[1])
        return Check(
            "work pool",
            FAIL,
            f"work pool {pool!r} has no live worker: the last, {name}, was seen "
            f"{age:.0f}s ago. Start one: prefect worker start --pool {pool} (docker compose up -d worker)",
        )
    return Check(
        "work pool",
        FAIL,
        f"work pool {pool!r} has never had a worker: runs will wait. Start one: "
        f"prefect worker start --pool {pool} (docker compose up -d worker)",
    )


def _filesystem(path: Path, mounts: str) -> str:
    """The type of the filesystem holding ``path``, from /proc/mounts' text."""
    best, kind = "", "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if (
            len(fields) >= 3
            and (str(path) + "/").startswith(fields[1].rstrip("/") + "/")
            and len(fields[1]) >= len(best)
        ):
            best, kind = fields[1], fields[2]
    return kind


def check_seal_home(env: Mapping[str, str], ray_cluster: bool, mounts: str | None = None) -> list[Check]:
    """SEAL_HOME is absolute and writable, holds the persisted results, and is shared where a Ray
    cluster's workers must read what this machine writes."""
    raw = env.get("SEAL_HOME")
    if not raw or not Path(raw).is_absolute():
        where = Path(raw or ".seal").absolute()
        return [
            Check(
                "SEAL_HOME",
                FAIL,
                f"SEAL_HOME is {'unset' if not raw else repr(raw)}: runs write to {where}, "
                "which changes with the working directory. export SEAL_HOME=/an/absolute/path that every "
                "runner mounts at that same path",
            )
        ]
    home = Path(raw)
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home, prefix=".doctor-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as error:
        return [
            Check(
                "SEAL_HOME",
                FAIL,
                f"SEAL_HOME {home} is not writable here ({error.strerror}): runs could "
                "not save adapters or results. Fix its owner or permissions, or choose another folder",
            )
        ]
    checks = [Check("SEAL_HOME", OK, f"SEAL_HOME {home} is writable")]
    storage = env.get("PREFECT_LOCAL_STORAGE_PATH")
    if storage and not Path(storage).is_relative_to(home):
        checks.append(
            Check(
                "results",
                WARN,
                f"results (PREFECT_LOCAL_STORAGE_PATH={storage}) lie outside SEAL_HOME: "
                "every runner must see both at the same paths for reruns to skip finished work",
            )
        )
    if ray_cluster:
        if mounts is None:
            mounts = Path("/proc/mounts").read_text() if Path("/proc/mounts").exists() else ""
        kind = _filesystem(home, mounts)
        if kind not in SHARED_FILESYSTEMS:
            checks.append(
                Check(
                    "SEAL_HOME shared",
                    FAIL,
                    f"SEAL_HOME {home} is on a {kind} filesystem, local to this "
                    "machine, but the config's runner is a Ray cluster: its workers load adapters and "
                    "policies from SEAL_HOME. Mount a shared filesystem (NFS) at the same path everywhere",
                )
            )
        else:
            checks.append(Check("SEAL_HOME shared", OK, f"SEAL_HOME is on {kind}, shared with the Ray workers"))
    return checks


def check_model(name: str, home: Path) -> Check:
    """The config's model resolves to a folder here (bundled, a local folder or the hub cache)."""
    from models.base_model import resolve_model
    from models.errors import ModelNotFoundError

    try:
        resolved = resolve_model(name, home)
    except ModelNotFoundError as error:
        return Check("model", FAIL, f"model {name!r} does not resolve here: {error}")
    return Check("model", OK, f"model {name!r} at {resolved.path}")


def run_checks(env: Mapping[str, str], pool: str, config, timeout: float = 5) -> list[Check]:
    from flows.tracking import default_tracking_uri
    from models.paths import seal_home

    api_url, auth = env.get("PREFECT_API_URL"), env.get("PREFECT_API_AUTH_STRING")
    checks = check_prefect(api_url, auth, timeout)
    tracking_uri = env.get("MLFLOW_TRACKING_URI") or default_tracking_uri(seal_home())
    checks += check_mlflow(
        tracking_uri, env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD"), timeout
    )
    if checks[0].status == OK:
        checks.append(check_work_pool(api_url, auth, pool, timeout=timeout))
    home_checks = check_seal_home(env, ray_cluster=config.runner.kind == "ray" and config.runner.address is not None)
    checks += home_checks
    if home_checks[0].status == OK:
        checks.append(check_model(config.model.name, Path(env["SEAL_HOME"])))
    return checks


def format_checks(checks: list[Check]) -> str:
    lines = [f"[{check.status:>4}] {check.name}: {check.message}" for check in checks]
    failed = sum(check.status == FAIL for check in checks)
    lines.append(f"{failed} problem(s)" if failed else "all checks passed")
    return "\n".join(lines)
