"""How good are self-generated question-answer pairs as reward targets (issue 32)?

    python benchmarks/generated_questions.py --json benchmarks/results/generated_questions-smollm2-cpu.json
    python benchmarks/generated_questions.py --config deployments/configs/knowledge-tiny.yaml --contexts 2

On ``--contexts`` contexts of the *training* split, the base model writes question-answer pairs
from each passage (``models/generated_questions.py``, ``reward.num_questions`` and
``reward.question_tokens`` of the config), and the script reports what a reward computed against
them would see, beside the real questions of the same passages:

- the pairs: parsed and kept per passage, each filter's drops, passages left with none, and the
  share of kept answers that are also a real question's answer;
- the unadapted model's closed-book accuracy on the kept pairs (what the no-adaptation baseline
  already gets: a pair it answers without the passage cannot reward anything) and on the real
  questions;
- an adapter trained on the passage alone (the inner loop of the config): its accuracy on both,
  each with a 95 % interval (a bootstrap over passages). A reward can only tell self-edits apart
  if training on the passage moves the answers to its questions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flows.cli import prepare_process

DEFAULT_CONFIG = Path(__file__).parents[1] / "deployments" / "configs" / "knowledge-smollm2.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--contexts", type=int, default=24)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    prepare_process(prefect=False)  # as the seal command does

    import tempfile

    from models.base_model import load_model
    from models.config import load_config
    from models.generated_questions import FILTERS, write_questions_batch
    from models.inner_loop import evaluate_contexts, normalize_answer
    from models.knowledge_data import load_contexts, select_contexts
    from models.self_edit import inner_loop_plan
    from models.stacked_lora import AdapterLanes
    from models.stats import accuracy_interval

    config = load_config(args.config, args.overrides)
    reward = config.reward
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    contexts = list(select_contexts(load_contexts(config.data, "train"), args.contexts, seed=config.data.seed + 1))

    start = time.perf_counter()
    written = []
    for first in range(0, len(contexts), config.eval.batch_size):  # one batched generation per chunk
        chunk = contexts[first : first + config.eval.batch_size]
        written += write_questions_batch(
            model,
            tokenizer,
            [(c["title"], c["context"]) for c in chunk],
            num_questions=reward.num_questions,
            max_new_tokens=reward.question_tokens,
        )
    write_s = time.perf_counter() - start

    generated_q = [[p.question for p in w.pairs] for w in written]
    generated_a = [[[p.answer] for p in w.pairs] for w in written]
    real_q, real_a = [c["questions"] for c in contexts], [c["answers"] for c in contexts]

    def counts(results) -> list[tuple[int, int]]:
        return [(r.num_correct, r.total) for r in results]

    def summary(pairs: list[tuple[int, int]]) -> dict:
        kept = [(n, t) for n, t in pairs if t]
        estimate = accuracy_interval(kept) if kept else None
        return {
            "correct": sum(n for n, _ in pairs),
            "total": sum(t for _, t in pairs),
            "accuracy": estimate.value if estimate else None,
            "low": estimate.low if estimate else None,
            "high": estimate.high if estimate else None,
        }

    unadapted = {
        "generated": summary(counts(evaluate_contexts(model, tokenizer, generated_q, generated_a, config.eval))),
        "real": summary(counts(evaluate_contexts(model, tokenizer, real_q, real_a, config.eval))),
    }

    lanes = AdapterLanes.attach(model, tokenizer, config.lora, config.inner_loop.group_slots, config.inner_loop.lanes)
    plans = [inner_loop_plan(None, c["title"], c["context"], config.inner_loop) for c in contexts]
    folders = Path(tempfile.mkdtemp(prefix="generated-questions-"))
    paths = [folders / str(i) for i in range(len(contexts))]
    lanes.train([docs for docs, _ in plans], plans[0][1], [config.inner_loop.seed] * len(plans), folders=paths)
    with_pairs = [i for i, q in enumerate(generated_q) if q]
    passage_only = {
        "real": summary(counts(lanes.evaluate_saved(paths, real_q, real_a, config.eval))),
        "generated": summary(
            counts(
                lanes.evaluate_saved(
                    [paths[i] for i in with_pairs],
                    [generated_q[i] for i in with_pairs],
                    [generated_a[i] for i in with_pairs],
                    config.eval,
                )
            )
            if with_pairs
            else []
        ),
    }

    real_answers = [{normalize_answer(a) for golds in c["answers"] for a in golds} for c in contexts]
    kept = sum(len(w.pairs) for w in written)
    parsed = sum(w.parsed for w in written)
    matching = sum(normalize_answer(p.answer) in real_answers[i] for i, w in enumerate(written) for p in w.pairs)
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "writer": config.model.name,
        "contexts": [c["id"] for c in contexts],
        "num_questions": reward.num_questions,
        "question_tokens": reward.question_tokens,
        "write_s": write_s,
        "parsed": parsed,
        "kept": kept,
        "kept_fraction": kept / parsed if parsed else 0.0,
        "mean_pairs": kept / len(contexts),
        "contexts_without_pairs": sum(1 for w in written if not w.pairs),
        "dropped": {name: sum(w.dropped.get(name, 0) for w in written) for name in FILTERS},
        "answers_matching_a_real_answer": matching / kept if kept else 0.0,
        "unadapted": unadapted,
        "passage_only": passage_only,
        "examples": [
            {"title": c["title"], "text": w.text, "pairs": [[p.question, p.answer] for p in w.pairs]}
            for c, w in list(zip(contexts, written))[:4]
        ],
    }
    print(
        f"{len(contexts)} passages: {parsed} pairs parsed, {kept} kept ({report['kept_fraction']:.0%}), "
        f"{report['contexts_without_pairs']} passages without a pair; drops {report['dropped']}; "
        f"{report['answers_matching_a_real_answer']:.0%} of kept answers are a real question's answer"
    )
    for name, table in (("unadapted", unadapted), ("passage only", passage_only)):
        for kind in ("real", "generated"):
            s = table[kind]
            interval = "" if s["accuracy"] is None else f" {s['accuracy']:.1%} [{s['low']:.1%}, {s['high']:.1%}]"
            print(f"{name:<14}{kind:<10}{s['correct']:>4}/{s['total']:<4}{interval}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
