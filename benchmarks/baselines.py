"""The two Hugging Face baselines that ``benchmarks/inner_loop.py`` times ours against (issue 8).

Both train and evaluate exactly what ours does: the same model in memory, the same documents
(tokenized as ``models.inner_loop.tokenize_documents`` does: truncated, EOS appended), the same
LoRA settings (``lora.target_modules`` included: the reference's own default is q/v only, which
would make its training cheaper for another reason than its approach), learning rate, epochs,
batch size, questions and greedy answers (first line graded, generation stopped at a newline).
They differ only in how the work is done:

- **reference**, as the paper's ``knowledge-incorporation/src/inner/TTT_server.py`` does it:
  per self-edit a ``Trainer`` on documents padded to 2048 tokens with the padding left in the
  labels, ``get_peft_model`` applied to the base model again, the adapter saved to disk and
  loaded again for evaluation, questions answered one at a time, and the no-adaptation baseline
  answered again for every self-edit. (The reference answers through vLLM; here ``generate``
  answers one question per call, as the issue specifies.) It can time a few training steps
  and extrapolate to the full count.
- **strong**, what a careful engineer writes with the same libraries: ``Trainer`` with dynamic
  padding and labels masked (-100) on padding, the adapter kept in memory, each context's
  questions answered in batched generations (left padding), and the no-adaptation baseline
  answered once per context and shared by its K self-edits.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
from datasets import Dataset
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from models.config import EvalConfig, InnerLoopConfig, LoraConfig
from models.inner_loop import first_line, is_correct, lora_config, tokenize_documents
from models.self_edit import QUESTION_PROMPT, render_prompt

REFERENCE_MAX_LENGTH = 2048  # TTT_server.py --max_seq_length: every document is padded to it


@dataclass
class SelfEditTiming:
    """One self-edit's inner loop under a baseline; seconds are wall time on this process.

    ``baseline_s`` is this self-edit's share of the no-adaptation answers (all of it for the
    reference, 1/K of the context's for strong). ``train_s`` is extrapolated when ``steps_timed``
    is less than ``steps``; ``train_timed_s`` is what was measured.
    """

    baseline_s: float
    train_s: float
    eval_s: float
    other_s: float  # attaching, saving and loading adapters, building the Trainer's dataset
    steps: int
    steps_timed: int
    tokens: int  # document tokens trained on (padding excluded), as ours counts them
    padded_tokens: int | None  # positions the training passes ran over (padding included), if known
    train_timed_s: float
    baseline_correct: int
    correct: int
    predictions: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.baseline_s + self.train_s + self.eval_s + self.other_s


def now(device: torch.device) -> float:
    """``perf_counter`` after the device finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reference_rows(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], max_length: int) -> list[dict]:
    """The reference's training rows: padded to 2048 tokens, labels a copy of the input ids, so
    the loss also runs over the padding (``TTT_server.py``: ``padding="max_length"``,
    ``labels = tok["input_ids"].copy()``)."""
    rows = []
    for ids in tokenize_documents(tokenizer, documents, max_length):
        padding = REFERENCE_MAX_LENGTH - len(ids)
        input_ids = ids + [tokenizer.pad_token_id] * padding
        rows.append(
            {"input_ids": input_ids, "attention_mask": [1] * len(ids) + [0] * padding, "labels": list(input_ids)}
        )
    return rows


def strong_rows(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], max_length: int) -> list[dict]:
    """Unpadded rows; :func:`strong_collator` pads each batch to its longest row."""
    return [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
        for ids in tokenize_documents(tokenizer, documents, max_length)
    ]


def strong_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Dynamic padding; labels padded with -100, so padding is out of the loss (by position, not
    by pad id: SmolLM2 pads with a token it also trains on)."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")


class CountingCollator:
    """A collator that also counts the tokens of the batches it built: ``tokens`` (attended)
    and ``padded_tokens`` (every position the model runs over)."""

    def __init__(self, collate):
        self.collate, self.tokens, self.padded_tokens = collate, 0, 0

    def __call__(self, features):
        batch = self.collate(features)
        self.tokens += int(batch["attention_mask"].sum())
        self.padded_tokens += batch["input_ids"].numel()
        return batch


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, update), for extrapolation."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._start = device, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = now(self.device)

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(now(self.device) - self._start)


def extrapolate(train_s: float, step_seconds: Sequence[float], steps: int) -> float:
    """Training seconds for ``steps`` steps from a run of ``len(step_seconds)`` of them: what the
    run spent outside its later steps (setup, first step) plus the later steps' mean for each
    step still to go. With one timed step, that step stands for every one."""
    if len(step_seconds) >= steps:
        return train_s
    if len(step_seconds) == 1:
        return train_s - step_seconds[0] + step_seconds[0] * steps
    later = step_seconds[1:]
    per_step = sum(later) / len(later)
    return train_s - sum(later) + per_step * (steps - 1)


def _trainer(
    model,
    rows,
    collator,
    config: InnerLoopConfig,
    output_dir: Path,
    *,
    max_steps: int,
    logging_steps: int,
    timer: StepTimer,
) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        max_steps=max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",  # the Trainer's default, as ours decays to zero
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=config.seed,
        label_names=["labels"],
        use_cpu=model.device.type == "cpu",
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator, callbacks=[timer]
    )
    trainer.remove_callback(PrinterCallback)  # the logs are still made, just not printed
    return trainer


def training_steps(documents: int, config: InnerLoopConfig) -> int:
    """Optimizer steps of one self-edit's training (the Trainer drops no last partial batch)."""
    return -(-documents // config.batch_size) * config.epochs


@torch.no_grad()
def answer_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy closed-book answers, ``batch_size`` questions per ``generate`` call (left padded);
    the first line of each, generation stopped at a newline."""
    prompts = [render_prompt(tokenizer, QUESTION_PROMPT.format(question=q)) for q in questions]
    answers: list[str] = []
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for first in range(0, len(prompts), batch_size):
            batch = tokenizer(
                prompts[first : first + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                stop_strings=["\n"],
                tokenizer=tokenizer,
            )
            # (rows, prompt + new) -> (rows, new)
            texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            answers += [first_line(text) for text in texts]
    finally:
        tokenizer.padding_side = padding_side
    return answers


def _num_correct(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> int:
    return sum(is_correct(p, golds) for p, golds in zip(predictions, answers))


def _restore_requires_grad(model: PreTrainedModel, flags: list[bool]) -> None:
    # get_peft_model freezes the base weights and unload() leaves them frozen.
    for p, flag in zip(model.parameters(), flags):
        p.requires_grad_(flag)


def run_reference(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    questions: Sequence[str],
    answers: Sequence[Sequence[str]],
    lora: LoraConfig,
    train: InnerLoopConfig,
    evaluate: EvalConfig,
    timed_steps: int | None = None,
) -> SelfEditTiming:
    """One self-edit's inner loop the reference's way (see the module docstring).

    Args:
        timed_steps: train only this many steps and extrapolate the training time to the full
            count (the adapter is then undertrained: its answers are not the full run's).
            None trains every step.

    Returns:
        The timing, with ``steps_timed < steps`` when extrapolated.
    """
    device = model.device
    steps = training_steps(len(documents), train)
    run_steps = steps if timed_steps is None else min(timed_steps, steps)
    requires_grad = [p.requires_grad for p in model.parameters()]
    workdir = Path(tempfile.mkdtemp(prefix="seal-reference-"))
    try:
        start = now(device)
        baseline = answer_questions(model, tokenizer, questions, evaluate.max_new_tokens, batch_size=1)
        baseline_end = now(device)
        rows = reference_rows(tokenizer, documents, train.max_length)
        torch.manual_seed(train.seed)
        adapted = peft.get_peft_model(model, lora_config(lora))
        timer = StepTimer(device)
        trainer = _trainer(
            adapted,
            rows,
            DataCollatorWithPadding(tokenizer),
            train,
            workdir,
            max_steps=run_steps,
            logging_steps=1,
            timer=timer,
        )
        train_start = now(device)
        trainer.train()
        train_end = now(device)
        adapter_folder = workdir / "final_adapter"
        adapted.save_pretrained(str(adapter_folder))
        adapted.unload()
        loaded = peft.PeftModel.from_pretrained(model, str(adapter_folder))
        loaded.eval()
        eval_start = now(device)
        predictions = answer_questions(loaded, tokenizer, questions, evaluate.max_new_tokens, batch_size=1)
        eval_end = now(device)
        loaded.unload()
        end = now(device)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        _restore_requires_grad(model, requires_grad)
        model.eval()
    train_timed = train_end - train_start
    return SelfEditTiming(
        baseline_s=baseline_end - start,
        train_s=extrapolate(train_timed, timer.seconds, steps),
        eval_s=eval_end - eval_start,
        other_s=(end - start) - (baseline_end - start) - train_timed - (eval_end - eval_start),
        steps=steps,
        steps_timed=len(timer.seconds),
        tokens=sum(sum(r["attention_mask"]) for r in rows) * train.epochs,
        padded_tokens=REFERENCE_MAX_LENGTH * len(rows) * train.epochs,
        train_timed_s=train_timed,
        baseline_correct=_num_correct(baseline, answers),
        correct=_num_correct(predictions, answers),
        predictions=predictions,
    )


def run_strong(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[Sequence[str]],
    questions: Sequence[str],
    answers: Sequence[Sequence[str]],
    lora: LoraConfig,
    train: InnerLoopConfig,
    evaluate: EvalConfig,
) -> list[SelfEditTiming]:
    """The K self-edits of one context (``documents[k]``) the strong baseline's way.

    Returns:
        One timing per self-edit; each carries 1/K of the shared baseline answers.
    """
    device = model.device
    requires_grad = [p.requires_grad for p in model.parameters()]
    start = now(device)
    baseline = answer_questions(model, tokenizer, questions, evaluate.max_new_tokens, evaluate.batch_size)
    baseline_s = now(device) - start
    timings = []
    workdir = Path(tempfile.mkdtemp(prefix="seal-strong-"))
    try:
        for docs in documents:
            begin = now(device)
            rows = strong_rows(tokenizer, docs, train.max_length)
            torch.manual_seed(train.seed)
            adapted = peft.get_peft_model(model, lora_config(lora))
            timer, collator = StepTimer(device), CountingCollator(strong_collator(tokenizer))
            # Loss logged once at the end: a per-step log would sync the device every step.
            trainer = _trainer(adapted, rows, collator, train, workdir, max_steps=-1, logging_steps=10**9, timer=timer)
            train_start = now(device)
            trainer.train()
            train_end = now(device)
            adapted.eval()
            predictions = answer_questions(adapted, tokenizer, questions, evaluate.max_new_tokens, evaluate.batch_size)
            eval_end = now(device)
            adapted.unload()
            _restore_requires_grad(model, requires_grad)
            model.eval()
            end = now(device)
            steps = training_steps(len(docs), train)
            timings.append(
                SelfEditTiming(
                    baseline_s=baseline_s / len(documents),
                    train_s=train_end - train_start,
                    eval_s=eval_end - train_end,
                    other_s=(end - begin) - (eval_end - train_start),
                    steps=steps,
                    steps_timed=len(timer.seconds),
                    tokens=collator.tokens,
                    padded_tokens=collator.padded_tokens,
                    train_timed_s=train_end - train_start,
                    baseline_correct=_num_correct(baseline, answers),
                    correct=_num_correct(predictions, answers),
                    predictions=predictions,
                )
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        _restore_requires_grad(model, requires_grad)
        model.eval()
    return timings
