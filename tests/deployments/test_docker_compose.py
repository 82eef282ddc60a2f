"""docker-compose.yml is wired: URLs name real services, shared state is shared, ports stay local,
and it will not start without its secrets. (tests/integration/test_stack.py runs the stack's components.)"""

import configparser
import re
from pathlib import Path

import pytest

from compose import MissingVariable, interpolate, load_compose

ROOT = Path(__file__).parents[2]
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret",
    "PREFECT_API_AUTH_STRING": "team:prefect-secret",
    "MLFLOW_AUTH_ADMIN_USERNAME": "boss",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "mlflow-secret",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret",
}
COMPOSE = load_compose(SECRETS)
SERVICES = COMPOSE["services"]


def _environment(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def _texts(service: dict) -> list[str]:
    return [*_environment(service).values(), str(service.get("command", ""))]


def test_every_url_points_at_a_service_that_exists_on_its_port():
    ports = {"postgres": "5432", "prefect-server": "4200", "mlflow": "5000"}
    found = 0
    for name, service in SERVICES.items():
        for text in _texts(service):
            for host, port in re.findall(r"://(?:[^@/\s]+@)?([a-z][a-z0-9-]*):(\d+)", text):
                if host in ("127", "localhost"):
                    continue
                assert host in SERVICES, f"{name} points at unknown service {host!r}"
                assert ports[host] == port, f"{name} uses {host}:{port}, the service listens on {ports[host]}"
                found += 1
    assert found >= 4


def test_the_worker_talks_to_both_servers_and_reserves_a_gpu():
    worker = SERVICES["worker"]
    env = _environment(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert set(worker["depends_on"]) == {"prefect-server", "mlflow"}


def test_state_lives_in_named_volumes_shared_where_results_must_be():
    volumes = set(COMPOSE["volumes"])
    mounts = {name: {m.split(":")[0] for m in s.get("volumes", [])} for name, s in SERVICES.items()}
    assert "seal-home" in mounts["worker"] and _environment(SERVICES["worker"])["SEAL_HOME"] == "/seal"
    assert _environment(SERVICES["worker"])["PREFECT_LOCAL_STORAGE_PATH"].startswith("/seal/")
    assert "mlflow-artifacts" in mounts["mlflow"] and "postgres-data" in mounts["postgres"]
    used = {m for ms in mounts.values() for m in ms if not m.startswith(".")}
    assert used <= volumes


def test_one_postgres_holds_both_databases():
    sql = (ROOT / "deployments" / "docker" / "init-databases.sql").read_text()
    assert "CREATE DATABASE prefect" in sql and "CREATE DATABASE mlflow" in sql
    assert "@postgres:5432/prefect" in _environment(SERVICES["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "@postgres:5432/mlflow" in SERVICES["mlflow"]["command"]


def test_ports_bind_to_localhost_by_default_and_services_have_health_checks():
    assert load_compose(SECRETS | {"SEAL_BIND": "0.0.0.0"})["services"]["mlflow"]["ports"] == ["0.0.0.0:5000:5000"]
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
        if not name.endswith("worker"):
            assert "healthcheck" in service, name


@pytest.mark.parametrize("secret", sorted(SECRETS))
@pytest.mark.parametrize("value", [None, ""])
def test_compose_refuses_to_start_without_each_secret(secret, value):
    env = {k: v for k, v in SECRETS.items() if k != secret} | ({} if value is None else {secret: value})
    with pytest.raises(MissingVariable, match=f"{secret} is missing a value.*docs/deployment.md"):
        load_compose(env)


def test_no_secret_has_a_built_in_default():
    text = (ROOT / "docker-compose.yml").read_text()
    defaulted = set(re.findall(r"\$\{(\w+):?-", text))
    assert defaulted <= {"SEAL_BIND", "SEAL_RAY_WORKERS"}, defaulted
    example = (ROOT / "deployments/docker/team.env.example").read_text()
    assert set(SECRETS) <= set(re.findall(r"^(\w+)=", example, re.M))  # every secret is listed for .env


def test_every_service_requires_its_credentials():
    mlflow = SERVICES["mlflow"]
    assert "--app-name basic-auth" in mlflow["command"]  # always, not an option
    env = _environment(mlflow)
    assert (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == ("boss", "mlflow-secret")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "flask-secret"
    # The users live on a volume of their own, not in the container.
    ini = configparser.ConfigParser()
    ini.read(ROOT / env["MLFLOW_AUTH_CONFIG_PATH"].removeprefix("/app/"))
    database = ini["mlflow"]["database_uri"].removeprefix("sqlite:///")
    assert any(database.startswith(m.split(":")[1] + "/") for m in mlflow["volumes"] if not m.startswith("."))
    assert _environment(SERVICES["prefect-server"])["PREFECT_SERVER_API_AUTH_STRING"] == "team:prefect-secret"
    clients = [name for name, s in SERVICES.items() if "PREFECT_API_URL" in _environment(s)]
    assert {"worker", "ray-head", "ray-worker"} <= set(clients)
    for name in clients:
        assert _environment(SERVICES[name])["PREFECT_API_AUTH_STRING"] == "team:prefect-secret", name
    worker = _environment(SERVICES["worker"])
    assert (worker["MLFLOW_TRACKING_USERNAME"], worker["MLFLOW_TRACKING_PASSWORD"]) == ("boss", "mlflow-secret")
    assert worker["SEAL_REPO"] == "/app"  # the image's WORKDIR, where the flows' entrypoints lie
    assert "WORKDIR /app" in (ROOT / "Dockerfile").read_text()


@pytest.mark.parametrize(
    "text, env, expected",
    [
        ("${A}", {"A": "1"}, "1"),
        ("${A}", {}, ""),
        ("${A:-x}", {"A": ""}, "x"),
        ("${A-x}", {"A": ""}, ""),
        ("${A:+--flag $A}", {"A": "v"}, "--flag v"),
        ("${A:+--flag $A}", {}, ""),
        ("$$A", {"A": "v"}, "$A"),
    ],
)
def test_interpolation_follows_the_compose_specification(text, env, expected):
    assert interpolate(text, env) == expected


def test_the_ray_cluster_shares_seal_home_with_the_flows_and_gives_each_worker_a_gpu():
    head, worker = SERVICES["ray-head"], SERVICES["ray-worker"]
    assert head["profiles"] == worker["profiles"] == ["ray"]  # `docker compose up` alone starts no cluster
    assert "--ray-client-server-port=10001" in head["command"] and "--num-gpus=0" in head["command"]
    assert "--address=ray-head:6379" in worker["command"] and "--port=6379" in head["command"]
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    flows = _environment(SERVICES["worker"])  # the Ray driver: it runs the flows
    for node in (head, worker):
        env = _environment(node)
        assert "seal-home:/seal" in node["volumes"] and env["SEAL_HOME"] == flows["SEAL_HOME"]
        assert env["HF_HOME"] == flows["HF_HOME"] and env["HF_HOME"].startswith("/seal/")
        assert env["RAY_AUTH_MODE"] == flows["RAY_AUTH_MODE"]
        assert env["PREFECT_API_URL"] == flows["PREFECT_API_URL"]
