"""Seconds per inner loop (train + evaluate one self-edit) and peak memory, on the real model.

    python benchmarks/inner_loop.py                                   # SmolLM2, 8 self-edits
    python benchmarks/inner_loop.py --config deployments/configs/knowledge-tiny.yaml --self-edits 3

For each of N held-out contexts: sample one self-edit from the base model (timed apart, it is
not part of the inner loop), answer the questions without adaptation, then time the inner loop:
attach a fresh adapter, train on the self-edit plus the passage, answer the questions, detach.
Then the same self-edits again, K at a time, through stacked adapters (``models/stacked_lora.py``):
one batch per step holds rows of all K, each routed through its own LoRA weights.
Prints one line per self-edit, the medians, and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(key, value)

from models.base_model import load_model  # noqa: E402
from models.config import load_config  # noqa: E402
from models.demo import peak_memory_mb  # noqa: E402
from models.inner_loop import evaluate_adapter, fresh_adapter, train_adapter  # noqa: E402
from models.knowledge_data import load_contexts, select_contexts  # noqa: E402
from models.self_edit import sample_self_edits, training_documents  # noqa: E402
from models.stacked_lora import evaluate_stacked, stacked_adapters, train_stacked  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parents[1] / "deployments" / "configs" / "knowledge-smollm2.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--self-edits", type=int, default=8, help="inner loops to time")
    parser.add_argument("--stack", type=int, default=3, help="self-edits per stacked group (K)")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args()

    config = load_config(args.config, args.overrides)
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
    contexts = select_contexts(load_contexts(config.data, "validation"), args.self_edits, seed=config.data.seed)
    print(f"model {config.model.name} on {loaded.device}, lora r={config.lora.rank}, "
          f"lr={config.inner_loop.learning_rate}, epochs={config.inner_loop.epochs}, "
          f"batch={config.inner_loop.batch_size}", flush=True)

    records, inputs = [], []
    for index, ctx in enumerate(contexts):
        start = time.perf_counter()
        (self_edit,) = sample_self_edits(
            loaded.model, loaded.tokenizer, title=ctx["title"], context=ctx["context"],
            kind=config.self_edit.prompt, num_samples=1, temperature=config.self_edit.temperature,
            top_p=config.self_edit.top_p, max_new_tokens=config.self_edit.max_new_tokens,
            max_documents=config.self_edit.max_documents, seed=config.seed + index,
        )
        sampled = time.perf_counter()
        baseline = evaluate_adapter(loaded.model, loaded.tokenizer, ctx["questions"], ctx["answers"], config.eval)
        documents = training_documents(self_edit, ctx["title"], ctx["context"])
        begin = time.perf_counter()
        with fresh_adapter(loaded.model, config.lora, seed=config.inner_loop.seed) as adapted:
            trained = train_adapter(adapted, loaded.tokenizer, documents, config.inner_loop)
            scored = evaluate_adapter(adapted, loaded.tokenizer, ctx["questions"], ctx["answers"], config.eval)
        end = time.perf_counter()
        record = {
            "context": ctx["id"], "documents": len(documents), "questions": len(ctx["questions"]),
            "tokens": trained.tokens, "steps": trained.steps, "sample_s": sampled - start,
            "baseline_s": baseline.seconds, "train_s": trained.seconds, "eval_s": scored.seconds,
            "inner_loop_s": end - begin, "baseline_correct": baseline.num_correct,
            "adapted_correct": scored.num_correct,
        }
        records.append(record)
        inputs.append((documents, ctx["questions"], ctx["answers"]))
        print(f"  {ctx['id']}: {record['documents']} documents, {trained.tokens} tokens, "
              f"train {trained.seconds:.1f}s + eval {scored.seconds:.1f}s = {record['inner_loop_s']:.1f}s "
              f"(sample {record['sample_s']:.1f}s; correct {baseline.num_correct} -> {scored.num_correct}"
              f"/{len(ctx['questions'])})", flush=True)

    # The same self-edits again, K at a time through stacked adapters (one shared batch per step).
    k = args.stack
    stacked = []
    for first in range(0, len(inputs) - k + 1, k):
        group = inputs[first : first + k]
        begin = time.perf_counter()
        with stacked_adapters(loaded.model, config.lora, [config.inner_loop.seed] * k) as stack:
            trained = train_stacked(stack, loaded.tokenizer, [docs for docs, _, _ in group], config.inner_loop)
            scored = evaluate_stacked(stack, loaded.tokenizer, [q for _, q, _ in group], [a for _, _, a in group], config.eval)
        seconds = time.perf_counter() - begin
        stacked.append({"self_edits": k, "train_s": trained[0].seconds, "eval_s": scored[0].seconds,
                        "per_self_edit_s": seconds / k,
                        "correct": [r.num_correct for r in scored],
                        "sequential_correct": [r["adapted_correct"] for r in records[first : first + k]],
                        "sequential_per_self_edit_s": statistics.mean(
                            r["inner_loop_s"] for r in records[first : first + k])})
        print(f"  stacked x{k}: train {trained[0].seconds:.1f}s + eval {scored[0].seconds:.1f}s = "
              f"{seconds / k:.1f}s per self-edit (one by one: {stacked[-1]['sequential_per_self_edit_s']:.1f}s); "
              f"correct {stacked[-1]['correct']} vs {stacked[-1]['sequential_correct']}", flush=True)

    summary = {
        key: statistics.median(r[key] for r in records)
        for key in ("documents", "tokens", "sample_s", "baseline_s", "train_s", "eval_s", "inner_loop_s")
    }
    summary["tokens_per_s_train"] = sum(r["tokens"] for r in records) / sum(r["train_s"] for r in records)
    summary["peak_memory_mb"] = peak_memory_mb()
    print(f"median inner loop {summary['inner_loop_s']:.1f}s (train {summary['train_s']:.1f}s, "
          f"eval {summary['eval_s']:.1f}s) over {len(records)} self-edits of median "
          f"{summary['documents']:.0f} documents; training {summary['tokens_per_s_train']:.0f} tokens/s; "
          f"peak memory {summary['peak_memory_mb']:.0f} MB")
    if stacked:
        summary["stacked_per_self_edit_s"] = statistics.median(r["per_self_edit_s"] for r in stacked)
        summary["stacked_speedup"] = (
            statistics.median(r["sequential_per_self_edit_s"] for r in stacked) / summary["stacked_per_self_edit_s"]
        )
        print(f"stacked x{k}: median {summary['stacked_per_self_edit_s']:.1f}s per self-edit, "
              f"{summary['stacked_speedup']:.2f}x the one-by-one inner loop on the same self-edits")
    if args.json:
        Path(args.json).write_text(json.dumps({"records": records, "stacked": stacked, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
