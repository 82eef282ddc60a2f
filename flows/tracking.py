"""Experiment tracking for the flows: one small interface, an MLflow implementation and a null one.

Flows own the runs; ``models/`` returns numbers and paths and never imports this module.

    tracker = MlflowTracker(default_tracking_uri(home), "seal", "seal-policy", run_name="t1", tags={})
    tracker.log_params(config.flat())
    tracker.log_metrics({"reward/mean": 0.4}, step=1)
    version = tracker.register_policy(policy_dir, aliases=["latest"])
    tracker.finish()
    folder = resolve_policy_uri(tracking_uri, "models:/seal-policy@latest")

MLflow's fluent API (``mlflow.start_run``) keeps the active run per thread, and the flows run tasks
in thread pools, so :class:`MlflowTracker` goes through ``MlflowClient`` and passes its run id in
every call.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from models.config import TrackingConfig

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow reserves the alias "latest": ``models:/NAME@latest`` always means the highest version.
LATEST = "latest"


class Tracker(Protocol):
    """What a flow logs. Keys are flat (``"lora.rank"``), artifact paths are run-relative."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: dict[str, Any]) -> None:
        """Log hyperparameters once per run; values are stringified."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalars at ``step`` (the RL iteration)."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set (or overwrite) run tags."""

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Log rows as a table artifact, e.g. ``"self_edits/iteration-1.json"``."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log a text artifact."""

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        """Log a folder (an adapter) under ``artifact_path``."""

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib figure as an image, then close it (pyplot keeps every open figure)."""

    def register_policy(self, policy_dir: Path, *, aliases: list[str], description: str = "", digest: str = "") -> str:
        """Register a policy folder as a new model version (once per digest); return the version."""

    def set_alias(self, version: str, alias: str) -> None:
        """Point ``alias`` (e.g. ``"best"``) at ``version`` of the registered model."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED."""


class NullTracker:
    """A tracker that logs nothing, for tests and notebooks (nanochat's ``DummyWandb``)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass

    def register_policy(self, policy_dir: Path, *, aliases: list[str], description: str = "", digest: str = "") -> str:
        return "0"

    def set_alias(self, version: str, alias: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


# MLflow error codes worth another try: the server or its database was briefly unavailable.
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ABORTED"}


def is_transient(error: BaseException) -> bool:
    """Whether a tracking call failed for a reason that may pass: I/O, the network, a locked or
    restarting store. "Not found" or "invalid value" are answers, not transient failures."""
    if isinstance(error, (OSError, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, MlflowException):
        return error.error_code in _TRANSIENT_CODES or "database is locked" in str(error)
    return type(error).__module__.startswith(("requests", "urllib3", "sqlalchemy"))


class RetryingClient:
    """An ``MlflowClient`` whose calls retry transient failures with exponential backoff.

    Args:
        client: the client to wrap.
        attempts: tries per call, the first included.
        first_delay: seconds before the second try; doubled before each next one.
    """

    def __init__(self, client: MlflowClient, attempts: int = 4, first_delay: float = 0.5) -> None:
        self._client = client
        self._attempts = attempts
        self._first_delay = first_delay

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(self._attempts):
                try:
                    return attribute(*args, **kwargs)
                except Exception as error:
                    if attempt == self._attempts - 1 or not is_transient(error):
                        raise
                    time.sleep(self._first_delay * 2**attempt)
            raise AssertionError("unreachable")

        return call


class MlflowTracker:
    """One MLflow run, addressed by id in every call so any thread may log to it.

    Args:
        tracking_uri: e.g. ``sqlite:////abs/path/mlflow.db`` (see :func:`default_tracking_uri`).
        experiment: experiment name; created if missing.
        registered_model: the registered model that :meth:`register_policy` adds versions to.
        run_name: name of a new run (ignored when resuming).
        tags: run tags, set on a new run and again on a resumed one.
        run_id: resume this run (status goes back to RUNNING) instead of creating one.

    Raises:
        ValueError: ``run_id`` does not exist or belongs to another experiment, or the experiment
            was deleted.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        registered_model: str,
        run_name: str,
        tags: dict[str, str],
        run_id: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.registered_model = registered_model
        self.client = RetryingClient(MlflowClient(tracking_uri))
        self.experiment_id = _experiment_id(self.client, tracking_uri, experiment)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        else:
            run = self._resume(run_id, experiment)
        self.run_id: str = run.info.run_id
        self.resumed = run_id is not None
        self.artifact_uri: str = run.info.artifact_uri
        # (key, step) pairs already in the run: a resumed flow logs each point once.
        self._logged: set[tuple[str, int]] = set()
        if run_id is not None:
            self.set_tags(tags)
            for key in run.data.metrics:
                self._logged |= {(key, m.step) for m in self.client.get_metric_history(run_id, key)}

    def _resume(self, run_id: str, experiment: str):
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            raise ValueError(
                f"Cannot resume MLflow run {run_id!r}: it is not in {self.tracking_uri} ({e.message}). "
                "Pass run_id=None to start a new run, or the tracking URI the run was logged to."
            ) from e
        if run.info.experiment_id != self.experiment_id:
            raise ValueError(
                f"Cannot resume MLflow run {run_id!r} in experiment {experiment!r}: it belongs to "
                f"experiment id {run.info.experiment_id}. Use that experiment or start a new run."
            )
        self.client.update_run(run_id, status="RUNNING")
        return run

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; re-logging an equal value is a no-op (resume), a different one an error.

        Raises:
            ValueError: a key was already logged in this run with another value.
        """
        values = {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in params.items()}
        logged = self.client.get_run(self.run_id).data.params
        changed = {k: (logged[k], v) for k, v in values.items() if k in logged and logged[k] != v}
        if changed:
            listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"MLflow params cannot change within a run, and run {self.run_id} already has "
                f"different values for {listing}. Start a new run (run_id=None) for a new config, "
                "or log the changing value as a metric or tag."
            )
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalars at ``step``; a (key, step) already in the run is not logged again."""
        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step) for key, value in metrics.items() if (key, step) not in self._logged
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)
            self._logged |= {(m.key, step) for m in batch}

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Log rows as an MLflow table (``.json`` or ``.parquet``); the UI shows it as a table.

        MLflow appends to a table file that already exists, so a file already in the run (a
        resumed flow logging the same iteration again) is left as it is.
        """
        folder = str(Path(artifact_file).parent) if Path(artifact_file).parent != Path(".") else None
        if any(f.path == artifact_file for f in self.client.list_artifacts(self.run_id, folder)):
            return
        columns = {key: [row.get(key) for row in rows] for key in dict.fromkeys(k for r in rows for k in r)}
        self.client.log_table(self.run_id, columns, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        """Log the files under ``local_dir`` (an adapter folder) below ``artifact_path``.

        Raises:
            FileNotFoundError: ``local_dir`` is not a folder.
        """
        _require_folder(local_dir, "log_artifacts")
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        try:
            self.client.log_figure(self.run_id, figure, artifact_file)
        finally:
            plt.close(figure)

    def register_policy(self, policy_dir: Path, *, aliases: list[str], description: str = "", digest: str = "") -> str:
        """Log ``policy_dir`` under ``policies/<folder name>`` and register it as a new version.

        A policy with the same ``digest`` already registered from this run (a resumed flow) is
        not registered twice: its version is returned.

        The model version points at the run artifact, so the weights are stored once. A folder
        name already used in this run gets a suffix (``policy-2``) rather than overwriting the
        files an earlier version points at. ``"latest"`` in ``aliases`` needs no setting: MLflow
        resolves ``models:/NAME@latest`` to the highest version.

        Returns:
            The new version, e.g. ``"3"``.

        Raises:
            FileNotFoundError: ``policy_dir`` is not a folder.
        """
        _require_folder(policy_dir, "register_policy")
        if digest:
            for existing in self.client.search_model_versions(
                f"name='{self.registered_model}' and run_id='{self.run_id}'"
            ):
                if existing.tags.get("seal.digest") == digest:
                    for alias in aliases:
                        self.set_alias(str(existing.version), alias)
                    return str(existing.version)
        artifact_path = self._free_policy_path(policy_dir.name)
        self.client.log_artifacts(self.run_id, str(policy_dir), artifact_path)
        try:
            self.client.create_registered_model(self.registered_model)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(
            self.registered_model,
            source=f"{self.artifact_uri}/{artifact_path}",
            run_id=self.run_id,
            description=description or None,
            tags={"seal.digest": digest} if digest else None,
        ).version
        for alias in aliases:
            self.set_alias(str(version), alias)
        return str(version)

    def _free_policy_path(self, name: str) -> str:
        taken = {Path(f.path).name for f in self.client.list_artifacts(self.run_id, "policies")}
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        return f"policies/{candidate}"

    def set_alias(self, version: str, alias: str) -> None:
        """Point ``alias`` at ``version``; ``"latest"`` is MLflow's own and is left alone."""
        if alias.lower() != LATEST:
            self.client.set_registered_model_alias(self.registered_model, alias, version)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run.

        Raises:
            ValueError: ``status`` is not one of FINISHED, FAILED, KILLED.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"Run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}.")
        self.client.set_terminated(self.run_id, status)


def default_tracking_uri(home: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a sqlite store at ``<home>/mlflow/mlflow.db``.

    The path is absolute so every process (workers, the UI) opens the same store.
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    folder = Path(home).expanduser().resolve() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def resolve_policy_uri(tracking_uri: str, uri: str, download_dir: Path | None = None) -> Path:
    """Turn ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` into a local policy folder.

    A version stored in a local artifact store is returned in place; any other is downloaded to
    ``download_dir`` (default: a new temporary folder).

    Raises:
        ValueError: ``uri`` is not a ``models:/`` URI.
        LookupError: the model, version or alias is not registered in ``tracking_uri``.
    """
    name, alias, version = _parse_models_uri(uri)
    client = MlflowClient(tracking_uri)
    try:
        if alias is not None:
            model_version = client.get_model_version_by_alias(name, alias)
        else:
            model_version = client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LookupError(
            f"{uri} is not registered in {tracking_uri}: {e.message} "
            "Check the name and alias in the MLflow UI (Models tab), or register a policy first."
        ) from e
    source = model_version.source
    parsed = urlparse(source)
    if parsed.scheme in ("", "file"):
        local = Path(unquote(parsed.path))
        if local.is_dir():
            return local
    dst = download_dir or Path(tempfile.mkdtemp(prefix=f"{name}-{model_version.version}-"))
    dst.mkdir(parents=True, exist_ok=True)
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri))


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    rest = uri.removeprefix("models:/")
    if rest != uri and "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif rest != uri and "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
        if name and version.lower() == LATEST:
            return name, LATEST, None
    raise ValueError(
        f"Expected a registered model URI like 'models:/seal-policy@best' or 'models:/seal-policy/3', got {uri!r}."
    )


def _experiment_id(client: MlflowClient, tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (artifacts next to a sqlite DB)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri))
        except MlflowException as e:  # another process created it in between
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted in {tracking_uri}. Restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
            "or set tracking.experiment to another name."
        )
    return experiment.experiment_id


def _artifact_location(tracking_uri: str) -> str | None:
    """``<db dir>/mlruns`` for ``sqlite:///<path>``, so a store lives in one folder; else the server's default."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    if db in ("", ":memory:"):
        return None
    return (Path(db).resolve().parent / "mlruns").as_uri()


def _require_folder(path: Path, caller: str) -> None:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{caller} needs a folder, got {str(path)!r}, which is not one.")


def find_resumable_run(tracking_uri: str, experiment: str, flow_run_id: str, config_digest: str) -> str | None:
    """The MLflow run a new training flow run should continue, if any.

    That is the run of this very Prefect flow run (a retry), else the newest unfinished run of
    the same config whose process is gone (a crash, a kill, ``seal run`` again). A RUNNING run
    whose process is still alive on this host belongs to a concurrent flow and is left alone.
    Runs of this host whose process died are marked KILLED on the way.
    """
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=500)
    host = socket.gethostname()
    candidate = None
    for run in runs:
        tags = run.data.tags
        if tags.get("prefect.flow_run_id") == flow_run_id:
            return run.info.run_id
        running = run.info.status == "RUNNING"
        if running and tags.get("seal.host") == host:
            if _process_alive(int(tags.get("seal.pid", "0"))):
                continue  # a flow in progress elsewhere on this machine
            client.set_terminated(run.info.run_id, "KILLED")
        elif running:
            continue  # another machine's run: we cannot tell whether it is alive
        if candidate is None and run.info.status != "FINISHED" and tags.get("seal.config_digest") == config_digest:
            candidate = run.info.run_id
    return candidate


def flow_run_tracker(
    tracking_uri: str, tracking: TrackingConfig, model: str, digest: str, flow_run_id: str, run_name: str, **tags: str
) -> MlflowTracker:
    """The MLflow run of a flow run: the one it should continue (:func:`find_resumable_run`, by
    ``digest``), else a new one, tagged so that a later retry or rerun finds it again."""
    resumed = find_resumable_run(tracking_uri, tracking.experiment, flow_run_id, digest)
    return MlflowTracker(
        tracking_uri,
        tracking.experiment,
        tracking.registered_model,
        run_name=run_name,
        tags={
            "prefect.flow_run_id": flow_run_id,
            "seal.config_digest": digest,
            "seal.model": model,
            "seal.host": socket.gethostname(),
            "seal.pid": str(os.getpid()),
            **tags,
        },
        run_id=resumed,
    )


@contextmanager
def finishing(tracker: Tracker) -> Iterator[Tracker]:
    """End ``tracker``'s run FINISHED when the block completes, FAILED when it raises (the
    error goes on): a flow's MLflow run never stays RUNNING after the flow run ended."""
    try:
        yield tracker
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
