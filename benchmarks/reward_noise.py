"""How much of a self-edit's reward is the self-edit, and how much its training seed (issue 28)?

    python benchmarks/reward_noise.py --json benchmarks/results/reward_noise-smollm2-epyc-avx512-cpu.json
    python benchmarks/reward_noise.py --config deployments/configs/knowledge-tiny.yaml --seeds 3

ReST-EM keeps, per training context, the self-edit whose adapted model answered most of the
context's questions. With one training seed (``inner_loop.seeds: 1``) that score mixes what the
self-edit teaches with the luck of one adapter's initialisation and document order. This script
repeats the study's first E-step (``knowledge-study.yaml``: the same contexts and samples as its
iteration 1) with ``--seeds`` seeds per self-edit and reports:

- the **reliability** of one seed's score for ranking a context's self-edits: the share of its
  within-context variance that is the self-edit's (an intraclass correlation), and of a mean
  over m seeds (Spearman-Brown);
- the **selection's real advantage**: a self-edit picked on some seeds, judged on the others,
  against the average self-edit of its context on those same seeds (points, with a 95 %
  cluster-bootstrap interval): what the M-step's data is actually better by. Picked on one seed
  (the study's setting) and on all seeds but one (``inner_loop.seeds`` = ``--seeds`` - 1), beside
  the advantage the one-seed reward *appears* to have (picked and judged on the same seed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from flows.cli import prepare_process

DEFAULT_CONFIG = Path(__file__).parents[1] / "deployments" / "configs" / "knowledge-study.yaml"


def reliability(accuracy: np.ndarray) -> float:
    """The intraclass correlation ICC(1) of one seed's score across the self-edits of a context,
    pooled over contexts: (MSB - MSW) / (MSB + (S - 1) MSW), self-edits nested in contexts.

    Args:
        accuracy: (contexts, self-edits, seeds) accuracies.
    """
    contexts, edits, seeds = accuracy.shape
    edit_means = accuracy.mean(2)
    between = seeds * ((edit_means - edit_means.mean(1, keepdims=True)) ** 2).sum() / (contexts * (edits - 1))
    within = ((accuracy - edit_means[..., None]) ** 2).sum() / (contexts * edits * (seeds - 1))
    if between + (seeds - 1) * within == 0:
        return 0.0
    return float((between - within) / (between + (seeds - 1) * within))


def spearman_brown(icc: float, m: int) -> float:
    """The reliability of a mean over ``m`` seeds, given one seed's."""
    return m * icc / (1 + (m - 1) * icc)


def pick(accuracy: np.ndarray, f1: np.ndarray, seeds: list[int]) -> int:
    """The self-edit ReST-EM keeps when scored on ``seeds`` (:func:`models.rest_em.select_self_edits`:
    highest mean accuracy, then mean F1, then the lowest index). ``accuracy``/``f1``: (self-edits, seeds)."""
    from models.rest_em import Candidate, select_self_edits

    a, f = accuracy[:, seeds].mean(1), f1[:, seeds].mean(1)
    # No baseline to beat: the comparison here is between a context's self-edits.
    return select_self_edits(float("-inf"), [Candidate(k, float(a[k]), float(f[k])) for k in range(len(a))]).kept


def selection_advantage(
    correct: np.ndarray, f1: np.ndarray, totals: np.ndarray, select_on: int, honest: bool = True
) -> tuple[list[tuple[float, int]], list[tuple[float, int]]]:
    """Per context, the picked self-edit's correct answers and the average self-edit's, judged on
    the seeds not used to pick (``honest``) or on the same ones (what the reward appears to say),
    averaged over every way of choosing ``select_on`` seeds to pick on.

    Args:
        correct: (contexts, self-edits, seeds) correct answers; ``totals``: questions per context.

    Returns:
        Two count columns for :func:`models.stats.paired_difference`: picked, average.
    """
    contexts, _, seeds = correct.shape
    accuracy = correct / totals[:, None, None]
    picked, average = [], []
    for c in range(contexts):
        p, a = [], []
        for chosen in itertools.combinations(range(seeds), select_on):
            judge = [s for s in range(seeds) if s not in chosen] if honest else list(chosen)
            k = pick(accuracy[c], f1[c], list(chosen))
            p.append(correct[c, k, judge].mean())
            a.append(correct[c][:, judge].mean())
        picked.append((float(np.mean(p)), int(totals[c])))
        average.append((float(np.mean(a)), int(totals[c])))
    return picked, average


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--seeds", type=int, default=4, help="training seeds per self-edit (at least 2)")
    parser.add_argument("--iteration", type=int, default=1, help="whose contexts and samples (as the flow draws)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: one seed has no seed-to-seed variance")
    prepare_process(prefect=False)

    import tempfile

    from models.base_model import load_model
    from models.config import load_config
    from models.knowledge_data import load_contexts, select_contexts
    from models.self_edit import inner_loop_plan, sample_self_edits_batch
    from models.stacked_lora import AdapterLanes
    from models.stats import paired_difference
    from tasks.records import stable_seed

    start = time.perf_counter()
    config = load_config(args.config, args.overrides)
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
    # The flow's draw for this iteration (flows.training.train_contexts, _run_iteration's seeds).
    draw = stable_seed(config.data.seed, "train", args.iteration)
    contexts = list(select_contexts(load_contexts(config.data, "train"), config.data.num_train_contexts, seed=draw))
    edit = config.self_edit
    samples = sample_self_edits_batch(
        loaded.model,
        loaded.tokenizer,
        [(c["title"], c["context"]) for c in contexts],
        [stable_seed(config.seed, args.iteration, c["id"]) for c in contexts],
        kind=edit.prompt,
        num_samples=edit.num_samples,
        temperature=edit.temperature,
        top_p=edit.top_p,
        max_new_tokens=edit.max_new_tokens,
        max_documents=edit.max_documents,
    )
    inner, seeds = config.inner_loop, [config.inner_loop.seed + s for s in range(args.seeds)]
    # Every (context, self-edit, seed), trained in one stream through the lanes' slots.
    jobs = [(c, k, s) for c in range(len(contexts)) for k in range(edit.num_samples) for s in range(args.seeds)]
    plans = [inner_loop_plan(samples[c][k], contexts[c]["title"], contexts[c]["context"], inner) for c, k, _ in jobs]
    lanes = AdapterLanes.attach(loaded.model, loaded.tokenizer, config.lora, inner.group_slots, inner.lanes)
    scratch = Path(tempfile.mkdtemp(prefix="reward-noise-"))
    folders = [scratch / f"{c}-{k}-{s}" for c, k, s in jobs]
    train_start = time.perf_counter()
    results = lanes.train([docs for docs, _ in plans], plans[0][1], [seeds[s] for _, _, s in jobs], folders=folders)
    train_s = time.perf_counter() - train_start
    # A non-finite loss scores 0, as the flow rewards it.
    saved = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
    scores = lanes.evaluate_saved(
        [folders[i] for i in saved],
        [contexts[jobs[i][0]]["questions"] for i in saved],
        [contexts[jobs[i][0]]["answers"] for i in saved],
        config.eval,
    )
    shape = (len(contexts), edit.num_samples, args.seeds)
    correct, f1 = np.zeros(len(jobs)), np.zeros(len(jobs))
    correct[saved] = [s.num_correct for s in scores]
    f1[saved] = [s.mean_f1 for s in scores]
    correct, f1 = correct.reshape(shape), f1.reshape(shape)
    totals = np.array([len(c["questions"]) for c in contexts])

    icc = reliability(correct / totals[:, None, None])
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "iteration": args.iteration,
        "contexts": len(contexts),
        "self_edits": edit.num_samples,
        "seeds": args.seeds,
        "questions": int(totals.sum()),
        "reliability": {"one_seed": icc, **{f"mean_of_{m}": spearman_brown(icc, m) for m in range(2, args.seeds + 1)}},
        "advantage": {},
        "empty_self_edits": sum(e.is_empty for edits in samples for e in edits),
        "non_finite_losses": len(jobs) - len(saved),
        "train_s": train_s,
        "wall_s": 0.0,
        "per_context": [
            {"context_id": c["id"], "questions": int(n), "correct": correct[i].tolist(), "f1": f1[i].tolist()}
            for i, (c, n) in enumerate(zip(contexts, totals))
        ],
    }
    print(f"one seed's score, share of within-context variance that is the self-edit's: {icc:.2f}")
    for m in range(2, args.seeds + 1):
        print(f"  a mean of {m} seeds: {spearman_brown(icc, m):.2f}")
    selections = {
        "apparent_one_seed": (1, False),  # what the study's reward sees
        "one_seed": (1, True),
        "all_seeds_but_one": (args.seeds - 1, True),
    }
    for name, (select_on, honest) in selections.items():
        difference = paired_difference(*selection_advantage(correct, f1, totals, select_on, honest))
        report["advantage"][name] = {"value": difference.value, "low": difference.low, "high": difference.high}
        judged = "on the same seed" if not honest else "on the other seeds"
        print(
            f"picked on {select_on} seed{'s' if select_on > 1 else ''}, judged {judged}: "
            f"{100 * difference.value:+.1f} points [{100 * difference.low:+.1f}, {100 * difference.high:+.1f}] "
            "over the context's average self-edit"
        )
    report["wall_s"] = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
