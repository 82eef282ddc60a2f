"""The ``seal`` command.

    seal inner-loop CONFIG [section.key=value ...]   the inner-loop demo table
"""

from __future__ import annotations

import argparse
import os
import sys

# Offline and quiet by default; a user who wants the hub can export these as 0.
_QUIET = {
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
    demo = commands.add_parser(
        "inner-loop",
        help="score no adaptation / passage only / passage + self-edit on held-out contexts",
    )
    demo.add_argument("config", help="YAML config, e.g. deployments/configs/knowledge-smollm2.yaml")
    demo.add_argument("overrides", nargs="*", help="section.key=value overrides")
    demo.add_argument("--contexts", type=int, default=None, help="default: data.num_eval_contexts")
    return parser


def inner_loop(args: argparse.Namespace) -> int:
    from models.base_model import load_model, seal_home
    from models.config import load_config
    from models.demo import format_table, peak_memory_mb, run_inner_loop_demo

    config = load_config(args.config, args.overrides)
    print(f"SEAL home: {seal_home()}")
    print(f"loading {config.model.name} ...", flush=True)
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
    print(f"model {loaded.spec} ({loaded.digest}) on {loaded.device}, "
          f"{loaded.model.num_parameters() / 1e6:.1f}M parameters")

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


def main(argv: list[str] | None = None) -> int:
    for key, value in _QUIET.items():
        os.environ.setdefault(key, value)
    args = _parser().parse_args(argv)
    from models.config import ConfigError
    from models.base_model import ModelNotFoundError
    from models.knowledge_data import DatasetError

    try:
        return {"inner-loop": inner_loop}[args.command](args)
    except (ConfigError, ModelNotFoundError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
