"""Peak memory and seconds per step of one stacked training group on the real model.

    python benchmarks/stacked_step.py                                   # make run's config
    python benchmarks/stacked_step.py inner_loop.max_batch_tokens=100000  # the step in one batch
    python benchmarks/stacked_step.py model.dtype=float32 --adapters 3

The flow's heaviest training step: ``inner_loop.group_size`` adapters (``--adapters``), each
trained on the longest held-out passages (the passage-only column, where every row is a
whole passage), for ``--documents`` steps. Prints the process's resident memory after loading
and its peak during training (sampled every 20 ms), and the seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

# Run as a script: the repository root on the path; offline and quiet as the seal command,
# before transformers reads its settings.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.cli import QUIET_ENV  # noqa: E402

for key, value in QUIET_ENV.items():
    os.environ.setdefault(key, value)

import psutil  # noqa: E402

from models.base_model import load_model  # noqa: E402
from models.config import load_config  # noqa: E402
from models.knowledge_data import load_contexts  # noqa: E402
from models.process import configure_process, release_freed_memory  # noqa: E402
from models.stacked_lora import AdapterStack, train_stacked  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parents[1] / "deployments" / "configs" / "knowledge-smollm2.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--adapters", type=int, help="adapters in the group (default: inner_loop.group_size)")
    parser.add_argument("--documents", type=int, default=3, help="copies of the passage per adapter: steps")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args()
    configure_process()  # as the seal command does (models/process.py)

    config = load_config(args.config, ["inner_loop.epochs=1", *args.overrides])
    adapters = args.adapters or config.inner_loop.group_size
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype)
    longest = sorted(load_contexts(config.data, "validation"), key=lambda c: -len(c["context"]))[:adapters]
    documents = [[f"{c['title']}\n{c['context']}"] * args.documents for c in longest]

    process = psutil.Process()
    release_freed_memory()
    loaded_mb = process.memory_info().rss / 2**20
    peak = [loaded_mb]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss / 2**20)

    threading.Thread(target=sample, daemon=True).start()
    stack = AdapterStack.attach(loaded.model, config.lora, adapters)
    stack.reset(list(range(adapters)))
    start = time.perf_counter()
    results = train_stacked(stack, loaded.tokenizer, documents, config.inner_loop)
    seconds = time.perf_counter() - start
    done.set()
    report = {
        "dtype": str(loaded.model.dtype),
        "adapters": adapters,
        "steps": results[0].steps,
        "max_batch_tokens": config.inner_loop.max_batch_tokens,
        "row_tokens": [r.tokens // r.steps for r in results],
        "seconds_per_step": seconds / results[0].steps,
        "loaded_mb": loaded_mb,
        "peak_training_mb": peak[0],
    }
    print(
        f"{adapters} adapters, {report['dtype']}, rows of {report['row_tokens']} tokens, "
        f"max_batch_tokens {report['max_batch_tokens']}: {report['seconds_per_step']:.2f} s per step; "
        f"resident {loaded_mb:.0f} MB after loading, peak {peak[0]:.0f} MB while training"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
