"""SEAL's inner loop: a fresh LoRA adapter trained on one self-edit, then scored closed-book.

The base model stays in memory across self-edits: :func:`fresh_adapter` wraps it in LoRA
layers, :func:`train_adapter` trains only those, :func:`evaluate_adapter` answers questions
with no passage in the prompt, and leaving the context unloads the LoRA layers again, so the
base weights are never touched.
"""

from __future__ import annotations

import re
import shutil
import string
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import peft
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.base_model import resolve_model, save_model
from models.config import EvalConfig, InnerLoopConfig, LoraConfig
from models.errors import NonFiniteLossError  # noqa: F401  (train_adapter's error, caught by its callers as ours)
from models.self_edit import QUESTION_PROMPT, answer_lines, render_prompt
from models.training import backward_loss, fit


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens: int
    mean_loss: float
    final_loss: float
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Closed-book answers to a context's questions, graded by normalized answer match."""

    predictions: tuple[str, ...]
    correct: tuple[bool, ...]
    f1: tuple[float, ...]
    seconds: float = 0.0

    @property
    def num_correct(self) -> int:
        return sum(self.correct)

    @property
    def total(self) -> int:
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.total if self.total else 0.0

    @property
    def mean_f1(self) -> float:
        return sum(self.f1) / len(self.f1) if self.f1 else 0.0


def lora_config(lora: LoraConfig) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: PreTrainedModel, lora: LoraConfig) -> peft.PeftModel:
    """Wrap ``model`` in new LoRA layers (A drawn from torch's global generator, B zero); only
    they train.

    Raises:
        ValueError: if none of ``lora.target_modules`` exists in the model.
    """
    try:
        return peft.get_peft_model(model, lora_config(lora))
    except ValueError as exc:
        raise ValueError(f"lora.target_modules {lora.target_modules} matched no layer of the model: {exc}") from exc


@contextmanager
def fresh_adapter(model: PreTrainedModel, lora: LoraConfig, seed: int) -> Iterator[peft.PeftModel]:
    """Attach a freshly initialized LoRA adapter for the duration of the block.

    LoRA's A matrices are initialized from ``seed`` (B is zero, so the adapted model starts
    equal to the base). On exit the LoRA layers are removed and ``model`` is as before.

    Raises:
        ValueError: if none of ``lora.target_modules`` exists in the model.
    """
    torch.manual_seed(seed)
    adapted = attach_lora(model, lora)
    try:
        yield adapted
    finally:
        adapted.unload()


T = TypeVar("T")


def train_and_merge(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lora: LoraConfig,
    seed: int,
    train: Callable[[peft.PeftModel], T],
    folder: Path,
    source: str,
) -> tuple[str, T]:
    """Train a fresh LoRA adapter with ``train``, merge it into ``model``'s weights and save the
    merged model to ``folder`` (atomically, with ``source`` as its origin in the manifest).

    LoRA's A matrices are initialized from ``seed`` (B is zero, so training starts at
    ``model``). ``model`` is modified in place: pass a private copy, never a cached model. If
    ``train`` raises, the LoRA layers are removed again, ``model`` keeps its weights and
    nothing is written.

    Returns:
        The saved weights' digest, read back from disk (if another process wrote ``folder``
        first, its copy is the one kept), and what ``train`` returned.
    """
    torch.manual_seed(seed)
    adapted = attach_lora(model, lora)
    try:
        trained = train(adapted)
    except BaseException:
        adapted.unload()
        raise
    merged = adapted.merge_and_unload()
    merged.eval()
    save_model(merged, tokenizer, Path(folder), source=source)
    return resolve_model(str(folder)).digest, trained


class AdapterSlot:
    """LoRA layers attached to a model once and reused by every inner loop on it.

    Attaching LoRA layers (``get_peft_model``) and removing them again costs about a second per
    inner loop for SmolLM2 on a CPU, and loading a saved adapter as many again; a slot pays that
    once. :meth:`fresh` re-initializes the layers in place from a seed (A as ``nn.Linear`` does,
    B zero, so training starts at the base model), :meth:`loaded` fills them from a saved
    adapter. Outside those blocks the layers are disabled and the model answers exactly as the
    base model, so one cached model serves sampling, baselines and inner loops alike.

    Use a slot only on a model you own (a worker's cache, not a model shared with other code):
    it stays wrapped until :meth:`close`.

        slot = AdapterSlot(model, config.lora)
        with slot.fresh(seed=0) as adapted:
            train_adapter(adapted, tokenizer, documents, config.inner_loop)
            save_adapter(adapted, folder)
        with slot.loaded(folder) as adapted:
            evaluate_adapter(adapted, tokenizer, questions, answers, config.eval)
    """

    def __init__(self, model: PreTrainedModel, lora: LoraConfig) -> None:
        self.lora = lora
        self.peft = attach_lora(model, lora)
        self._layers = [m for m in self.peft.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        self.peft.base_model.disable_adapter_layers()

    def matches(self, lora: LoraConfig) -> bool:
        """Whether ``lora`` describes this slot's layers (module order aside)."""
        return (lora.rank, lora.alpha, lora.dropout, set(lora.target_modules)) == (
            self.lora.rank,
            self.lora.alpha,
            self.lora.dropout,
            set(self.lora.target_modules),
        )

    @contextmanager
    def fresh(self, seed: int) -> Iterator[peft.PeftModel]:
        """A freshly initialized adapter for the block (the same for the same seed)."""
        torch.manual_seed(seed)
        with torch.no_grad():
            for layer in self._layers:
                layer.reset_lora_parameters("default", init_lora_weights=True)
        with self._enabled():
            yield self.peft

    @contextmanager
    def loaded(self, folder: Path) -> Iterator[peft.PeftModel]:
        """The adapter saved in ``folder`` (by :func:`save_adapter`, with this slot's LoRA
        settings) for the block."""
        from safetensors.torch import load_file

        state = load_file(Path(folder) / "adapter_model.safetensors", device=str(self.peft.device))
        result = peft.set_peft_model_state_dict(self.peft, state)
        if result.unexpected_keys:
            raise ValueError(
                f"adapter {folder} does not fit this slot's LoRA layers: unexpected {result.unexpected_keys[:3]}"
            )
        with self._enabled():
            self.peft.eval()
            yield self.peft

    @contextmanager
    def _enabled(self) -> Iterator[None]:
        self.peft.base_model.enable_adapter_layers()
        try:
            yield
        finally:
            self.peft.base_model.disable_adapter_layers()

    def close(self) -> None:
        """Remove the LoRA layers: the model is as it was before the slot."""
        self.peft.unload()


def tokenize_documents(
    tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], max_length: int
) -> list[list[int]]:
    """Token ids of each document followed by EOS, truncated to ``max_length``."""
    encoded = tokenizer(list(documents), add_special_tokens=True, truncation=True, max_length=max_length - 1)
    return [ids + [tokenizer.eos_token_id] for ids in encoded["input_ids"]]


def pad_batch(sequences: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding is masked out of attention and of the loss."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
    # Labels from the mask, not the pad id: many tokenizers pad with EOS, which we do train on.
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_adapter(
    model: peft.PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    config: InnerLoopConfig,
) -> TrainResult:
    """Supervised fine-tuning of the attached adapter on ``documents``.

    AdamW on the LoRA parameters only, learning rate decaying linearly to zero and gradients
    clipped to ``config.max_grad_norm`` (the paper's Hugging Face Trainer's defaults), documents
    reshuffled every epoch from ``config.seed`` (see :func:`models.training.fit`).

    Args:
        model: a model with a trainable adapter attached (see :func:`fresh_adapter`).
        tokenizer: the model's tokenizer.
        documents: the training documents (see ``models.self_edit.training_documents``).
        config: learning rate, epochs, batch size, max length and seed.

    Returns:
        Step count, tokens trained on, mean and final loss, seconds.

    Raises:
        ValueError: if ``documents`` is empty.
        NonFiniteLossError: if a loss is NaN or infinite (the adapter is then unusable).
    """
    if not documents:
        raise ValueError("train_adapter needs at least one document, got none")
    sequences = tokenize_documents(tokenizer, documents, config.max_length)
    start = time.perf_counter()
    losses = fit(
        model,
        sequences,
        lambda rows: backward_loss(model, pad_batch(rows, tokenizer.pad_token_id)),
        learning_rate=config.learning_rate,
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        max_grad_norm=config.max_grad_norm,
        # The fused kernel does the update in one pass, saving time every step (benchmarks/README.md).
        fused=model.device.type in ("cpu", "cuda"),
        learning_rate_setting="inner_loop.learning_rate",
    )
    return TrainResult(
        steps=len(losses),
        tokens=config.epochs * sum(len(s) for s in sequences),  # each document once per epoch
        mean_loss=sum(losses) / len(losses),
        final_loss=losses[-1],
        seconds=time.perf_counter() - start,
    )


def answer_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    config: EvalConfig,
) -> list[str]:
    """Greedy closed-book answers (no passage in the prompt), batched; first line of each."""
    prompts = [render_prompt(tokenizer, QUESTION_PROMPT.format(question=q)) for q in questions]
    answers: list[str] = []
    for first in range(0, len(prompts), config.batch_size):
        outputs = answer_lines(
            model, tokenizer, prompts[first : first + config.batch_size], max_new_tokens=config.max_new_tokens
        )
        answers += [first_line(text) for text in outputs]
    return answers


def evaluate_adapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[Sequence[str]],
    config: EvalConfig,
) -> EvalResult:
    """Score the model as it is now (with its adapter, if attached) on a context's questions.

    Args:
        questions: the questions, asked without the passage.
        answers: for each question, the acceptable gold answers.

    Returns:
        Predictions, per-question correctness (normalized gold contained in the prediction)
        and token F1 (best over the golds).
    """
    (result,) = evaluate_contexts(model, tokenizer, [questions], [answers], config)
    return result


def evaluate_contexts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Sequence[str]],
    answers: Sequence[Sequence[Sequence[str]]],
    config: EvalConfig,
) -> list[EvalResult]:
    """:func:`evaluate_adapter` for several contexts' questions, asked in shared batches.

    Each result's ``seconds`` is its share of the total (by question count).
    """
    for qs, golds in zip(questions, answers, strict=True):
        if len(qs) != len(golds):
            raise ValueError(f"{len(qs)} questions but {len(golds)} answer lists")
    start = time.perf_counter()
    predictions = answer_questions(model, tokenizer, [q for qs in questions for q in qs], config)
    return grade(predictions, answers, time.perf_counter() - start)


def grade(predictions: Sequence[str], answers: Sequence[Sequence[Sequence[str]]], seconds: float) -> list[EvalResult]:
    """Split ``predictions`` (all contexts' questions in order) into one graded result per
    context; ``answers[i]`` holds context i's gold answers per question."""
    total = sum(len(golds) for golds in answers)
    results, offset = [], 0
    for golds in answers:
        preds = predictions[offset : offset + len(golds)]
        offset += len(golds)
        results.append(
            EvalResult(
                predictions=tuple(preds),
                correct=tuple(is_correct(p, g) for p, g in zip(preds, golds)),
                f1=tuple(max(token_f1(p, gold) for gold in g) for p, g in zip(preds, golds)),
                seconds=seconds * len(golds) / total if total else 0.0,
            )
        )
    return results


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; on success it replaces ``folder`` in one rename,
    so a killed process never leaves a half-written folder under the final name."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def saved_lora(folder: Path) -> LoraConfig:
    """The LoRA settings an adapter was saved with (its ``adapter_config.json``)."""
    saved = peft.LoraConfig.from_pretrained(str(folder))
    return LoraConfig(
        rank=saved.r, alpha=saved.lora_alpha, dropout=saved.lora_dropout, target_modules=sorted(saved.target_modules)
    )


def save_adapter(model: peft.PeftModel, folder: Path) -> Path:
    """Save the attached adapter in PEFT's safetensors format, atomically."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)


@contextmanager
def loaded_adapter(model: PreTrainedModel, folder: Path) -> Iterator[peft.PeftModel]:
    """Attach a saved adapter for the duration of the block, then remove it."""
    adapted = peft.PeftModel.from_pretrained(model, folder)
    adapted.eval()
    try:
        yield adapted
    finally:
        adapted.unload()


# --- grading (SQuAD-style normalization) ---

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def is_correct(prediction: str, golds: Sequence[str]) -> bool:
    """Whether any normalized gold answer appears, as whole words, in the prediction."""
    padded = f" {normalize_answer(prediction)} "
    return any(normalize_answer(g) and f" {normalize_answer(g)} " in padded for g in golds)


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between a prediction and one gold answer."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""
