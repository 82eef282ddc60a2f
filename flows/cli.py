"""The ``seal`` command.

seal run CONFIG [section.key=value ...]          train (the SEAL outer loop)
seal eval CONFIG POLICY [section.key=value ...]  held-out evaluation of a policy
seal inner-loop CONFIG [section.key=value ...]   the inner-loop demo table
seal continual CONFIG [section.key=value ...]    self-edits merged in sequence: the forgetting matrix
seal clean [--yes]                               prune results and artifacts no run references
seal serve [--prefect-port P] [--mlflow-port M]  Prefect + MLflow UIs, the flows as deployments
seal doctor [--pool seal] [--config CONFIG]      check a stack: servers, auth, worker, SEAL_HOME, model
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from models.process import configure_process

# Offline and quiet by default; a user who wants the hub can export these as 0.
QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seal", description="Self-Adapting Language Models as workflows.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train a policy with the SEAL outer loop (ReST-EM)")
    run.add_argument("config", help="YAML config, e.g. deployments/configs/knowledge-smollm2.yaml")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides")
    evaluate = commands.add_parser("eval", help="evaluate a policy on held-out contexts")
    evaluate.add_argument("config", help="YAML config")
    evaluate.add_argument("policy", help="'base', a policy folder, or models:/seal-policy@best")
    evaluate.add_argument("overrides", nargs="*", help="section.key=value overrides")
    demo = commands.add_parser(
        "inner-loop",
        help="score no adaptation / passage only / passage + self-edit on held-out contexts",
    )
    demo.add_argument("config", help="YAML config, e.g. deployments/configs/knowledge-smollm2.yaml")
    demo.add_argument("overrides", nargs="*", help="section.key=value overrides")
    demo.add_argument("--contexts", type=int, default=None, help="default: data.num_eval_contexts")
    continual = commands.add_parser(
        "continual",
        help="merge self-edits one after another and measure what earlier passages lose",
    )
    continual.add_argument("config", help="YAML config, e.g. deployments/configs/continual-smollm2.yaml")
    continual.add_argument("overrides", nargs="*", help="section.key=value overrides")
    clean = commands.add_parser(
        "clean", help="list (or with --yes delete) results and adapters that no Prefect run references"
    )
    clean.add_argument("--yes", action="store_true", help="delete; the default only lists")
    serve = commands.add_parser("serve", help="start the Prefect and MLflow servers and serve the flows")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    serve.add_argument("--prefect-port", type=int, default=4200)
    serve.add_argument("--mlflow-port", type=int, default=5000)
    doctor = commands.add_parser(
        "doctor", help="check the servers, their auth, the work pool's worker, SEAL_HOME and the model"
    )
    doctor.add_argument("--pool", default="seal", help="the work pool deployments run on (default: seal)")
    doctor.add_argument(
        "--config", default=None, help="YAML config whose model and runner to check (default: defaults)"
    )
    doctor.add_argument("--timeout", type=float, default=5, help="seconds to wait for each server")
    return parser


def inner_loop(args: argparse.Namespace) -> int:
    from models.base_model import load_model
    from models.config import load_config
    from models.demo import format_table, peak_memory_mb, run_inner_loop_demo
    from models.paths import seal_home

    config = load_config(args.config, args.overrides)
    print(f"SEAL home: {seal_home()}")
    print(f"loading {config.model.name} ...", flush=True)
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
    print(
        f"model {loaded.spec} ({loaded.digest}) on {loaded.device}, "
        f"{loaded.model.num_parameters() / 1e6:.1f}M parameters"
    )

    def report(row) -> None:
        c = row.correct
        print(
            f"  {row.context_id}: no adaptation {c['no_adaptation']}/{row.questions}  "
            f"passage {c['passage_only']}/{row.questions}  "
            f"passage + self-edit {c['passage_self_edit']}/{row.questions}  "
            f"({len(row.self_edit.documents)} documents, "
            f"{row.seconds['passage_self_edit']:.1f}s inner loop)",
            flush=True,
        )

    rows = run_inner_loop_demo(loaded, config, args.contexts, on_row=report)
    print()
    print(format_table(rows))
    print(f"peak memory: {peak_memory_mb():.0f} MB")
    return 0


def prepare_process(prefect: bool = True) -> None:
    """What the seal command does first, for every script that runs its flows or models: quiet,
    offline libraries, the process settings of ``models/process.py`` (before Prefect's threads and
    the first model) and, with ``prefect``, Prefect's home under SEAL_HOME."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    configure_process()
    # SIGTERM (docker stop, a scheduler's timeout) ends the process as Ctrl-C would, through its
    # cleanup: Python's default would leave Prefect's temporary server running, orphaned.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_signal)
    if prefect:
        prefect_environment()


def _exit_on_signal(signum: int, frame) -> None:
    sys.exit(128 + signum)


def prefect_environment() -> None:
    """Keep Prefect's database and persisted results under SEAL_HOME (before importing it)."""
    from models.paths import seal_home

    prefect_home = seal_home() / "prefect"
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    # Prefect creates its database file but not the folders above it.
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(prefect_home / "storage"))
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    # The temporary server takes 8-16 s to start on 2 busy cores; Prefect's default gives up at 20.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def run(args: argparse.Namespace) -> int:
    from models.config import load_config

    config = load_config(args.config, args.overrides)
    prefect_environment()
    from flows.domains import domain_for
    from flows.held_out import format_held_out
    from flows.training import seal_training

    result = seal_training(config)
    print()
    print(domain_for(config).held_out_title)
    print(format_held_out(result.held_out))
    print()
    print(f"final policy: {result.policy.path}")
    print(f"MLflow: run {result.run_id} in {result.tracking_uri}")
    print(f"  open the MLflow UI:  mlflow ui --backend-store-uri {result.tracking_uri}")
    print(f"  open the Prefect UI: prefect server start   (with PREFECT_HOME={os.environ['PREFECT_HOME']})")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from models.config import load_config

    config = load_config(args.config, args.overrides)
    prefect_environment()
    from flows.domains import domain_for
    from flows.evaluation import seal_evaluation
    from flows.held_out import format_held_out

    result = seal_evaluation(config, args.policy)
    print(domain_for(config).held_out_title)
    print(format_held_out([(args.policy[-16:], result)]))
    return 0


def continual(args: argparse.Namespace) -> int:
    from models.config import load_config
    from models.errors import ConfigError

    config = load_config(args.config, args.overrides)
    if config.domain != "knowledge":
        raise ConfigError(
            f"seal continual merges self-edits about passages: it needs domain=knowledge, the config "
            f"has domain={config.domain}"
        )
    prefect_environment()
    from flows.continual import format_summary, seal_continual

    result = seal_continual(config)
    print()
    print(format_summary(result.summary, len(result.sequences)))
    print()
    print(f"MLflow: run {result.run_id} in {result.tracking_uri}")
    print(f"  open the MLflow UI:  mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


def clean(args: argparse.Namespace) -> int:
    prefect_environment()
    from flows.clean import delete, format_plan, plan_clean, referenced_storage_keys
    from models.paths import seal_home

    storage = Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"])
    plan = plan_clean(storage, seal_home(), referenced_storage_keys())
    if args.yes:
        delete(plan)
    print(format_plan(plan, seal_home(), storage, dry_run=not args.yes))
    return 0


def serve(args: argparse.Namespace) -> int:
    from models.paths import seal_home

    os.environ["PREFECT_HOME"] = str(seal_home() / "prefect")  # the served server's database
    prefect_environment()
    from flows.serve import Endpoints
    from flows.serve import serve as serve_flows

    return serve_flows(Endpoints(args.host, args.prefect_port, args.mlflow_port), seal_home())


def doctor(args: argparse.Namespace) -> int:
    from flows.doctor import FAIL, format_checks, run_checks
    from models.config import load_config

    checks = run_checks(os.environ, args.pool, load_config(args.config), args.timeout)
    print(format_checks(checks))
    return 1 if any(check.status == FAIL for check in checks) else 0


def main(argv: list[str] | None = None) -> int:
    prepare_process(prefect=False)  # each command sets Prefect up when it needs it
    args = _parser().parse_args(argv)
    from models.errors import ConfigError, DatasetError, ModelNotFoundError, UnknownTaskError

    try:
        return {
            "run": run,
            "eval": evaluate,
            "inner-loop": inner_loop,
            "continual": continual,
            "clean": clean,
            "serve": serve,
            "doctor": doctor,
        }[args.command](args)
    except (ConfigError, ModelNotFoundError, DatasetError, UnknownTaskError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
