"""The one seam between SEAL's two settings: what a self-edit is, how it is applied, how it is scored.

The outer loop (``flows/training.py``: sample K self-edits per context, an inner loop per
self-edit, rewards, ReST-EM policy update, MLflow tracking, caching) is the same for both of the
paper's domains. Everything that differs sits behind :class:`Domain`, chosen by the config's
``domain`` field (:func:`domain_for`):

=================  =====================================  =========================================
                   knowledge (§4.2)                       fewshot (§4.1, ARC)
=================  =====================================  =========================================
context            a passage with questions               an ARC task (demonstrations, test pairs)
self-edit          implications, one document per line    a JSON config: augmentations, loss mode,
                                                          learning rate, epochs
applied by         LoRA on the documents + passage        LoRA test-time training on augmented
                                                          leave-one-out tasks, as configured
scored by          closed-book answers to the questions   exact match of the predicted test grid
reward, kept       beats no adaptation; the best one      solved; every solving self-edit
held-out table     Table 2 (no adaptation, passage, ...)  Table 1 (in-context, TTT, SEAL, oracle)
=================  =====================================  =========================================

Each domain lives beside its held-out flow: :class:`~flows.knowledge.KnowledgeDomain` in
``flows/knowledge.py``, :class:`~flows.fewshot.FewshotDomain` in ``flows/fewshot.py``. The flows
above them call a domain only through this protocol.

Each method submits one domain task with only the config sections it depends on, so cache keys
stay as narrow as the knowledge domain's were (a new ``policy_update`` setting reuses the E-step).
"""

from __future__ import annotations

from typing import Any, Protocol

from flows.fewshot import FEWSHOT
from flows.knowledge import KNOWLEDGE
from models.config import SealConfig
from tasks.records import PolicyRef


class Domain(Protocol):
    """What the flows need to know about a domain. Methods that submit a task return its future."""

    name: str
    held_out_title: str  # what ``seal run``/``seal eval`` print above the held-out table
    policy_column: str  # the held-out column that scores the trained policy ("best" alias)
    edit_measures: tuple[str, ...]  # numeric columns of ``describe``, logged per iteration

    def fetch_contexts(self, config: SealConfig, split: str, count: int, seed: int) -> list:
        """``count`` contexts of ``split`` ("train" or "validation"), chosen by ``seed``."""

    def write_questions(self, writer: PolicyRef, config: SealConfig, contexts: list, label: str) -> list:
        """With ``reward.source: generated``: each training context as a ``GeneratedQuestionsRecord``
        whose context's targets ``writer`` wrote from it (the config allows it only where a domain's
        targets can be written: the knowledge domain)."""

    def sample_self_edits(
        self, policy: PolicyRef, config: SealConfig, contexts: list, seeds: list[int], num_samples: int, label: str
    ) -> list:
        """For each context, a future of K self-edit records sampled from ``policy`` with its seed
        (``result()``, ``wait()``, ``state``; several may share one task); ``label`` names tasks."""

    def evaluate_baselines(self, policy: PolicyRef, config: SealConfig, contexts: list, label: str) -> list:
        """For each context, a future of the unadapted policy's score on its targets."""

    def inner_loops(
        self, policy: PolicyRef, config: SealConfig, items: list[tuple[Any, Any, str]], tag: str = ""
    ) -> list:
        """Submit an inner loop per (context, self-edit, label) item (self-edit None: the domain's
        no-self-edit adaptation). Returns one object per item with ``adapter`` and ``score``
        futures and ``result()`` -> (AdapterRecord, EvalRecord) (``flows/inner_loop.py``);
        ``tag`` goes into task names."""

    def select_self_edits(self, config: SealConfig, context_id: str, baseline: Any, scores: list, edits: list):
        """Rewards and the kept self-edits (``.rewards``, ``.kept_indices``, ``.baseline_accuracy``,
        ``.failures``) of a context's scored ``edits``."""

    def describe(self, context: Any, edit: Any) -> dict[str, Any]:
        """The domain's own columns of a self-edit's row in the iteration table; those named in
        ``edit_measures`` are numbers, averaged per iteration into MLflow metrics."""

    def evaluate_policy(self, config: SealConfig, policy: PolicyRef, base: PolicyRef):
        """The held-out flow: the paper's table for this domain, as a ``HeldOutResult``."""


def domain_for(config: SealConfig) -> Domain:
    """The domain the config's ``domain`` field names."""
    return {"knowledge": KNOWLEDGE, "fewshot": FEWSHOT}[config.domain]
