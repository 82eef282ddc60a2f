"""Seconds per self-edit of SEAL's inner loop, ours against two Hugging Face baselines (issue 8).

    python benchmarks/inner_loop.py --json benchmarks/results/inner_loop-smollm2-cpu.json
    python benchmarks/inner_loop.py --config deployments/configs/knowledge-tiny.yaml   # seconds

The comparison's hyperparameters are the paper's inner loop (issue 8), applied as config
overrides before any given on the command line: fp32, LoRA r=32 alpha=64 dropout 0, lr 1e-3,
10 epochs, batch size 1, self-edits of up to 8 documents, answers of up to 64 greedy tokens;
the first 5 questions of contexts that have at least 5.

For each of ``--contexts`` held-out contexts, K self-edits are sampled from the base model in
one batched call (timed as sampling at batch K, and one more at batch 1; not part of the inner
loop). Then, on the same model in memory, the same self-edits' inner loops three ways:

- **ours**, the path the training flow takes (``models/stacked_lora/``): every context's
  no-adaptation answers in one batched call, then the self-edits in groups of
  ``inner_loop.group_size`` of similar length, each group trained together through stacked
  adapters in ``inner_loop.lanes`` lanes (``models/stacked_lora/lanes.py``) and evaluated in shared batched
  generations;
- **strong** and **reference**: see ``benchmarks/baselines.py``. The reference runs only
  ``--reference-self-edits`` self-edits and, with ``--reference-steps``, times that many
  training steps and extrapolates to the full count (it says so in its line).

Each method's seconds per self-edit, all-in, are its wall time divided by the self-edits it ran,
split into baseline answers / training / evaluation / other (attaching adapters, saving,
loading). Training FLOPs are approximated as 4 x parameters x tokens trained (issue 8; forward
2, backward through the frozen weights for the activations' gradients 2, LoRA's own FLOPs and
attention left out) and set against this machine's matrix-multiply peak in the model's dtype,
measured here with ``torch.mm``. On CUDA an untimed warm-up (one sampling call, one epoch of
ours and of strong) comes first. The speedup of ours over a baseline is the baseline's seconds
per self-edit over ours (equivalently ours' self-edits per minute over the baseline's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside Trainer
# Run as a script: the repository root on the path; offline and quiet as the seal command,
# before transformers reads its settings.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.cli import QUIET_ENV  # noqa: E402

for key, value in QUIET_ENV.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402

from benchmarks.baselines import SelfEditTiming, now, run_reference, run_strong  # noqa: E402
from models.base_model import LoadedModel, load_model  # noqa: E402
from models.config import SealConfig, load_config  # noqa: E402
from models.demo import peak_memory_mb  # noqa: E402
from models.errors import NonFiniteLossError  # noqa: E402
from models.inner_loop import evaluate_adapter  # noqa: E402
from models.knowledge_data import load_contexts, select_contexts  # noqa: E402
from models.process import configure_process  # noqa: E402
from models.self_edit import sample_self_edits, training_documents  # noqa: E402
from models.stacked_lora import AdapterLanes, length_groups  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parents[1] / "deployments" / "configs" / "knowledge-smollm2.yaml"
# Issue 8's hyperparameters (the paper's inner loop), fp32.
COMPARISON = [
    "model.dtype=float32",
    "lora.rank=32",
    "lora.alpha=64",
    "lora.dropout=0.0",
    "inner_loop.learning_rate=1e-3",
    "inner_loop.epochs=10",
    "inner_loop.batch_size=1",
    "self_edit.max_documents=8",
    "eval.max_new_tokens=64",
]
QUESTIONS = 5  # per context (issue 8)
FLOPS_FORMULA = "training FLOPs = 4 x parameters x tokens trained"


def matmul_peak_gflops(size: int, device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of one ``torch.mm`` of two ``size`` x ``size`` matrices of
    ``dtype``, with torch's configured threads and matmul precision (2 size^3 FLOPs each)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.mm(a, b)  # warm-up: threads, allocator, kernels
    best = float("inf")
    for _ in range(repeats):
        start = now(device)
        torch.mm(a, b, out=out)
        best = min(best, now(device) - start)
    return 2 * size**3 / best / 1e9


def sample(loaded: LoadedModel, config: SealConfig, ctx: dict, num_samples: int, seed: int) -> tuple[list, dict]:
    """``num_samples`` self-edits of ``ctx`` in one batched call, with its throughput: tokens of
    the decoded generations (special tokens removed) per second."""
    start = now(loaded.device)
    edits = sample_self_edits(
        loaded.model,
        loaded.tokenizer,
        title=ctx["title"],
        context=ctx["context"],
        kind=config.self_edit.prompt,
        num_samples=num_samples,
        temperature=config.self_edit.temperature,
        top_p=config.self_edit.top_p,
        max_new_tokens=config.self_edit.max_new_tokens,
        max_documents=config.self_edit.max_documents,
        seed=seed,
    )
    seconds = now(loaded.device) - start
    tokens = sum(len(loaded.tokenizer(e.text, add_special_tokens=False)["input_ids"]) for e in edits)
    return edits, {"batch": num_samples, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run_ours(
    loaded: LoadedModel,
    config: SealConfig,
    inputs: list[tuple[str, list[list[str]], list[str], list[list[str]]]],
) -> list[list[SelfEditTiming]]:
    """Every context's K self-edits (``inputs``: ``(context id, documents per self-edit,
    questions, answers)``) as the training flow runs an iteration's: all contexts'
    no-adaptation answers in one batched call, then groups of ``inner_loop.group_size``
    self-edits of similar length, each group's adapters trained together in
    ``inner_loop.lanes`` lanes, ``inner_loop.slots`` at a time (each saved as it finishes, its
    slot refilled), and evaluated from their folders in shared batched generations. Shared time is
    split evenly over the self-edits that shared it. One list of timings per context.

    Raises:
        NonFiniteLossError: if an adapter's loss became NaN or infinite.
    """
    device = loaded.device
    items = [(c, k) for c, (_, documents, _, _) in enumerate(inputs) for k in range(len(documents))]
    start = now(device)
    baselines = evaluate_adapter(
        loaded.model,
        loaded.tokenizer,
        [q for _, _, qs, _ in inputs for q in qs],
        [a for _, _, _, ans in inputs for a in ans],
        config.eval,
    )
    baseline_s = (now(device) - start) / len(items)
    baseline_correct, offset = [], 0
    for _, _, questions, _ in inputs:
        baseline_correct.append(sum(baselines.correct[offset : offset + len(questions)]))
        offset += len(questions)
    timings: list[list[SelfEditTiming | None]] = [[None] * len(documents) for _, documents, _, _ in inputs]
    size = config.inner_loop.group_size
    attach_start = now(device)
    lanes = AdapterLanes.attach(
        loaded.model,
        loaded.tokenizer,
        config.lora,
        min(config.inner_loop.group_slots, len(items)),
        config.inner_loop.lanes,
    )
    other_s = (now(device) - attach_start) / len(items)  # the replicas and their LoRA layers, once
    scratch = tempfile.mkdtemp(prefix="seal-inner-loop-")
    try:
        for number, group in enumerate(length_groups([len(inputs[c][1][k]) for c, k in items], size)):
            members = [items[i] for i in group]
            # As the flow does: each adapter saved as it finishes, evaluated from its folder.
            folders = [Path(scratch) / f"group{number}-{c}-{k}" for c, k in members]
            train_start = now(device)
            trained = lanes.train(
                [inputs[c][1][k] for c, k in members],
                config.inner_loop,
                [config.inner_loop.seed] * len(members),
                folders=folders,
            )
            train_end = now(device)
            for result in trained:
                if isinstance(result, NonFiniteLossError):
                    raise result
            scored = lanes.evaluate_saved(
                folders, [inputs[c][2] for c, _ in members], [inputs[c][3] for c, _ in members], config.eval
            )
            eval_end = now(device)
            share = len(members)
            for (c, k), result, score in zip(members, trained, scored):
                timings[c][k] = SelfEditTiming(
                    baseline_s=baseline_s,
                    train_s=(train_end - train_start) / share,
                    eval_s=(eval_end - train_end) / share,
                    other_s=other_s,
                    steps=result.steps,
                    steps_timed=result.steps,
                    tokens=result.tokens,
                    padded_tokens=None,
                    train_timed_s=(train_end - train_start) / share,
                    baseline_correct=baseline_correct[c],
                    correct=score.num_correct,
                    predictions=list(score.predictions),
                )
    finally:
        lanes.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return timings


def warm_up(
    loaded: LoadedModel, config: SealConfig, documents: list[list[str]], questions: list[str], answers: list[list[str]]
) -> None:
    """One untimed epoch of ours and of strong, so that neither method's timed runs pay for the
    device's one-time costs (CUDA kernels loaded and tuned, allocator pools grown)."""
    short = config.model_copy(update={"inner_loop": config.inner_loop.model_copy(update={"epochs": 1})})
    run_ours(loaded, short, [("warm-up", documents[:2], questions, answers)])
    run_strong(
        loaded.model, loaded.tokenizer, documents[:1], questions, answers, short.lora, short.inner_loop, short.eval
    )


def summarize(timings: list[SelfEditTiming], parameters: int, peak_gflops: float) -> dict:
    """Per-self-edit means of a method's timings, its throughput and its training FLOP rate."""
    n = len(timings)
    mean = {key: sum(getattr(t, key) for t in timings) / n for key in ("baseline_s", "train_s", "eval_s", "other_s")}
    per_self_edit = sum(t.total_s for t in timings) / n
    tokens = sum(t.tokens for t in timings)
    train_gflops = 4 * parameters * tokens / sum(t.train_s for t in timings) / 1e9
    return {
        "self_edits": n,
        "per_self_edit_s": per_self_edit,
        **mean,
        "self_edits_per_min": 60 / per_self_edit,
        "steps_per_self_edit": sum(t.steps for t in timings) / n,
        "tokens_per_self_edit": tokens / n,
        "train_tflop_per_self_edit": 4 * parameters * tokens / n / 1e12,
        "train_gflops_per_s": train_gflops,
        "train_fraction_of_peak": train_gflops / peak_gflops,
        "extrapolated": any(t.steps_timed < t.steps for t in timings),
        "baseline_correct": sum(t.baseline_correct for t in timings),
        "correct": sum(t.correct for t in timings),
        "questions": n * QUESTIONS,
    }


def _record(timing: SelfEditTiming, context: str, index: int) -> dict:
    return {"context": context, "self_edit": index, **vars(timing), "total_s": timing.total_s}


def _line(name: str, s: dict) -> str:
    return (
        f"{name:<10} {s['per_self_edit_s']:8.1f} s per self-edit (baseline {s['baseline_s']:.1f} + "
        f"training {s['train_s']:.1f} + evaluation {s['eval_s']:.1f} + other {s['other_s']:.1f}), "
        f"{s['self_edits_per_min']:.2f} self-edits/min; training {s['train_gflops_per_s']:.1f} GFLOP/s "
        f"= {s['train_fraction_of_peak']:.0%} of peak; correct {s['baseline_correct']} -> {s['correct']}"
        f"/{s['questions']} over {s['self_edits']} self-edits"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--contexts", type=int, default=2, help="held-out contexts (default 2)")
    parser.add_argument("--k", type=int, default=5, help="self-edits per context, trained together by ours (default 5)")
    parser.add_argument(
        "--reference-self-edits",
        type=int,
        default=1,
        help="self-edits the reference runs, from the first context on (default 1)",
    )
    parser.add_argument(
        "--reference-steps",
        type=int,
        default=3,
        help="training steps the reference times before extrapolating (0: all; default 3)",
    )
    parser.add_argument("--matmul-size", type=int, default=4096, help="side of the matrices of the peak measurement")
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="an untimed epoch of ours and strong first (default: on CUDA only)",
    )
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides, after issue 8's")
    args = parser.parse_args(argv)
    configure_process()  # as the seal command does (models/process.py)

    config = load_config(args.config, COMPARISON + args.overrides)
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
    device, model, tokenizer = loaded.device, loaded.model, loaded.tokenizer
    parameters = sum(p.numel() for p in model.parameters())
    dataset = load_contexts(config.data, "validation")
    dataset = dataset.select([i for i, qs in enumerate(dataset["questions"]) if len(qs) >= QUESTIONS])
    contexts = list(select_contexts(dataset, args.contexts, seed=config.data.seed))
    if len(contexts) < args.contexts:
        raise SystemExit(
            f"--contexts {args.contexts}: only {len(contexts)} held-out contexts have "
            f"{QUESTIONS} questions; lower --contexts or raise data.num_passages"
        )
    print(
        f"model {config.model.name} ({parameters / 1e6:.1f}M parameters, {config.model.dtype}) on {device}, "
        f"{torch.get_num_threads()} threads; lora r={config.lora.rank} alpha={config.lora.alpha} "
        f"dropout={config.lora.dropout} on {len(config.lora.target_modules)} module kinds, "
        f"lr={config.inner_loop.learning_rate:g}, epochs={config.inner_loop.epochs}, "
        f"batch={config.inner_loop.batch_size}; self-edits of <= {config.self_edit.max_documents} documents; "
        f"{QUESTIONS} questions, <= {config.eval.max_new_tokens} new tokens; "
        f"{args.contexts} contexts x K={args.k}",
        flush=True,
    )

    dtype = str(model.dtype).removeprefix("torch.")
    peak = matmul_peak_gflops(args.matmul_size, device, model.dtype)
    print(
        f"{dtype} matmul peak {peak:.1f} GFLOP/s (torch.mm {args.matmul_size}x{args.matmul_size}, best of 5)",
        flush=True,
    )
    memory = {"after_load_mb": peak_memory_mb()}

    warm = args.warmup if args.warmup is not None else device.type == "cuda"
    if warm:
        sample(loaded, config, contexts[0], 1, seed=config.seed)
    # Sampling: the self-edits every method trains on, then one more at batch 1 for its throughput.
    inputs, sampling = [], {"batch_1": [], "batch_k": []}
    for index, ctx in enumerate(contexts):
        edits, at_k = sample(loaded, config, ctx, args.k, seed=config.seed + index)
        _, at_1 = sample(loaded, config, ctx, 1, seed=config.seed + index)
        sampling["batch_k"].append(at_k)
        sampling["batch_1"].append(at_1)
        documents = [training_documents(edit, ctx["title"], ctx["context"]) for edit in edits]
        inputs.append((ctx["id"], documents, list(ctx["questions"][:QUESTIONS]), list(ctx["answers"][:QUESTIONS])))
        print(
            f"context {ctx['id']}: K={args.k} self-edits of {[len(d) for d in documents]} documents; "
            f"sampling batch {args.k}: {at_k['tokens_per_s']:.1f} tokens/s, "
            f"batch 1: {at_1['tokens_per_s']:.1f} tokens/s",
            flush=True,
        )
    memory["after_sampling_mb"] = peak_memory_mb()

    if warm:
        warm_up(loaded, config, *inputs[0][1:])
        print("warmed up: one epoch of ours (2 self-edits) and of strong (1), untimed", flush=True)

    timings: dict[str, list[SelfEditTiming]] = {"ours": [], "strong": [], "reference": []}
    records: dict[str, list[dict]] = {"ours": [], "strong": [], "reference": []}
    ours = run_ours(loaded, config, inputs)
    for method in ("ours", "strong"):
        for index, (context_id, documents, questions, answers) in enumerate(inputs):
            if method == "ours":
                result = ours[index]
            else:
                result = run_strong(
                    model, tokenizer, documents, questions, answers, config.lora, config.inner_loop, config.eval
                )
            timings[method] += result
            records[method] += [_record(t, context_id, i) for i, t in enumerate(result)]
            print(
                f"  {method:<9} {context_id}: {sum(t.total_s for t in result) / len(result):.1f} s per self-edit "
                f"(train {sum(t.train_s for t in result):.1f} s for {len(result)}), "
                f"correct {result[0].baseline_correct} -> {[t.correct for t in result]}",
                flush=True,
            )
        memory[f"after_{method}_mb"] = peak_memory_mb()

    queue = [(cid, i, docs, q, a) for cid, documents, q, a in inputs for i, docs in enumerate(documents)]
    for context_id, index, docs, questions, answers in queue[: args.reference_self_edits]:
        timing = run_reference(
            model,
            tokenizer,
            docs,
            questions,
            answers,
            config.lora,
            config.inner_loop,
            config.eval,
            timed_steps=args.reference_steps or None,
        )
        timings["reference"].append(timing)
        records["reference"].append(_record(timing, context_id, index))
        how = (
            f"EXTRAPOLATED from {timing.steps_timed} timed step(s) ({timing.train_timed_s:.1f} s) to {timing.steps}"
            if timing.steps_timed < timing.steps
            else f"all {timing.steps} steps timed"
        )
        print(
            f"  reference {context_id}/{index}: {timing.total_s:.1f} s (training {timing.train_s:.1f} s, {how})",
            flush=True,
        )
    memory["after_reference_mb"] = peak_memory_mb()
    if device.type == "cuda":
        memory["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

    summary = {method: summarize(t, parameters, peak) for method, t in timings.items() if t}
    speedup = {
        name: summary[name]["per_self_edit_s"] / summary["ours"]["per_self_edit_s"]
        for name in ("strong", "reference")
        if name in summary
    }
    sampling_summary = {
        key: {
            "tokens": sum(r["tokens"] for r in rows),
            "seconds": sum(r["seconds"] for r in rows),
            "tokens_per_s": sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows),
        }
        for key, rows in sampling.items()
    }
    print(f"{FLOPS_FORMULA} ({parameters / 1e6:.1f}M parameters); peak {peak:.1f} GFLOP/s")
    for method, s in summary.items():
        print(_line(method, s))
    if summary.get("reference", {}).get("extrapolated"):
        print(
            f"reference: training time EXTRAPOLATED from {args.reference_steps} timed step(s) per self-edit "
            f"to the full {summary['reference']['steps_per_self_edit']:.0f}"
        )
    for name, ratio in speedup.items():
        print(
            f"ours vs {name}: {ratio:.2f}x ({name} {summary[name]['per_self_edit_s']:.1f} s / ours "
            f"{summary['ours']['per_self_edit_s']:.1f} s per self-edit, all-in)"
        )
    print(
        f"sampling: batch 1 {sampling_summary['batch_1']['tokens_per_s']:.1f} tokens/s, "
        f"batch {args.k} {sampling_summary['batch_k']['tokens_per_s']:.1f} tokens/s"
    )
    print("peak memory " + ", ".join(f"{key[:-3].replace('_', ' ')} {value:.0f} MB" for key, value in memory.items()))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "config": args.config,
                    "overrides": COMPARISON + args.overrides,
                    "model": config.model.name,
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                    "contexts": args.contexts,
                    "k": args.k,
                    "questions_per_context": QUESTIONS,
                    "parameters": parameters,
                    "flops_formula": FLOPS_FORMULA,
                    "matmul": {"size": args.matmul_size, "dtype": dtype, "peak_gflops": peak},
                    "sampling": {**sampling_summary, "runs": sampling},
                    "reference_steps_timed": args.reference_steps,
                    "summary": summary,
                    "speedup": speedup,
                    "peak_memory_mb": memory,
                    "records": records,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
