"""Where the model tasks run: in the flow's process (``runner.kind=local``) or on Ray workers.

    seal run deployments/configs/knowledge-smollm2.yaml runner.kind=ray runner.num_workers=2
    seal run CONFIG runner.kind=ray runner.address=ray://head:10001 runner.gpus_per_task=1 \\
        runner.result_storage=s3://bucket/seal-results

The training and evaluation flows enter :func:`ray_cluster` once, so every subflow (each
iteration, each held-out evaluation) runs on the same Ray instance and its workers keep the
models they loaded. The subflows take their task runner and result storage from
:func:`on_runner`; inside them, :func:`placement` makes every submitted task reserve
``runner.cpus_per_task`` CPUs and ``runner.gpus_per_task`` GPUs.

What the workers share with the flow: task results (``runner.result_storage``, or Prefect's
local storage path) and ``$SEAL_HOME`` (adapters, policies, converted models), which on a
cluster must be one shared filesystem mounted at the same path on every node.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect import Flow, Task
from prefect.filesystems import RemoteFileSystem
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from models.config import RunnerConfig
from models.paths import seal_home

# The local runner: one thread. Model tasks share the process's one copy of each model and hold
# its lock while they run (inner loops attach LoRA layers to it in place); more threads would
# only queue on that lock, and on a CPU compete for the same cores.
SERIAL = ThreadPoolTaskRunner(max_workers=1)


class ClusterTooSmall(RuntimeError):
    """No node of the Ray cluster can hold one model task as configured."""


def worker_threads(runner: RunnerConfig) -> int:
    """Torch threads of each Ray worker: the CPUs its tasks reserve, at least 1."""
    return max(1, int(cpus_per_task(runner)))


def cpus_per_task(runner: RunnerConfig) -> float:
    if runner.cpus_per_task is not None:
        return runner.cpus_per_task
    if runner.address is None:  # a local instance shares this machine's cores between its workers
        return max(1, (os.cpu_count() or 1) // runner.num_workers)
    return 1.0


def ray_init_kwargs(runner: RunnerConfig) -> dict:
    """``ray.init`` arguments: a local instance of ``num_workers`` workers, or the cluster at
    ``address``; either way the workers get this process's ``SEAL_HOME`` and their torch threads."""
    env = {"SEAL_HOME": str(seal_home()), "OMP_NUM_THREADS": str(worker_threads(runner))}
    kwargs = {"namespace": "seal", "runtime_env": {"env_vars": env}}
    if runner.address is None:
        # "local": a new instance of this flow run's own; with no address Ray would join any
        # instance already running on the machine (or the last one started here, even if dead).
        kwargs |= {
            "address": "local",
            "num_cpus": cpus_per_task(runner) * runner.num_workers,
            "include_dashboard": False,
        }
    else:
        kwargs["address"] = runner.address
    return kwargs


def task_runner(runner: RunnerConfig) -> TaskRunner:
    if runner.kind == "local":
        return SERIAL
    from prefect_ray import RayTaskRunner

    # Inside ray_cluster() Ray is already initialized and this runner only uses it; a subflow run
    # on its own starts (and stops) an instance with the same settings.
    kwargs = ray_init_kwargs(runner)
    return RayTaskRunner(address=kwargs.pop("address"), init_kwargs=kwargs)


def result_storage(runner: RunnerConfig) -> Path | str | None:
    """Prefect's storage for task results, as a flow or task option: a folder, or the slug of a
    ``RemoteFileSystem`` block for an fsspec URL (saved on the Prefect server, which is how the
    workers find it; credentials come from each node's environment, e.g. ``AWS_*`` for s3fs).
    None leaves Prefect's default, its local storage path."""
    if runner.result_storage is None:
        return None
    if "://" not in runner.result_storage:
        return Path(runner.result_storage).absolute()
    name = "seal-results-" + hashlib.sha256(runner.result_storage.encode()).hexdigest()[:12]
    RemoteFileSystem(basepath=runner.result_storage).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def on_runner(subflow: Flow, runner: RunnerConfig) -> Flow:
    """``subflow`` with the runner's task runner and result storage."""
    return subflow.with_options(task_runner=task_runner(runner), result_storage=result_storage(runner))


def with_storage(task: Task, runner: RunnerConfig) -> Task:
    """``task`` with the runner's result storage (for tasks a top-level flow calls directly)."""
    return task.with_options(result_storage=result_storage(runner))


@contextmanager
def placement(runner: RunnerConfig) -> Iterator[None]:
    """Tasks submitted in this block reserve the runner's CPUs and GPUs on Ray (no-op locally)."""
    if runner.kind == "local":
        yield
        return
    from prefect_ray.context import remote_options

    # max_calls=0: Ray retires a worker after one GPU task by default, which would load the model
    # again for every inner loop. Workers live for the whole flow run and keep their models.
    with remote_options(num_cpus=cpus_per_task(runner), num_gpus=runner.gpus_per_task, max_calls=0):
        yield


@contextmanager
def ray_cluster(runner: RunnerConfig) -> Iterator[None]:
    """Ray for the whole flow run: start a local instance (or join the cluster at
    ``runner.address``), check that a model task fits on some node, leave it at the end."""
    if runner.kind == "local":
        yield
        return
    import ray
    from prefect import get_run_logger
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with ExitStack() as stack:
        if not PREFECT_API_URL.value():
            # Without a Prefect server each process runs a temporary one; workers must report
            # to this process's, which listens on localhost: fine for a local instance only.
            if runner.address is not None:
                raise RuntimeError(
                    f"runner.address is {runner.address!r}, but no Prefect server is configured and Ray "
                    "workers on other machines cannot reach this process's temporary one. Set "
                    "PREFECT_API_URL to a Prefect server every node reaches (e.g. the compose "
                    "stack's http://HOST:4200/api, or `seal serve --host 0.0.0.0`)."
                )
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer()
            server.start()
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url}))
        ray.init(**ray_init_kwargs(runner))
        stack.callback(ray.shutdown)
        check_fits(runner, ray.nodes())
        nodes = [n for n in ray.nodes() if n["Alive"]]
        get_run_logger().info(
            "Ray %s: %d node(s), %g CPUs, %g GPUs; each model task reserves %g CPUs, %g GPUs and runs %d torch threads",
            f"cluster at {runner.address}" if runner.address else "local instance",
            len(nodes),
            sum(n["Resources"].get("CPU", 0) for n in nodes),
            sum(n["Resources"].get("GPU", 0) for n in nodes),
            cpus_per_task(runner),
            runner.gpus_per_task,
            worker_threads(runner),
        )
        yield


def check_fits(runner: RunnerConfig, nodes: list[dict]) -> None:
    """Raise :class:`ClusterTooSmall` unless some live node has the CPUs and GPUs of one model task
    (Ray would otherwise leave the tasks pending forever)."""
    cpus, gpus = cpus_per_task(runner), runner.gpus_per_task
    alive = [n["Resources"] for n in nodes if n["Alive"]]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in alive):
        return
    largest = ", ".join(f"{r.get('CPU', 0):g} CPUs/{r.get('GPU', 0):g} GPUs" for r in alive) or "no live node"
    raise ClusterTooSmall(
        f"a model task reserves {cpus:g} CPUs and {gpus:g} GPUs (runner.cpus_per_task, "
        f"runner.gpus_per_task) but no Ray node has that much ({largest}). Lower them, or add a node "
        "that has them."
    )
