"""Continual self-adaptation: self-edits merged one after another, and what they forget.

The paper's §5 experiment (its reference code's ``continual_self_edits``): for a sequence of K
passages, at step k the current model writes a self-edit for passage k, a fresh LoRA is trained
on it plus the passage (:func:`continual_documents`) and merged into the weights
(:func:`merge_self_edit`), and the merged model answers the questions of passages 0..k. The
accuracies form a (K+1) x K matrix ``M``: row 0 is the model before any edit on every passage,
row r (r >= 1) the model after r merges on passages 0..r-1; cells above the diagonal are NaN.

    M[r, j]   accuracy on passage j after r merges (passage j's own merge is merge j+1)

Measures over a matrix (:func:`summarize`), every one a mean over passages:

- ``newest``: ``M[j+1, j]``, a passage right after its own merge.
- ``forgetting``: ``M[j+1, j] - M[K, j]``, the drop from right after its own merge to the end
  (the last passage has nothing after it and is left out).
- ``forgetting_max``: ``max_{r > j} M[r, j] - M[K, j]`` (Chaudhry et al. 2018): the drop from its
  best accuracy after its own merge.
- ``backward_transfer``: GEM's (Lopez-Paz & Ranzato 2017), ``M[K, j] - M[j+1, j]`` over the
  first K-1 passages; with ``forgetting`` measured from the same cells it is its negative,
  reported under its usual name for comparison with the literature.
- ``gain_over_base``: ``M[K, j] - M[0, j]``: what a passage keeps at the end over the unedited
  model (the paper: after 8 edits the first passage falls below its unedited score).

Drift (:func:`probe_kl`): after each merge, the KL divergence of the merged model's next-token
distributions from the step-0 model's on fixed probe texts unrelated to the passages
(:data:`PROBE_TEXTS`), a signal that needs no questions.

Routed adapters (:func:`run_routed_step`), the mitigation: each step's LoRA is trained on the
step-0 model and kept apart instead of merged; every question (and probe text) is answered by
the one adapter under which it is most likely (:func:`route_by_likelihood`), so a later step
can only take an earlier passage's questions by explaining them better. No passage text is
kept: the router reads the adapters alone. Its cost is an adapter per passage on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.base_model import resolve_model
from models.config import EvalConfig, InnerLoopConfig, LoraConfig
from models.inner_loop import (
    EvalResult,
    TrainResult,
    evaluate_contexts,
    fresh_adapter,
    grade,
    save_adapter,
    train_adapter,
    train_and_merge,
)
from models.self_edit import SelfEdit, inner_loop_plan
from models.stacked_lora import AdapterStack, evaluate_stacked

# Fixed texts far from any passage (recipes, code, weather, arithmetic, ...): the drift probe.
PROBE_TEXTS = (
    "To make a simple tomato sauce, warm olive oil in a pan, add chopped garlic and cook until fragrant.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "Tomorrow will be cloudy in the morning with light rain in the afternoon and a high of 14 degrees.",
    "The quick brown fox jumps over the lazy dog while the cat watches from the windowsill.",
    "Seven times eight is fifty-six, and fifty-six divided by four is fourteen.",
    "Dear team, the meeting has moved to Thursday at ten; please bring your quarterly notes.",
    "A triangle with sides three, four and five has a right angle opposite its longest side.",
    "Water boils at one hundred degrees Celsius at sea level and at a lower temperature on mountains.",
    "She tied her running shoes, stretched for five minutes and set off along the river path.",
    "SELECT name, email FROM users WHERE created_at > '2024-01-01' ORDER BY name;",
    "The library opens at nine on weekdays and at noon on Sundays; it is closed on public holidays.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in green leaves.",
    "Press and hold the power button for ten seconds, then release it and wait for the light to blink.",
    "In chess, a knight moves in an L shape: two squares in one direction and one to the side.",
    "Mix two cups of flour with a teaspoon of baking powder, a pinch of salt and a cup of milk.",
    "The train to the airport leaves every twenty minutes from platform three.",
    "Good sleep, regular exercise and plenty of water help most people feel better during the day.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')",
    "The museum's new wing shows paintings, maps and tools from the age of sail.",
    "Turn left at the bakery, walk two blocks and the post office is on your right.",
    "A bicycle chain needs a few drops of oil every month and a wipe with a dry cloth afterwards.",
    "The recipe serves four people and takes about forty minutes from start to finish.",
    "Most houseplants prefer bright indirect light and soil that dries out between waterings.",
    "Her favourite song starts quietly with a piano and ends with the whole orchestra playing.",
    "Please restart the application after installing the update so the changes take effect.",
    "Ice floats because it is less dense than liquid water.",
    "The children built a sandcastle with four towers and a moat that filled at high tide.",
    "An umbrella, a scarf and warm gloves are useful on a windy winter day.",
    "git commit -m 'Fix typo in the README' && git push origin main",
    "The sum of the angles of any triangle drawn on a flat plane is one hundred and eighty degrees.",
    "He ordered a coffee with milk and a slice of apple cake and sat by the window.",
    "Recycling bins are collected on Tuesday mornings; put them out the night before.",
)


@dataclass(frozen=True)
class MergeResult:
    """A merged checkpoint: its folder and content digest, and how the merged LoRA trained."""

    path: Path
    digest: str
    train: TrainResult


def replay_sample(history: Sequence[Sequence[str]], count: int, seed: int) -> list[str]:
    """``count`` documents drawn without replacement (seeded) from the earlier steps' documents.

    Args:
        history: per earlier step, the documents it trained on (its self-edit's lines and passage).
        count: how many to draw; all of them when there are fewer.
        seed: the same seed and history draw the same documents in the same order.

    Returns:
        The drawn documents (empty when ``count`` is 0 or there is no history).
    """
    pool = [doc for step in history for doc in step]
    if count <= 0 or not pool:
        return []
    return random.Random(seed).sample(pool, min(count, len(pool)))


def continual_documents(
    self_edit: SelfEdit | None, title: str, context: str, replay: Sequence[str], config: InnerLoopConfig
) -> tuple[list[str], list[str], InnerLoopConfig]:
    """What one continual step trains on, and with which settings.

    The inner loop's documents and plan (:func:`models.self_edit.inner_loop_plan`; ``self_edit``
    None: the passage alone), then the replayed documents weighed as self-edit lines: as many
    passes as ``config.self_edit_epochs`` gives a line, or all ``config.epochs`` when it is unset.

    Returns:
        The documents to train on (replay included), this step's own documents (its self-edit's
        titled lines and the passage, what later steps may replay), and the training config.
    """
    own = inner_loop_plan(self_edit, title, context, config.model_copy(update={"self_edit_epochs": None}))[0]
    documents, plan = inner_loop_plan(self_edit, title, context, config)
    documents = documents + list(replay) * (config.self_edit_epochs or 1)
    return documents, own, plan


def merge_self_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    lora: LoraConfig,
    config: InnerLoopConfig,
    folder: Path,
    source: str,
) -> MergeResult:
    """Train a fresh LoRA (initialized from ``config.seed``) on ``documents``, merge it into
    ``model``'s weights and save the merged model with its content digest.

    ``model`` is modified in place (pass a private copy, never a cached model). If training
    fails, the LoRA layers are removed again and ``model`` keeps its weights.

    Args:
        documents: the training documents (see :func:`continual_documents`).
        lora: the adapter's rank, alpha, dropout and target layers.
        config: the inner loop's learning rate, epochs, batch size, max length, seed, clipping.
        folder: where to write the merged checkpoint (atomically).
        source: recorded as the checkpoint's origin in its manifest.

    Returns:
        The checkpoint's folder and digest, and the training's step count and losses.

    Raises:
        ValueError: if ``documents`` is empty or no layer matches ``lora.target_modules``.
        NonFiniteLossError: if a loss is NaN or infinite; nothing is written.
    """
    digest, result = train_and_merge(
        model,
        tokenizer,
        lora,
        config.seed,
        lambda adapted: train_adapter(adapted, tokenizer, documents, config),
        Path(folder),
        source,
    )
    return MergeResult(Path(folder), digest, result)


@dataclass(frozen=True)
class StepResult:
    """One continual step: what it trained on, the merged checkpoint, its scores and drift."""

    own_documents: list[str]  # the step's self-edit lines and passage (what later steps may replay)
    replayed: list[str]  # the earlier documents trained on again
    merge: MergeResult
    scores: list[EvalResult]  # on each context, in order
    kl: float
    routed: float | None = None  # routed adapters: the share of questions sent to their own passage's adapter


def run_step(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reference: PreTrainedModel,
    self_edit: SelfEdit | None,
    contexts: Sequence[tuple[str, str, Sequence[str], Sequence[Sequence[str]]]],
    history: Sequence[Sequence[str]],
    replay: int,
    replay_seed: int,
    lora: LoraConfig,
    config: InnerLoopConfig,
    eval_config: EvalConfig,
    probe_texts: Sequence[str],
    root: Path,
    source: str,
) -> StepResult:
    """Step k of a sequence: merge a LoRA trained on ``self_edit`` plus the last context's passage
    (and ``replay`` documents drawn from ``history``) into ``model``, save the merged checkpoint under
    ``root`` (in a folder named by what it trained on), answer every context's questions closed-book,
    and measure the drift from ``reference`` on ``probe_texts``.

    Args:
        model: the incoming model, a private copy: it holds the merged weights afterwards.
        reference: the sequence's step-0 model (not modified).
        self_edit: the step's self-edit; None trains on the passage alone.
        contexts: (title, passage, questions, answers) of passages 0..k; the last is this step's.
        history: per earlier step, its own documents (see :class:`StepResult`).

    Returns:
        What it trained on, the checkpoint, a score per context, the probe KL.
    """
    title, passage, _, _ = contexts[-1]
    drawn = replay_sample(history, replay, replay_seed)
    documents, own, plan = continual_documents(self_edit, title, passage, drawn, config)
    folder = Path(root) / _folder_key(documents, lora, plan)
    merged = merge_self_edit(model, tokenizer, documents, lora, plan, folder, source)
    scores = evaluate_contexts(model, tokenizer, [c[2] for c in contexts], [c[3] for c in contexts], eval_config)
    kl = probe_kl(reference, model, tokenizer, probe_texts)
    return StepResult(own, drawn, merged, scores, kl)


def _folder_key(documents: Sequence[str], lora: LoraConfig, plan: InnerLoopConfig) -> str:
    """A step's folder name: what it trained on, and how."""
    return hashlib.sha256(
        json.dumps([documents, lora.model_dump(mode="json"), plan.model_dump(mode="json")]).encode()
    ).hexdigest()[:12]


def run_routed_step(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    self_edit: SelfEdit | None,
    contexts: Sequence[tuple[str, str, Sequence[str], Sequence[Sequence[str]]]],
    history: Sequence[Sequence[str]],
    replay: int,
    replay_seed: int,
    adapters: Sequence[Path],
    lora: LoraConfig,
    config: InnerLoopConfig,
    eval_config: EvalConfig,
    probe_texts: Sequence[str],
    root: Path,
) -> StepResult:
    """Step k with routed adapters: train a LoRA on ``self_edit`` plus the last context's passage
    (and ``replay`` documents drawn from ``history``) on ``model``, the step-0 model, which it
    leaves unchanged; save the adapter under ``root``; answer every context's questions with
    adapters 0..k, each question routed to one (:func:`evaluate_routed`); and measure the routed
    model's drift from ``model`` on ``probe_texts``.

    Args:
        adapters: the earlier steps' adapter folders, in order (adapter j learned passage j).

    Returns:
        As :func:`run_step`; ``merge`` holds the adapter's folder and digest, ``routed`` the share
        of questions routed to their own passage's adapter.
    """
    title, passage, _, _ = contexts[-1]
    drawn = replay_sample(history, replay, replay_seed)
    documents, own, plan = continual_documents(self_edit, title, passage, drawn, config)
    folder = Path(root) / _folder_key(documents, lora, plan)
    with fresh_adapter(model, lora, plan.seed) as adapted:  # A from the seed, B zero: as merge_self_edit
        train = train_adapter(adapted, tokenizer, documents, plan)
        save_adapter(adapted, folder)
    folders = [*map(Path, adapters), folder]
    stack = AdapterStack.attach(model, lora, len(folders))
    try:
        stack.load(folders)
        scores, choices = evaluate_routed(
            stack, tokenizer, [c[2] for c in contexts], [c[3] for c in contexts], eval_config
        )
        kl = routed_probe_kl(stack, tokenizer, probe_texts)
    finally:
        stack.close()
    own_adapter = [j for j, c in enumerate(contexts) for _ in c[2]]
    routed = float(np.mean([c == j for c, j in zip(choices, own_adapter)])) if choices else 0.0
    return StepResult(own, drawn, MergeResult(folder, resolve_model(str(folder)).digest, train), scores, kl, routed)


@torch.no_grad()
def route_by_likelihood(
    stack: AdapterStack, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 32
) -> list[int]:
    """For each text, the adapter (of the stack's ``count``) under which its tokens have the
    lowest mean negative log-likelihood; ties go to the earlier adapter.

    The adapter that learned a passage finds its names and facts far less surprising than the
    others do, so a question about it is routed to it without the passage being kept.
    """
    choices: list[int] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # positions count from each text's first token
    try:
        for first in range(0, len(texts), batch_size):
            chunk = list(texts[first : first + batch_size])
            batch = tokenizer(chunk, return_tensors="pt", padding=True).to(stack.model.device)
            targets, keep = batch.input_ids[:, 1:], batch.attention_mask[:, 1:].float()
            nll = []
            for adapter in range(stack.count):
                stack.route(torch.full((len(chunk),), adapter, device=stack.model.device))
                logits = stack.model(**batch).logits[:, :-1].float()
                tokens = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                nll.append((tokens * keep).sum(1) / keep.sum(1).clamp(min=1))
            choices += torch.stack(nll, 1).argmin(1).tolist()
    finally:
        stack.route(None)
        tokenizer.padding_side = padding_side
    return choices


def evaluate_routed(
    stack: AdapterStack,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[Sequence[str]],
    answers: Sequence[Sequence[Sequence[str]]],
    config: EvalConfig,
) -> tuple[list[EvalResult], list[int]]:
    """Closed-book answers to every context's questions, each question by the adapter
    :func:`route_by_likelihood` picks for it, in shared batches (:func:`evaluate_stacked`).

    Returns:
        One graded result per context, and the adapter each question went to (in order).
    """
    flat_questions = [q for qs in questions for q in qs]
    flat_answers = [golds for context in answers for golds in context]
    choices = route_by_likelihood(stack, tokenizer, flat_questions, config.batch_size)
    by_adapter = [[n for n, c in enumerate(choices) if c == a] for a in range(stack.count)]
    results = evaluate_stacked(
        stack,
        tokenizer,
        [[flat_questions[n] for n in rows] for rows in by_adapter],
        [[flat_answers[n] for n in rows] for rows in by_adapter],
        config,
    )
    predictions = [""] * len(flat_questions)  # back in the contexts' order
    for rows, result in zip(by_adapter, results, strict=True):
        for n, prediction in zip(rows, result.predictions, strict=True):
            predictions[n] = prediction
    return grade(predictions, answers, sum(r.seconds for r in results)), choices


@torch.no_grad()
def probe_kl(
    reference: PreTrainedModel,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int = 64,
) -> float:
    """Mean per-token KL(reference || model) of the next-token distributions over ``texts``.

    Each text is fed whole (truncated to ``max_length`` tokens); every position's next-token
    distribution of ``model`` is compared with ``reference``'s, in float32. 0 for equal models.

    Raises:
        ValueError: if ``texts`` is empty.
    """
    if not texts:
        raise ValueError("probe_kl needs at least one probe text, got none")
    total, positions = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids
        ref = reference(input_ids=ids.to(reference.device)).logits
        total += _kl_sum(ref, model(input_ids=ids.to(model.device)).logits)
        positions += ids.shape[1]
    return total / positions


@torch.no_grad()
def routed_probe_kl(
    stack: AdapterStack, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = 64
) -> float:
    """:func:`probe_kl` of routed adapters from the bare model under them: each text goes to
    the adapter :func:`route_by_likelihood` picks for it, as a question would.

    Raises:
        ValueError: if ``texts`` is empty.
    """
    if not texts:
        raise ValueError("routed_probe_kl needs at least one probe text, got none")
    choices = route_by_likelihood(stack, tokenizer, texts)
    total, positions = 0.0, 0
    try:
        for text, adapter in zip(texts, choices, strict=True):
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids
            ids = ids.to(stack.model.device)
            stack.route(None)
            ref = stack.model(input_ids=ids).logits
            stack.route(torch.tensor([adapter], device=ids.device))
            total += _kl_sum(ref, stack.model(input_ids=ids).logits)
            positions += ids.shape[1]
    finally:
        stack.route(None)
    return total / positions


def _kl_sum(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Sum over positions of KL(reference || model) of (1, T, V) logits, in float32 whatever
    the weights' dtype."""
    ref = reference_logits.float().log_softmax(-1)
    new = logits.float().log_softmax(-1).to(ref.device)
    return float((ref.exp() * (ref - new)).sum(-1).sum())


# --- the accuracy matrix ---


def accuracy_matrix(row0: Sequence[float], steps: Sequence[Sequence[float]]) -> np.ndarray:
    """The (K+1) x K matrix of one sequence.

    Args:
        row0: the unedited model's accuracy on each of the K passages.
        steps: per step k (0-based), the accuracies on passages 0..k after merge k+1.

    Returns:
        ``M`` with ``M[0] = row0``, ``M[k+1, :k+1] = steps[k]``, NaN above the diagonal.

    Raises:
        ValueError: if a step does not hold exactly k+1 accuracies, or there are more steps than passages.
    """
    passages = len(row0)
    if len(steps) > passages:
        raise ValueError(f"{len(steps)} steps for {passages} passages")
    matrix = np.full((passages + 1, passages), np.nan)
    matrix[0] = row0
    for k, row in enumerate(steps):
        if len(row) != k + 1:
            raise ValueError(f"step {k} holds {len(row)} accuracies; expected {k + 1} (passages 0..{k})")
        matrix[k + 1, : k + 1] = row
    return matrix


def mean_std(matrices: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise mean and sample standard deviation over sequences (std 0 with one sequence)."""
    stack = np.stack(matrices)
    std = stack.std(0, ddof=1) if len(matrices) > 1 else np.where(np.isnan(stack[0]), np.nan, 0.0)
    return stack.mean(0), std


def newest_accuracy(matrix: np.ndarray) -> float:
    """Mean accuracy on each passage right after its own merge: ``M[j+1, j]``."""
    passages = matrix.shape[1]
    return float(np.mean([matrix[j + 1, j] for j in range(passages)]))


def forgetting(matrix: np.ndarray) -> float:
    """Mean drop from a passage's accuracy right after its own merge to the end:
    ``M[j+1, j] - M[K, j]`` over passages 0..K-2 (0 when K is 1)."""
    passages = matrix.shape[1]
    drops = [matrix[j + 1, j] - matrix[passages, j] for j in range(passages - 1)]
    return float(np.mean(drops)) if drops else 0.0


def forgetting_max(matrix: np.ndarray) -> float:
    """Chaudhry et al.'s forgetting: ``max_{r > j} M[r, j] - M[K, j]`` over passages 0..K-2."""
    passages = matrix.shape[1]
    drops = [np.max(matrix[j + 1 :, j]) - matrix[passages, j] for j in range(passages - 1)]
    return float(np.mean(drops)) if drops else 0.0


def backward_transfer(matrix: np.ndarray) -> float:
    """GEM's backward transfer: ``M[K, j] - M[j+1, j]`` over passages 0..K-2 (0 when K is 1)."""
    return -forgetting(matrix)


def gain_over_base(matrix: np.ndarray) -> float:
    """Mean of ``M[K, j] - M[0, j]``: what each passage keeps at the end over the unedited model."""
    return float(np.mean(matrix[-1] - matrix[0]))


def lag_curve(matrices: Sequence[np.ndarray]) -> list[float]:
    """Accuracy on a passage after d more merges, d = 0..K-1: the mean of ``M[j+1+d, j]`` over
    passages and sequences (fewer cells as d grows: d = K-1 is passage 0 at the end)."""
    passages = matrices[0].shape[1]
    return [float(np.mean([m[j + 1 + d, j] for m in matrices for j in range(passages - d)])) for d in range(passages)]


def step_drops(matrix: np.ndarray) -> list[float]:
    """Per merge r = 2..K, the mean drop on the earlier passages since their own merges:
    mean over j < r-1 of ``M[j+1, j] - M[r, j]`` (what merge r and those before it cost)."""
    passages = matrix.shape[1]
    return [float(np.mean([matrix[j + 1, j] - matrix[r, j] for j in range(r - 1)])) for r in range(2, passages + 1)]


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None with fewer than 3 points or when either side is constant."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} values against {len(ys)}")
    if len(xs) < 3:
        return None
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if np.allclose(x, x[0]) or np.allclose(y, y[0]):
        return None
    return float(np.corrcoef(x, y)[0, 1])


@dataclass(frozen=True)
class ContinualSummary:
    """What the flow reports of S sequences' matrices and their per-merge drift."""

    mean: np.ndarray  # (K+1, K)
    std: np.ndarray  # (K+1, K)
    lag: list[float]  # K values: accuracy after d more merges
    metrics: dict[str, float]  # the measures of the module docstring, each a mean over sequences
    kl_forgetting_correlation: float | None

    def as_json(self) -> dict:
        def cells(matrix: np.ndarray) -> list[list[float | None]]:
            return [[None if math.isnan(v) else float(v) for v in row] for row in matrix]

        return {
            "mean": cells(self.mean),
            "std": cells(self.std),
            "lag": self.lag,
            "metrics": self.metrics,
            "kl_forgetting_correlation": self.kl_forgetting_correlation,
        }


def summarize(matrices: Sequence[np.ndarray], kls: Sequence[Sequence[float]]) -> ContinualSummary:
    """Mean and std matrices, the lag curve, the measures of the module docstring (means over
    sequences, with their std as ``<name>_std``), and the correlation of drift with forgetting.

    Args:
        matrices: per sequence, its matrix (:func:`accuracy_matrix`), all complete and one shape.
        kls: per sequence, the probe KL after each merge (K values).

    Returns:
        The summary. The correlation pairs, over sequences and merges r = 2..K, the KL after merge
        r with :func:`step_drops`' drop at r; None when undefined (see :func:`pearson`).
    """
    if not matrices:
        raise ValueError("summarize needs at least one sequence's matrix")
    mean, std = mean_std(matrices)
    metrics: dict[str, float] = {}
    for name, measure in (
        ("newest_accuracy", newest_accuracy),
        ("forgetting", forgetting),
        ("forgetting_max", forgetting_max),
        ("backward_transfer", backward_transfer),
        ("gain_over_base", gain_over_base),
    ):
        values = [measure(m) for m in matrices]
        metrics[name] = float(np.mean(values))
        metrics[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    metrics["base_accuracy"] = float(np.mean([m[0].mean() for m in matrices]))
    metrics["final_accuracy"] = float(np.mean([m[-1].mean() for m in matrices]))
    metrics["kl_final"] = float(np.mean([kl[-1] for kl in kls])) if kls and all(kls) else 0.0
    xs = [kl[r - 1] for m, kl in zip(matrices, kls, strict=True) for r in range(2, m.shape[1] + 1)]
    ys = [drop for m in matrices for drop in step_drops(m)]
    return ContinualSummary(mean, std, lag_curve(matrices), metrics, pearson(xs, ys))


def format_matrix(mean: np.ndarray, std: np.ndarray) -> str:
    """The mean matrix as text, ``mean±std`` per cell, a row per merge count."""
    passages = mean.shape[1]
    header = "merges " + "".join(f"{f'p{j}':>12}" for j in range(passages))
    lines = [header]
    for r in range(mean.shape[0]):
        cells = "".join(
            f"{'':>12}" if math.isnan(mean[r, j]) else f"{f'{mean[r, j]:.2f}±{std[r, j]:.2f}':>12}"
            for j in range(passages)
        )
        lines.append(f"{r:>6} {cells}")
    return "\n".join(lines)


def remove_checkpoint(folder: Path, root: Path) -> bool:
    """Delete a merged checkpoint no step needs any more; only folders under ``root`` (never a
    policy the user passed). Returns whether something was deleted."""
    folder, root = Path(folder).absolute(), Path(root).absolute()
    if root not in folder.parents or not folder.is_dir():
        return False
    shutil.rmtree(folder)
    parent = folder.parent
    while parent != root and not any(parent.iterdir()):  # the folders above it, once empty
        parent.rmdir()
        parent = parent.parent
    return True
