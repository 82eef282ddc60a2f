"""`seal doctor`: each failure gives its message and fix. The servers' answers come from a small
HTTP server replaying what Prefect and MLflow answer (status codes and JSON); tests/integration/test_stack.py
runs the doctor against the real servers."""

import json
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import free_port
from flows.doctor import FAIL, OK, WARN, check_mlflow, check_model, check_prefect, check_seal_home, check_work_pool

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def answers():
    """A server on 127.0.0.2 answering ``routes[(method, path, authorization)]`` (None: any)."""
    routes: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method):
            auth = self.headers.get("Authorization")
            path = self.path
            status, body = routes.get((method, path, auth), routes.get((method, path, None), (404, {"detail": "nope"})))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._answer("GET")

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._answer("POST")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield routes, f"http://127.0.0.2:{server.server_address[1]}"
    server.shutdown()


def basic(auth: str) -> str:
    import base64

    return "Basic " + base64.b64encode(auth.encode()).decode()


def only(checks):
    (check,) = checks
    return check


def test_prefect_unset_or_unreachable():
    check = only(check_prefect(None, None))
    assert check.status == FAIL and "PREFECT_API_URL is not set" in check.message
    check = only(check_prefect(f"http://127.0.0.1:{free_port()}/api", None, timeout=2))
    assert check.status == FAIL and "no Prefect server at" in check.message and "/api at the end" in check.message


def test_prefect_auth_missing_wrong_right_and_open(answers):
    routes, url = answers
    api = f"{url}/api"
    routes[("GET", "/api/health", None)] = (200, True)
    routes[("POST", "/api/flow_runs/filter", None)] = (401, {"exception_message": "Unauthorized"})
    routes[("POST", "/api/flow_runs/filter", basic("team:right"))] = (200, [])
    check = only(check_prefect(api, None))
    assert check.status == FAIL and "requires an auth string: export PREFECT_API_AUTH_STRING" in check.message
    check = only(check_prefect(api, "team:wrong"))
    assert check.status == FAIL and "refused PREFECT_API_AUTH_STRING (team:***)" in check.message
    assert "wrong" not in check.message  # never print the password
    assert only(check_prefect(api, "team:right")).status == OK
    # A server anyone may use, beyond this machine: a warning that says how to close it.
    routes[("POST", "/api/flow_runs/filter", None)] = (200, [])
    ok, warning = check_prefect(api, None)
    assert ok.status == OK and warning.status == WARN and "PREFECT_SERVER_API_AUTH_STRING" in warning.message


def test_mlflow_local_unreachable_and_auth(answers):
    routes, url = answers
    assert only(check_mlflow("sqlite:////tmp/x/mlflow.db", None, None)).status == OK
    check = only(check_mlflow(f"http://127.0.0.1:{free_port()}", None, None, timeout=2))
    assert check.status == FAIL and "no MLflow server at" in check.message
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    routes[("GET", "/health", None)] = (200, "OK")
    routes[("GET", search, None)] = (401, "You are not authenticated.")
    routes[("GET", search, basic("ann:ok"))] = (200, {"experiments": []})
    routes[("GET", search, basic("bob:ok"))] = (403, "Permission denied")
    check = only(check_mlflow(url, None, None))
    assert check.status == FAIL and "asks for a user: export MLFLOW_TRACKING_USERNAME" in check.message
    check = only(check_mlflow(url, "ann", "bad"))
    assert check.status == FAIL and "refused user 'ann'" in check.message and "bad" not in check.message
    check = only(check_mlflow(url, "bob", "ok"))
    assert check.status == FAIL and "may not read experiments" in check.message
    assert only(check_mlflow(url, "ann", "ok")).status == OK
    routes[("GET", search, None)] = (200, {"experiments": []})
    ok, warning = check_mlflow(url, None, None)
    assert warning.status == WARN and "--app-name basic-auth" in warning.message


def _worker(name: str, seconds_ago: float, status: str = "ONLINE") -> dict:
    beat = (NOW - timedelta(seconds=seconds_ago)).isoformat().replace("+00:00", "Z")
    return {"name": name, "status": status, "last_heartbeat_time": beat, "heartbeat_interval_seconds": 30}


@pytest.mark.parametrize(
    "pool, workers, status, message",
    [
        ({"missing": True}, [], FAIL, "no work pool 'seal' on"),
        ({"is_paused": True}, [], FAIL, "is paused: runs wait until `prefect work-pool resume seal`"),
        ({}, [], FAIL, "has never had a worker: runs will wait. Start one: prefect worker start --pool seal"),
        ({}, [_worker("gpu-1", 600, "OFFLINE")], FAIL, "no live worker: the last, gpu-1, was seen 600s ago"),
        (
            {},
            [_worker("gpu-1", 600, "OFFLINE"), _worker("gpu-2", 12)],
            OK,
            "1 live worker(s), e.g. gpu-2 (heartbeat 12s ago)",
        ),
    ],
)
def test_work_pool_messages(answers, pool, workers, status, message):
    routes, url = answers
    if not pool.get("missing"):
        routes[("GET", "/api/work_pools/seal", None)] = (
            200,
            {"name": "seal", "is_paused": pool.get("is_paused", False)},
        )
    routes[("POST", "/api/work_pools/seal/workers/filter", None)] = (200, workers)
    check = check_work_pool(f"{url}/api", None, "seal", now=NOW)
    assert check.status == status and message in check.message, check.message


def test_seal_home_unset_relative_unwritable_and_results_elsewhere(tmp_path):
    check = only(check_seal_home({}, ray_cluster=False))
    assert (
        check.status == FAIL
        and "SEAL_HOME is unset" in check.message
        and "export SEAL_HOME=/an/absolute/path" in check.message
    )
    check = only(check_seal_home({"SEAL_HOME": "rel/home"}, ray_cluster=False))
    assert check.status == FAIL and "'rel/home'" in check.message
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    check = only(check_seal_home({"SEAL_HOME": str(blocker / "home")}, ray_cluster=False))
    assert check.status == FAIL and "is not writable here (Not a directory)" in check.message
    home = tmp_path / "home"
    ok, warning = check_seal_home({"SEAL_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "s")}, False)
    assert ok.status == OK and warning.status == WARN and "outside SEAL_HOME" in warning.message
    assert (
        only(check_seal_home({"SEAL_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "s")}, False)).status
        == OK
    )


def test_seal_home_must_be_shared_for_a_ray_cluster(tmp_path):
    local = "/dev/sda1 / ext4 rw 0 0\n"
    _, check = check_seal_home({"SEAL_HOME": str(tmp_path)}, ray_cluster=True, mounts=local)
    assert check.status == FAIL and "on a ext4 filesystem, local to this machine" in check.message
    assert "Mount a shared filesystem" in check.message
    home = tmp_path / "seal"  # the longest mount point holding it wins: the NFS one, not /
    _, check = check_seal_home(
        {"SEAL_HOME": str(home)}, ray_cluster=True, mounts=local + f"fs:/export {home} nfs4 rw 0 0\n"
    )
    assert check.status == OK and "nfs4" in check.message


def test_model_resolves_or_says_how_to_get_it(tmp_path):
    check = check_model("/no/such/model", tmp_path)
    assert check.status == FAIL and "does not resolve here" in check.message and "save_pretrained" in check.message
    assert check_model("tiny-random", tmp_path).status == OK


def test_seal_doctor_exits_1_with_every_problem(monkeypatch, capsys, tmp_path):
    from flows.cli import main

    for key in ("PREFECT_API_URL", "SEAL_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] prefect: PREFECT_API_URL is not set" in out and "[FAIL] SEAL_HOME: SEAL_HOME is unset" in out
    assert out.rstrip().endswith("2 problem(s)")
