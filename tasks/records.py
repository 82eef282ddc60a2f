"""The small typed values that pass between tasks: ids, paths, digests and numbers.

Prefect hashes task inputs for cache keys, so these hold content (text, digests), never live
models or tensors, and hash the same in every process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict


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


class SelfEditRecord(_Record):
    index: int
    text: str
    documents: list[str]
    prompt: str  # the raw self-edit prompt, what the policy update trains on

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
    rewards: list[int]
    failures: list[str | None]
    kept: int | None
    outcome: str
    tie: bool


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from any parts, the same in every process (unlike ``hash``)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def adapter_dir(home: Path, policy: PolicyRef, context_id: str, key: str) -> Path:
    return home / "adapters" / policy.digest / context_id / key
