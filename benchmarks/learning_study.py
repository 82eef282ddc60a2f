"""The learning-quality study (issue 28): does SEAL beat training on the passage alone?

    python benchmarks/learning_study.py --json benchmarks/results/learning_study-smollm2-cpu.json
    python benchmarks/learning_study.py --config deployments/configs/knowledge-tiny.yaml rl.iterations=1
    python benchmarks/learning_study.py --from-run RUN_ID --json ...   (a run that stopped early)
    python benchmarks/learning_study.py --variants questions,generated,generated_base --json ...
    python benchmarks/learning_study.py --variants questions,generated --from-run ID1,ID2 --json ...

Runs the training flow on ``deployments/configs/knowledge-study.yaml`` (held-out evaluation
after every iteration) and reports the paper's Table 2 after each: every column with its 95 %
interval (a bootstrap over held-out contexts) and the paired difference policy self-edits -
passage only. The flow logs the same tables, the per-iteration self-edit measures and the
figure of the four columns (with error bars) to MLflow; the script writes them to ``--json``
and the figure beside it (``.png``). ``--from-run`` rebuilds the same report from what a run
logged to MLflow after each evaluation, for a study stopped before its end (a killed process,
a lost Prefect server): what finished is kept.

``--variants`` runs the study once per reward source on the same contexts and budget (issue
32): ``questions`` (the training contexts' real questions), ``generated`` (pairs the policy
writes from each passage), ``generated_base`` (pairs the frozen base model writes). The JSON
holds each variant's report, written after each, and how much of the real questions' held-out
gain (policy self-edits - base self-edits) each generated variant recovers, with its interval,
and the target as a difference (the variant's gain less 80 % of the real one, with its interval).
``--from-run`` with ``--variants`` rebuilds the comparison from one MLflow run per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flows.cli import prepare_process

DEFAULT_CONFIG = Path(__file__).parents[1] / "deployments" / "configs" / "knowledge-study.yaml"
VARIANTS = {
    "questions": ["reward.source=questions"],
    "generated": ["reward.source=generated", "reward.question_writer=policy"],
    "generated_base": ["reward.source=generated", "reward.question_writer=base"],
}
TARGET_SHARE = 0.8  # issue 32: generated rewards recover at least 80 % of the real questions' gain


def table_row(label: str, result) -> dict:
    """One held-out evaluation as JSON: per column correct, total, accuracy and interval; each
    paired difference (``differences``, the headline one also as ``difference``)."""
    row = {"policy": label, "columns": {}}
    for column in result.correct:
        estimate = result.interval(column)
        row["columns"][column] = {
            "correct": result.correct[column],
            "total": result.total_of(column),
            "accuracy": estimate.value,
            "low": estimate.low,
            "high": estimate.high,
        }
    row["differences"] = []
    for comparison in result.comparisons:
        difference = result.difference(comparison)
        row["differences"].append(
            {"of": list(comparison), "value": difference.value, "low": difference.low, "high": difference.high}
        )
    row["difference"] = row["differences"][0]
    return row


def tables(held_out: list, iterations: list) -> dict:
    """A study's held-out tables and per-iteration metrics as JSON."""
    return {
        "held_out": [table_row(label, r) for label, r in held_out],
        "iterations": [{"iteration": r.iteration, **r.metrics} for r in iterations],
    }


def report_from_run(run_id: str) -> tuple[dict, list, list]:
    """A stopped run's report, iterations and held-out tables, from its MLflow logs: the held-out
    tables (``held_out/step-N.json``: per context, each column's mean correct and its questions)
    and the per-iteration metrics."""
    import tempfile

    from mlflow import MlflowClient

    from flows.held_out import HeldOutResult
    from flows.knowledge import HELD_OUT_COMPARISONS
    from flows.tracking import default_tracking_uri
    from flows.training import IterationResult
    from models.paths import seal_home

    client = MlflowClient(default_tracking_uri(seal_home()))
    run = client.get_run(run_id)
    held_out = []
    with tempfile.TemporaryDirectory() as folder:
        local = Path(client.download_artifacts(run_id, "held_out", folder))
        for step, path in sorted((int(p.stem.split("-")[1]), p) for p in local.glob("step-*.json")):
            table = json.loads(path.read_text())
            rows = [dict(zip(table["columns"], row)) for row in table["data"]]
            columns = [c for c in table["columns"] if c not in ("context_id", "questions")]
            counts = {c: [(row[c], row["questions"]) for row in rows] for c in columns}
            label = "base" if step == 0 else f"iteration-{step}"
            held_out.append((label, HeldOutResult(None, counts, 0.0, HELD_OUT_COMPARISONS, rows)))
    history, last_logged = {}, run.info.start_time
    for key in run.data.metrics:
        for metric in client.get_metric_history(run_id, key):
            last_logged = max(last_logged, metric.timestamp)
            if not key.startswith("held_out/"):
                history.setdefault(metric.step, {})[key] = metric.value
    iterations = [IterationResult(t, None, [], [], metrics) for t, metrics in sorted(history.items()) if t > 0]
    report = {
        "wall_s": ((run.info.end_time or last_logged) - run.info.start_time) / 1000,  # to its last log
        "run_id": run_id,
        "stopped_early": run.info.status != "FINISHED",
        **tables(held_out, iterations),
    }
    return report, iterations, held_out


def run_study(config) -> tuple[dict, list, list]:
    """One training flow run: its report, iterations and held-out tables."""
    from flows.training import seal_training

    start = time.perf_counter()
    result = seal_training(config)
    report = {
        "wall_s": time.perf_counter() - start,
        "run_id": result.run_id,
        **tables(result.held_out, result.iterations),
    }
    return report, result.iterations, result.held_out


def recoveries(held_out: dict[str, list]) -> dict[str, list[dict]]:
    """Per generated variant, per evaluation both ran: the share of the ``questions`` variant's
    gain (policy self-edits - base self-edits) it recovers, with a 95 % interval; that real gain
    with its interval (``meaningful``: above 0, its interval too); and issue 32's target as a
    difference, the variant's gain less 80 % of the real one (``margin``: met where its low end
    is above 0)."""
    from flows.knowledge import HELD_OUT_COMPARISONS
    from models.stats import gain_recovery, paired_difference, recovery_margin

    gain = HELD_OUT_COMPARISONS[1]  # what RL adds to the base model's self-edits
    if "questions" not in held_out:
        return {}
    questions = held_out["questions"]
    found = {}
    for variant, tables in held_out.items():
        if variant == "questions":
            continue
        found[variant] = []
        for (label, result), (_, real) in zip(tables, questions):
            ids, real_ids = ([row["context_id"] for row in r.per_context] for r in (result, real))
            if ids != real_ids:
                raise SystemExit(f"{variant} and questions evaluated different held-out contexts at {label}")
            ours, theirs = (
                (result.counts[gain[0]], result.counts[gain[1]]),
                (real.counts[gain[0]], real.counts[gain[1]]),
            )
            real_gain = paired_difference(*theirs)
            margin = recovery_margin(ours, theirs, TARGET_SHARE)
            row = {
                "after": label,
                "reference_gain": real_gain.value,
                "reference_low": real_gain.low,
                "reference_high": real_gain.high,
                "meaningful": real_gain.low > 0,
                "margin": {"share": TARGET_SHARE, "value": margin.value, "low": margin.low, "high": margin.high},
            }
            try:
                estimate = gain_recovery(ours, theirs)
            except ValueError as exc:  # real questions gained nothing here, or lost: no share to speak of
                row["recovery"] = None
                row["why"] = str(exc)
            else:
                row |= {"recovery": estimate.value, "low": estimate.low, "high": estimate.high}
            found[variant].append(row)
    return found


def format_recovery(row: dict) -> str:
    """One variant's recovery after one evaluation, as the study prints it."""
    low, high = row["reference_low"] * 100, row["reference_high"] * 100
    real = f"{row['reference_gain'] * 100:+.1f} points [{low:+.1f}, {high:+.1f}]"
    if row["recovery"] is None:
        share = f"recovers n/a of the real questions' gain ({row['why']})"
    else:
        share = (
            f"recovers {row['recovery']:.0%} [{row['low']:.0%}, {row['high']:.0%}] of the real questions' gain, {real}"
        )
        if not row["meaningful"]:
            share += ", whose interval includes 0: the share means little"
    margin = row["margin"]
    return (
        f"{share}; gain - {margin['share']:.0%} of it = {margin['value'] * 100:+.1f} points "
        f"[{margin['low'] * 100:+.1f}, {margin['high'] * 100:+.1f}]"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--json", help="write the study's tables and curves to this file (and a .png beside it)")
    parser.add_argument(
        "--from-run",
        metavar="RUN_ID",
        type=lambda text: text.split(","),
        help="report MLflow runs (that stopped early, or to report again); run nothing. With --variants, "
        "one run per variant, comma-separated in the same order",
    )
    parser.add_argument(
        "--variants",
        type=lambda text: text.split(","),
        help=f"comma-separated reward sources to compare on the same contexts: {', '.join(VARIANTS)}",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    prepare_process()  # as the seal command does

    from flows.domains import domain_for
    from flows.held_out import format_held_out
    from flows.training import curves
    from models.config import load_config

    if args.from_run and len(args.from_run) != len(args.variants or [None]):
        parser.error(
            f"--from-run needs one run per variant: {len(args.from_run)} runs, {len(args.variants or [None])} variants"
        )
    unknown = set(args.variants or ()) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    path = Path(args.json) if args.json else None
    variants, tables = {}, {}
    for i, variant in enumerate(args.variants or [None]):
        config = load_config(args.config, [*args.overrides, *VARIANTS.get(variant, []), "rl.eval_every=1"])
        if args.from_run:
            report, iterations, held_out = report_from_run(args.from_run[i])
        else:
            report, iterations, held_out = run_study(config)
        title = domain_for(config).held_out_title
        print(f"{variant}: {title}" if variant else title)
        print(format_held_out(held_out))
        print(f"{report['wall_s'] / 60:.1f} min; MLflow run {report['run_id']}")
        if variant is None:  # one study as configured
            written = report
            figure = path.with_suffix(".png") if path else None
        else:  # written after each variant: a stopped comparison keeps the variants that finished
            variants[variant], tables[variant] = report, held_out
            found = recoveries(tables)
            for name, rows in found.items():
                for row in rows:
                    print(f"{name} after {row['after']}: {format_recovery(row)}")
            written = {"variants": variants, "recovery": found}
            figure = path.with_name(f"{path.stem}-{variant}.png") if path else None
        if path:
            path.write_text(json.dumps({"config": args.config, "overrides": args.overrides} | written, indent=2))
            curves(iterations, held_out).savefig(figure, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
