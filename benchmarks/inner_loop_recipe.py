"""Which inner-loop recipe and self-edit prompt let the base model's self-edits help (issue 28)?

    python benchmarks/inner_loop_recipe.py --json benchmarks/results/inner_loop_recipe-smollm2-cpu.json
    python benchmarks/inner_loop_recipe.py --config deployments/configs/knowledge-tiny.yaml --contexts 2

On ``--contexts`` contexts of the *training* split (so that choosing a default does not tune on
the held-out passages), the base model writes one self-edit per context and prompt; each is
applied under each recipe (``inner_loop.self_edit_epochs``: the paper's ``None``, or k passes
over the self-edit with the passage keeping its epochs), and scored closed-book against the
passage-only adapter on the same contexts: accuracy with a 95 % interval (a bootstrap over
contexts) and the paired difference against passage only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flows.cli import prepare_process

DEFAULT_CONFIG = Path(__file__).parents[1] / "deployments" / "configs" / "knowledge-smollm2.yaml"
PROMPTS = ("implications", "rewrite", "self-qa")
RECIPES = {"paper": None, "self-edit-once": 1}  # name -> inner_loop.self_edit_epochs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--contexts", type=int, default=24)
    parser.add_argument("--prompts", default=",".join(PROMPTS))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    prepare_process(prefect=False)  # as the seal command does

    import tempfile

    from models.base_model import load_model
    from models.config import load_config
    from models.knowledge_data import load_contexts, select_contexts
    from models.self_edit import inner_loop_plan, sample_self_edits_batch
    from models.stacked_lora import AdapterLanes
    from models.stats import accuracy_interval, paired_difference

    config = load_config(args.config, args.overrides)
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
    contexts = list(select_contexts(load_contexts(config.data, "train"), args.contexts, seed=config.data.seed + 1))
    questions = [c["questions"] for c in contexts]
    lanes = AdapterLanes.attach(
        loaded.model, loaded.tokenizer, config.lora, config.inner_loop.group_slots, config.inner_loop.lanes
    )
    folders = Path(tempfile.mkdtemp(prefix="inner-loop-recipe-"))

    def score(name: str, edits: list, self_edit_epochs: int | None) -> dict:
        inner = config.inner_loop.model_copy(update={"self_edit_epochs": self_edit_epochs})
        plans = [inner_loop_plan(e, c["title"], c["context"], inner) for c, e in zip(contexts, edits)]
        start = time.perf_counter()
        paths = [folders / name / str(i) for i in range(len(contexts))]
        results = lanes.train([docs for docs, _ in plans], plans[0][1], [inner.seed] * len(plans), folders=paths)
        train_s = time.perf_counter() - start
        scores = lanes.evaluate_saved(paths, questions, [c["answers"] for c in contexts], config.eval)
        return {
            "counts": [(s.num_correct, s.total) for s in scores],
            "train_s": train_s,
            "steps": sum(r.steps for r in results),
        }

    report = {
        "config": args.config,
        "overrides": args.overrides,
        "contexts": [c["id"] for c in contexts],
        "conditions": {},
        "self_edits": {},
    }
    conditions = {"passage_only": score("passage", [None] * len(contexts), None)}
    for prompt in args.prompts.split(","):
        edit_config = config.self_edit
        edits = [
            samples[0]
            for samples in sample_self_edits_batch(
                loaded.model,
                loaded.tokenizer,
                [(c["title"], c["context"]) for c in contexts],
                [config.seed + i for i in range(len(contexts))],
                kind=prompt,
                num_samples=1,
                temperature=edit_config.temperature,
                top_p=edit_config.top_p,
                max_new_tokens=edit_config.max_new_tokens,
                max_documents=edit_config.max_documents,
            )
        ]
        report["self_edits"][prompt] = [e.text for e in edits]
        for recipe in args.recipes.split(","):
            conditions[f"{prompt}/{recipe}"] = score(f"{prompt}-{recipe}", edits, RECIPES[recipe])
    passage = conditions["passage_only"]["counts"]
    print(f"{'condition':<32}{'correct':>10}{'accuracy [95 %]':>26}{'minus passage only [95 %]':>32}")
    for name, condition in conditions.items():
        estimate = accuracy_interval(condition["counts"])
        difference = paired_difference(condition["counts"], passage)
        condition |= {
            "correct": sum(n for n, _ in condition["counts"]),
            "total": sum(t for _, t in condition["counts"]),
            "accuracy": estimate.value,
            "low": estimate.low,
            "high": estimate.high,
            "minus_passage": difference.value,
            "minus_passage_low": difference.low,
            "minus_passage_high": difference.high,
        }
        print(
            f"{name:<32}{condition['correct']:>6}/{condition['total']:<3}{str(estimate):>26}"
            f"{f'{100 * difference.value:+.1f} [{100 * difference.low:+.1f}, {100 * difference.high:+.1f}]':>32}",
            flush=True,
        )
    report["conditions"] = conditions
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
