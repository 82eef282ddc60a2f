"""The small typed values that pass between tasks: ids, paths, digests and numbers.

Prefect hashes task inputs for cache keys, so these hold content (text, digests), never live
models or tensors, and hash the same in every process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from models.fewshot.schema import TTTConfig


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PolicyRef(_Record):
    """A policy checkpoint: a model folder and its content digest."""

    name: str  # "base" or "iteration-N"
    path: str
    digest: str


class Context(_Record):
    id: str
    title: str
    context: str
    questions: list[str]
    answers: list[list[str]]

    @property
    def num_targets(self) -> int:
        """What a score counts: here the questions."""
        return len(self.questions)


class GeneratedQuestionsRecord(_Record):
    """A training context whose questions a model wrote from its passage (reward.source=generated),
    with what it wrote and what the filters dropped (``models/generated_questions.py``)."""

    context: Context  # its questions and answers are the kept pairs (one gold answer each)
    writer: str  # the name of the policy that wrote them ("base", "iteration-N")
    text: str  # the raw generation
    parsed: int  # pairs parsed from it, before filtering
    dropped: dict[str, int]  # per filter

    @property
    def kept(self) -> int:
        return len(self.context.questions)


class SelfEditRecord(_Record):
    index: int
    text: str
    documents: list[str]
    prompt: str  # the raw self-edit prompt, what the policy update trains on
    tokens: int = 0  # the generation's length in tokens

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


class AdapterRecord(_Record):
    """A trained adapter on disk, or why there is none."""

    path: str | None
    steps: int = 0
    tokens: int = 0
    mean_loss: float | None = None
    seconds: float = 0.0
    failure: str | None = None
    digest: str | None = None  # of the adapter's weights, checked when the folder is loaded


class StaleArtifact(RuntimeError):
    """A cached result points at an artifact (adapter, policy) that is gone or whose content no
    longer matches its recorded digest. The flow recomputes the task that made it."""


class InnerLoopOutOfMemory(RuntimeError):
    """An inner loop ran out of memory. Raised (not recorded) so the task run fails and is not
    cached: a rerun, perhaps on a bigger machine, tries that self-edit again."""


class EvalRecord(_Record):
    predictions: list[str]
    correct: list[bool]
    f1: list[float]
    seconds: float = 0.0
    failure: str | None = None
    runs: int = 1  # inner loops pooled here (training seeds): each question appears once per run

    @classmethod
    def pooled(cls, records: list[EvalRecord]) -> EvalRecord:
        """One score of several runs on the same questions (one per training seed): accuracy and
        F1 are their means, and a failure of any run is the pooled failure."""
        return cls(
            predictions=[p for r in records for p in r.predictions],
            correct=[c for r in records for c in r.correct],
            f1=[f for r in records for f in r.f1],
            seconds=sum(r.seconds for r in records),
            runs=sum(r.runs for r in records),
            failure=next((r.failure for r in records if r.failure), None),
        )

    @property
    def mean_correct(self) -> float:
        """Questions answered correctly, averaged over the pooled runs."""
        return self.num_correct / self.runs

    @classmethod
    def of(cls, result) -> EvalRecord:
        """The record of a graded ``models.inner_loop.EvalResult``."""
        return cls(
            predictions=list(result.predictions),
            correct=list(result.correct),
            f1=list(result.f1),
            seconds=result.seconds,
        )

    @classmethod
    def failed(cls, questions: int, failure: str) -> EvalRecord:
        """Every question wrong, with the reason: how a failed inner loop is scored."""
        return cls(predictions=[], correct=[False] * questions, f1=[0.0] * questions, failure=failure)

    @property
    def num_correct(self) -> int:
        return sum(self.correct)

    @property
    def accuracy(self) -> float:
        return self.num_correct / len(self.correct) if self.correct else 0.0

    @property
    def mean_f1(self) -> float:
        return sum(self.f1) / len(self.f1) if self.f1 else 0.0


class SelectionRecord(_Record):
    context_id: str
    baseline_accuracy: float
    accuracies: list[float]
    rewards: list[float]  # binary (0/1) or graded (the accuracy gain), as reward.kind says
    failures: list[str | None]
    kept: int | None
    outcome: str
    tie: bool

    @property
    def kept_indices(self) -> list[int]:
        """The self-edits the policy update imitates (knowledge: at most one per context)."""
        return [] if self.kept is None else [self.kept]


class ContinualStepRecord(_Record):
    """A finished step: the merged checkpoint, what it trained on, its scores and drift."""

    checkpoint: PolicyRef
    documents: list[str]  # the step's own documents (self-edit lines, passage): what later steps replay
    replayed: int  # documents replayed from earlier steps
    scores: list[EvalRecord]  # on passages 0..k, in order
    kl: float  # KL(step-0 model || merged model) on the probe texts, per token
    routed: float | None = None  # continual.adapters=routed: share of questions sent to their own passage's adapter
    steps: int
    mean_loss: float
    seconds: float


# --- few-shot (ARC) ---

Grid = list[list[int]]


class ArcTask(_Record):
    """An ARC task: the context of the few-shot domain. Its test outputs are the targets."""

    id: str
    train_inputs: list[Grid]
    train_outputs: list[Grid]
    test_inputs: list[Grid]
    test_outputs: list[Grid]

    @property
    def num_targets(self) -> int:
        return len(self.test_inputs)


class ConfigSelfEditRecord(_Record):
    """A few-shot self-edit: the generated text and the config parsed from it, or why not."""

    index: int
    text: str
    prompt: str  # the raw self-edit prompt, what the policy update trains on
    config: TTTConfig | None
    failure: str | None = None  # invalid JSON or out of bounds: reward 0
    attempts: int = 1


class SolvedSelectionRecord(_Record):
    """Few-shot rewards: 1 for each self-edit whose adapted model solved the task; all kept."""

    context_id: str
    baseline_accuracy: float
    accuracies: list[float]
    rewards: list[float]  # binary (0/1) or graded (the accuracy gain), as reward.kind says
    failures: list[str | None]
    kept: list[int]
    outcome: str
    tie: bool = False  # no tie-breaking: every solving self-edit is kept

    @property
    def kept_indices(self) -> list[int]:
        return list(self.kept)


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from any parts, the same in every process (unlike ``hash``)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def adapter_dir(home: Path, policy: PolicyRef, context_id: str, key: str) -> Path:
    return home / "adapters" / policy.digest / context_id / key
