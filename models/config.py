"""One typed config tree for SEAL, loaded from YAML with ``section.key=value`` overrides.

Every field has a default and a description (Prefect renders them as the parameter form in
its UI). Values the paper fixes are marked ``# paper``. Validation runs once, when the config
is loaded, and reports every problem together. It checks shape and values, and one thing in the
data: that the few-shot domain's ARC task ids exist (see ``SealConfig._check_consistency``).

    >>> cfg = load_config("deployments/configs/knowledge-tiny.yaml", ["lora.rank=4"])
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import fsspec

from models.errors import ConfigError
from models.fewshot.schema import TTTConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Base model: 'smollm2-135m-instruct' (bundled), 'tiny-random' (tests), "
        "a Hugging Face model id, or a local folder.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="'auto' picks CUDA when present, else CPU."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="'auto' is bfloat16 where the device multiplies it natively (CUDA, or a CPU with "
        "AVX512-BF16 or AMX), float32 elsewhere.",
    )


class DataConfig(_Section):
    source: Literal["synthetic", "squad", "text"] = Field(
        "synthetic",
        description="'synthetic': invented passages no model can know (offline). "
        "'squad': SQuAD v1.1 JSON at data.path, or the hub dataset data.hub_name. "
        "'text': unlabelled plain-text passages at data.path, training contexts only "
        "(needs reward.source=generated; held-out contexts come from data.eval_source).",
    )
    path: str | None = Field(
        None,
        description="Local SQuAD v1.1-format JSON file; with data.source=text a .txt file or a folder "
        "of them, each blank-line-separated block one passage titled by its file's name.",
    )
    hub_name: str | None = Field(
        None, description="Hugging Face dataset name (needs network), used when the SQuAD path is unset."
    )
    eval_source: Literal["synthetic", "squad"] | None = Field(
        None,
        description="With data.source=text only: the labelled source of the held-out contexts (its "
        "validation split, what a run on it alone holds out), since held-out evaluation always asks "
        "real questions.",
    )
    eval_path: str | None = Field(
        None, description="With data.eval_source=squad: its SQuAD v1.1 JSON file (else data.hub_name)."
    )
    num_passages: int = Field(320, ge=8, description="Synthetic passages to generate.")
    validation_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of synthetic passages held out for evaluation."
    )
    num_train_contexts: int = Field(8, ge=1, description="Training contexts per outer iteration (paper: 50).")
    num_eval_contexts: int = Field(20, ge=1, description="Held-out contexts for evaluation (paper: 200).")
    seed: int = Field(0, description="Seed of the generator and of context selection.")

    def held_out(self) -> DataConfig:
        """The section that supplies held-out contexts: this one, or with ``source: text`` its
        labelled ``eval_source`` (unlabelled passages have no questions to evaluate on)."""
        if self.source != "text":
            return self
        return self.model_copy(
            update={"source": self.eval_source, "path": self.eval_path, "eval_source": None, "eval_path": None}
        )

    def problems(self) -> list[str]:
        """What is inconsistent in this section."""
        problems = []
        if self.source == "squad" and not (self.path or self.hub_name):
            problems.append("data.source is 'squad' but neither data.path nor data.hub_name is set")
        if self.source == "synthetic" and self.path:
            problems.append("data.path is set but data.source is 'synthetic'; set data.source=squad or text")
        if self.source == "text":
            if not self.path:
                problems.append("data.source is 'text' but data.path is unset: pass a .txt file or a folder of them")
            if self.eval_source is None:
                problems.append(
                    "data.source is 'text' but data.eval_source is unset: held-out evaluation needs "
                    "labelled contexts, set data.eval_source=synthetic or squad (with data.eval_path)"
                )
            elif self.eval_source == "squad" and not (self.eval_path or self.hub_name):
                problems.append("data.eval_source is 'squad' but neither data.eval_path nor data.hub_name is set")
            elif self.eval_source == "synthetic" and self.eval_path:
                problems.append("data.eval_path is set but data.eval_source is 'synthetic'; set data.eval_source=squad")
        elif self.eval_source is not None or self.eval_path is not None:
            problems.append(
                f"data.eval_source/data.eval_path are set but data.source is {self.source!r}: they only "
                "apply to data.source=text (a labelled source holds out its own contexts)"
            )
        return problems


class SelfEditConfig(_Section):
    prompt: Literal["implications", "rewrite", "self-qa"] = Field(
        "implications", description="Which of the paper's self-edit prompts to use."
    )
    num_samples: int = Field(3, ge=1, le=64, description="Self-edits sampled per context, K (paper: 5).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")  # paper
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")  # paper
    max_new_tokens: int = Field(192, ge=1, description="Generation budget per self-edit.")
    max_documents: int = Field(16, ge=1, description="Keep at most this many generated lines as documents.")


class LoraConfig(_Section):
    rank: int = Field(32, ge=1, description="LoRA rank r.")  # paper: 32
    alpha: int = Field(64, ge=1, description="LoRA alpha.")  # paper: 64
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")  # paper: 0
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Names of the linear layers that get LoRA weights.",
    )


class InnerLoopConfig(_Section):
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Adapter learning rate.")  # paper
    epochs: int = Field(10, ge=1, le=100, description="Passes over the self-edit.")  # paper: 10
    self_edit_epochs: int | None = Field(
        None,
        ge=1,
        le=100,
        description="Passes over the self-edit's documents, the passage keeping ``epochs``: all of them "
        "in one shuffled pass (None: the paper's, ``epochs`` passes over the self-edit and the passage "
        "alike). Fewer keep a small model's wrong self-edits from drowning the passage.",
    )
    batch_size: int = Field(1, ge=1, description="Documents per step.")  # paper: 1
    max_length: int = Field(256, ge=8, description="Documents are truncated to this many tokens.")
    seed: int = Field(0, description="Seed of adapter init and document order.")
    seeds: int = Field(
        1,
        ge=1,
        le=16,
        description="Training seeds per inner loop (knowledge domain): each self-edit trains this many "
        "adapters (seed, seed+1, ...) and its reward and held-out scores are their mean (paper: 3).",
    )
    max_grad_norm: float | None = Field(
        1.0,
        gt=0,
        description="Each adapter's gradient is scaled down to at most this norm before its update, as "
        "the Hugging Face Trainer of the paper's inner loop does by default (None: no clipping).",
    )
    max_batch_tokens: int = Field(
        1024,
        ge=1,
        description="Stacked training: a step's rows (one per adapter and document) are split into "
        "batches of at most this many padded tokens, similar lengths together, gradients added up: "
        "the same update in less memory and with less padding.",
    )
    group_size: int = Field(
        4,
        ge=1,
        le=64,
        description="Inner loops trained together in shared batches through stacked LoRA adapters "
        "(knowledge domain), one train task and one evaluate task per group: each adapter ends as "
        "if trained alone, and every matrix multiply of the frozen base gets a row of each. 1 "
        "trains them one at a time.",
    )
    slots: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Stacked inner loops: adapters training at once, in all lanes (None: the whole "
        "group). A larger group trains as a queue: an adapter is saved when it finishes and the next "
        "starts in its slot, so every step keeps every slot busy however the self-edits' lengths "
        "differ. Memory grows with the slots, not with the group.",
    )
    lanes: int = Field(
        1,
        ge=1,
        le=16,
        description="Stacked inner loops (knowledge domain): a group's adapters are split over this "
        "many lanes, threads that share the model's weights and the torch threads, each training "
        "and evaluating its share on its own (models/stacked_lora/lanes.py). On a CPU two lanes keep "
        "both cores busy through the small operations that leave one idle; results do not depend on it.",
    )
    min_success_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="An iteration fails unless at least this share of its inner loops ran to the "
        "end; those that ran out of memory did not (an empty self-edit or a non-finite loss did: "
        "reward 0, recorded).",
    )

    @property
    def group_slots(self) -> int:
        """Adapters training at once in a group: ``slots``, at most the whole group (None: all of it)."""
        return min(self.slots or self.group_size, self.group_size)


class EvalConfig(_Section):
    max_new_tokens: int = Field(32, ge=1, description="Answer length budget (greedy).")
    batch_size: int = Field(16, ge=1, description="Questions answered per generate call.")
    num_self_edits: int = Field(
        1,
        ge=1,
        le=16,
        description="Self-edits sampled per held-out context for the self-edit columns, which report "
        "their mean: more of them narrow the interval of the columns SEAL is judged by.",
    )
    # Left out of dumps while unset, so the cache keys of evaluations made before it existed hold.
    seeds: int | None = Field(
        None,
        ge=1,
        le=16,
        exclude_if=lambda seeds: seeds is None,
        description="Training seeds per held-out inner loop, averaged (knowledge domain; None: "
        "``inner_loop.seeds``). Lets rewards average several seeds while the held-out columns, "
        "whose intervals already pool many contexts, keep the cost of one.",
    )


class RewardConfig(_Section):
    """What a self-edit's reward measures (knowledge domain; few-shot rewards a solved task, its
    test pair's or, label-free, a held-out demonstration's)."""

    # The paper's by default: passage_only (an inner loop more per context) raised the study's
    # policy by 4 points at most, within noise, and neither made RL gain (benchmarks/README.md).
    baseline: Literal["no_adaptation", "passage_only"] = Field(
        "no_adaptation",
        description="What the adapted model must beat: 'no_adaptation' (the paper's: the policy's "
        "closed-book score) or 'passage_only' (an adapter trained on the passage alone, one more "
        "inner loop per context: the self-edit must add to what the passage teaches).",
    )
    kind: Literal["binary", "graded"] = Field(
        "binary",
        description="'binary' (the paper's): 1 when the adapted model beats the baseline. 'graded': the "
        "accuracy gain over the baseline (negative when below). Either way a context keeps its best "
        "self-edit only if it beats the baseline.",
    )
    source: Literal["questions", "generated", "demonstrations"] = Field(
        "questions",
        description="What a training context's reward asks: 'questions' (the paper's: its own labelled "
        "questions, or an ARC task's test pair) or, without labels, 'generated' (knowledge: question-answer "
        "pairs a model writes from the passage, kept only if checkable against it) or 'demonstrations' "
        "(few-shot: the task's last demonstration is held out and solved after training on the others; "
        "tasks with fewer than 3 are skipped). Held-out evaluation always asks real questions and test pairs.",
    )
    question_writer: Literal["policy", "base"] = Field(
        "policy",
        description="With reward.source=generated, who writes the pairs: the current policy (it sees "
        "the passage, so it can ask what it knows the passage says) or the frozen base model (the "
        "targets do not move as the policy trains).",
    )
    num_questions: int = Field(
        8,
        ge=1,
        le=64,
        description="With reward.source=generated: pairs asked for per passage; at most this many checkable "
        "ones are kept.",
    )
    question_tokens: int = Field(
        256, ge=16, description="With reward.source=generated: the question writer's generation budget per passage."
    )


class PolicyUpdateConfig(_Section):
    """The M-step: SFT of the policy on the kept (prompt -> self-edit) pairs, merged into it."""

    rank: int = Field(64, ge=1, description="LoRA rank of the policy update.")  # paper: 64
    alpha: int = Field(128, ge=1, description="LoRA alpha of the policy update.")  # paper: 128
    learning_rate: float = Field(3e-4, gt=0, le=1, description="Policy learning rate.")  # paper
    epochs: int = Field(2, ge=1, le=100, description="Passes over the kept pairs.")  # paper: 2
    batch_size: int = Field(4, ge=1, description="Pairs per step.")
    max_length: int = Field(1024, ge=16, description="Prompt + self-edit truncated to this.")
    seed: int = Field(0, description="Seed of the update's adapter init and data order.")
    max_grad_norm: float | None = Field(
        1.0,
        gt=0,
        description="The gradient is scaled down to at most this norm before each update, as the "
        "Hugging Face Trainer of the paper's policy update does by default (None: no clipping).",
    )


class RLConfig(_Section):
    """The outer loop (ReST-EM)."""

    iterations: int = Field(2, ge=1, description="Outer iterations, each E-step then M-step.")  # paper: 2
    eval_every: int = Field(
        0, ge=0, description="Held-out evaluation every k iterations (0: before the first and after the last only)."
    )


class TrackingConfig(_Section):
    experiment: str = Field("seal", description="MLflow experiment name.")
    registered_model: str = Field("seal-policy", description="MLflow registered model name.")
    log_adapters: bool = Field(True, description="Log every self-edit's adapter folder to MLflow.")


class RunnerConfig(_Section):
    """Where the model tasks (sampling, inner loops, evaluation, policy update) run.

    ``local``: in the flow's process, one at a time (they share its one copy of the model; more
    threads would only queue on it). ``ray``: on Ray workers, each a process that loads the model
    once and keeps it, either on a local instance started for the flow run or on a cluster.
    Results do not depend on the runner: a run on one reuses what a run on the other cached.
    """

    kind: Literal["local", "ray"] = Field(
        "local",
        description="'local': this process runs the tasks. 'ray': Ray workers do (needs "
        "the ray extra: pip install 'seal-workflows[ray]').",
    )
    address: str | None = Field(
        None,
        description="Ray cluster to join: 'auto' (the cluster this machine belongs to), "
        "'HOST:6379', or 'ray://HOST:10001' (Ray Client). Unset: start a local Ray instance for the "
        "flow run and shut it down at its end.",
    )
    num_workers: int = Field(
        2,
        ge=1,
        description="Workers of the local Ray instance, each a process with its own copy of "
        "the model (ignored with an address: the cluster's resources decide).",
    )
    cpus_per_task: float | None = Field(
        None,
        gt=0,
        description="CPUs a model task reserves; its worker uses that many torch threads "
        "(at least 1). Unset: the machine's cores / num_workers on a local instance, 1 on a cluster.",
    )
    gpus_per_task: float = Field(
        0.0,
        ge=0,
        description="GPUs a model task reserves on Ray (0.5: two workers share a GPU, each "
        "with its own copy of the model).",
    )
    result_storage: str | None = Field(
        None,
        description="Where Prefect keeps task results (the cache): a path every worker sees "
        "or an fsspec URL such as s3://bucket/seal-results (needs that protocol's package, e.g. "
        "s3fs). Unset: PREFECT_LOCAL_STORAGE_PATH ($SEAL_HOME/prefect/storage under seal run).",
    )

    def problems(self, device: str) -> list[str]:
        """What is inconsistent in this section (``device``: the model's)."""
        problems = []
        if self.kind == "local":
            if self.address is not None:
                problems.append(f"runner.address is {self.address!r} but runner.kind is 'local'; set runner.kind=ray")
            if self.gpus_per_task:
                problems.append(
                    "runner.gpus_per_task only applies to runner.kind=ray (the local runner uses model.device)"
                )
        elif importlib.util.find_spec("prefect_ray") is None:
            problems.append("runner.kind is 'ray' but prefect-ray is not installed: pip install 'seal-workflows[ray]'")
        if self.gpus_per_task and device in ("cpu", "mps"):
            problems.append(
                f"runner.gpus_per_task is {self.gpus_per_task:g} but model.device is {device!r}; "
                "use model.device=auto or cuda, or runner.gpus_per_task=0"
            )
        if self.result_storage and "://" in self.result_storage:
            protocol = self.result_storage.split("://", 1)[0]
            try:
                fsspec.get_filesystem_class(protocol)
            except (ImportError, ValueError) as exc:
                problems.append(
                    f"runner.result_storage {self.result_storage!r}: fsspec cannot open '{protocol}://' here ({exc})"
                )
        return problems


def _ttt(basic: bool, size: bool, strategy: str, learning_rate: float, epochs: int) -> TTTConfig:
    return TTTConfig.model_validate(
        {
            "data_generation": {
                "use_basic_augmentations": basic,
                "use_size_augmentations": size,
                "use_chain_augmentations": False,
                "use_repeat_augmentations": False,
            },
            "training": {"strategy": strategy, "learning_rate": learning_rate, "num_train_epochs": epochs},
        }
    )


class FewshotConfig(_Section):
    """Few-shot learning on ARC (``domain: fewshot``, SEAL §4.1). A context is an ARC-AGI-1 task,
    a self-edit the JSON config of its test-time training. ``data.num_train_contexts``,
    ``data.num_eval_contexts`` and ``data.seed`` choose how many tasks each step uses."""

    train_task_ids: list[str] = Field(
        default_factory=list,
        description="ARC-AGI-1 training tasks to draw from (empty: every one within max_grid_size).",
    )
    eval_task_ids: list[str] = Field(
        default_factory=list,
        description="ARC-AGI-1 evaluation tasks for held-out scores (empty: every one within max_grid_size).",
    )
    max_grid_size: int = Field(30, ge=1, le=30, description="Only tasks whose grids all fit in this side.")
    min_learning_rate: float = Field(1e-6, gt=0, description="Smallest learning rate a self-edit may ask for.")
    max_learning_rate: float = Field(1e-2, gt=0, le=1, description="Largest learning rate a self-edit may ask for.")
    max_epochs: int = Field(10, ge=1, le=100, description="Most epochs a self-edit may ask for.")
    max_steps: int = Field(
        375,
        ge=1,
        description="Self-edits needing more optimizer steps than this are rejected "
        "(reward 0): the paper discards configs that would train too long.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="Generations per self-edit while it is invalid JSON or out of "
        "bounds; the last invalid one scores 0 with its reason.",
    )
    answer_prefix: str = Field(
        "",
        description="Text the policy's answer is made to start with (e.g. the opening of the "
        "JSON object), for models too small to write JSON unprompted. Paper: none.",
    )
    seal_adapts: Literal["policy", "base"] = Field(
        "policy",
        description="Held-out SEAL row: test-time training adapts the trained policy that "
        "wrote the configs (the reference code's evaluation) or the base model (only who writes the "
        "config changes).",
    )
    voting: bool = Field(
        False,
        description="Predict under the 8 dihedral views and take the majority grid (8x the prediction cost).",
    )
    oracle_configs: list[TTTConfig] = Field(
        default_factory=lambda: [
            _ttt(False, False, "train_using_output_tokens", 1e-4, 3),
            _ttt(True, False, "train_using_output_tokens", 1e-4, 2),
            _ttt(True, True, "train_using_all_tokens", 1e-4, 2),
            _ttt(False, False, "train_using_output_tokens", 1e-3, 3),
        ],
        min_length=1,
        description="The grid search of oracle test-time training (Table 1): a held-out task "
        "counts as solved if any of these configs solves it.",
    )


class ContinualConfig(_Section):
    """Continual self-adaptation (``seal continual``, the paper's §5 forgetting experiment): S
    sequences of K held-out passages; at step k the current model writes a self-edit for passage k,
    a LoRA trained on it (``lora``, ``inner_loop``) is merged into the weights, and the merged model
    answers the questions of passages 0..k."""

    sequences: int = Field(8, ge=1, le=64, description="Sequences S, each of its own passages (paper: 8).")
    passages: int = Field(
        8,
        ge=1,
        le=64,
        description="Passages per sequence K, each one self-edit merged in turn (paper: 8).",
    )
    policy: str = Field(
        "base",
        description="The model each sequence starts from, which (merged, step after step) writes "
        "the self-edits: 'base' (model.name), a policy folder, or a registry URI such as "
        "'models:/seal-policy@best'.",
    )
    training: Literal["self_edit", "passage_only"] = Field(
        "self_edit",
        description="What each step fine-tunes on: the model's self-edit plus the passage "
        "(the paper's), or the passage alone (the comparison row: no self-edit is written).",
    )
    replay: int = Field(
        0,
        ge=0,
        le=256,
        description="Mitigation, off at 0: each step's fine-tune also trains on this many "
        "documents drawn (seeded) from the earlier steps' training documents, each weighed as one "
        "self-edit line.",
    )
    adapters: Literal["merged", "routed"] = Field(
        "merged",
        description="Mitigation, off at 'merged' (the paper's: each step's LoRA merged into the "
        "weights). 'routed': each step's LoRA is trained on the starting model and kept apart, and "
        "each question is answered by the adapter under which it is most likely; the starting model "
        "writes every self-edit.",
    )
    probe_prompts: int = Field(
        8,
        ge=1,
        le=32,
        description="Drift signal: after each merge, the KL divergence from the step-0 model "
        "is measured on this many fixed probe texts unrelated to the passages (models/continual.py).",
    )
    seed: int = Field(0, description="Seed of each sequence's passages and of the replay draws.")

    @field_validator("policy")
    @classmethod
    def _check_policy(cls, policy: str) -> str:
        # A field validator, so it reports alongside the section's other problems.
        if policy.startswith("models:/"):
            rest = policy.removeprefix("models:/")
            if not ("@" in rest.strip("@") or "/" in rest.strip("/")):
                raise ValueError(
                    f"{policy!r} is not a registry URI: use 'models:/NAME@ALIAS' or 'models:/NAME/VERSION'"
                )
        elif policy != "base" and not Path(policy).expanduser().is_dir():
            raise ValueError(
                f"{policy!r} is neither 'base', a 'models:/' URI nor an existing folder; pass a "
                "policy folder written by seal run"
            )
        return policy


class SealConfig(_Section):
    """The whole SEAL configuration."""

    domain: Literal["knowledge", "fewshot"] = Field(
        "knowledge",
        description="Which of the paper's settings: 'knowledge' (incorporating a "
        "passage, §4.2) or 'fewshot' (ARC test-time training, §4.1).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    self_edit: SelfEditConfig = Field(default_factory=SelfEditConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    inner_loop: InnerLoopConfig = Field(default_factory=InnerLoopConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    policy_update: PolicyUpdateConfig = Field(default_factory=PolicyUpdateConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    fewshot: FewshotConfig = Field(default_factory=FewshotConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    seed: int = Field(0, description="Seed of self-edit sampling.")

    @model_validator(mode="after")
    def _check_consistency(self) -> SealConfig:
        problems = self.data.problems()
        if self.data.source == "text" and self.reward.source != "generated":
            problems.append(
                "data.source is 'text' (passages without questions) but reward.source is "
                f"{self.reward.source!r}: set reward.source=generated so the rewards ask questions written "
                "from each passage"
            )
        if self.domain == "fewshot" and self.reward.source == "generated":
            problems.append(
                "reward.source is 'generated' but the few-shot domain rewards a solved ARC pair: "
                "use reward.source=questions or demonstrations (label-free)"
            )
        if self.domain != "fewshot" and self.reward.source == "demonstrations":
            problems.append(
                "reward.source is 'demonstrations' but only the few-shot domain has demonstrations: "
                "use reward.source=questions or generated (label-free)"
            )
        fewshot = self.fewshot
        if fewshot.min_learning_rate > fewshot.max_learning_rate:
            problems.append(
                f"fewshot.min_learning_rate {fewshot.min_learning_rate:g} is above "
                f"fewshot.max_learning_rate {fewshot.max_learning_rate:g}"
            )
        if self.domain == "fewshot" and self.reward.baseline != "no_adaptation":
            problems.append(
                f"reward.baseline is {self.reward.baseline!r} but the few-shot domain rewards a "
                "solved task: use reward.baseline=no_adaptation"
            )
        if self.domain == "fewshot" and self.inner_loop.seeds != 1:
            problems.append(
                f"inner_loop.seeds is {self.inner_loop.seeds} but the few-shot domain trains one "
                "adapter per config: use inner_loop.seeds=1"
            )
        if self.domain == "fewshot" and self.eval.seeds not in (None, 1):
            problems.append(
                f"eval.seeds is {self.eval.seeds} but the few-shot domain trains one adapter per "
                "config: leave eval.seeds unset"
            )
        problems += self.runner.problems(self.model.device)
        for n, oracle in enumerate(fewshot.oracle_configs):
            lr, epochs = oracle.training.learning_rate, oracle.training.num_train_epochs
            if (
                not fewshot.min_learning_rate <= lr <= fewshot.max_learning_rate
                or not 1 <= epochs <= fewshot.max_epochs
            ):
                problems.append(
                    f"fewshot.oracle_configs.{n}: learning_rate {lr:g} or num_train_epochs "
                    f"{epochs} outside the fewshot bounds"
                )
        if self.domain == "fewshot":
            # The one check that reads data, kept at load on purpose: a run first reads the train
            # split's ids at iteration 1, after the base policy's whole held-out evaluation, so a
            # wrong id would stop it only then. (Imported here: the config alone needs no datasets.)
            from models.fewshot.data import task_id_problems

            label_free = self.reward.source == "demonstrations"
            problems += task_id_problems("train", fewshot.train_task_ids, fewshot.max_grid_size, label_free)
            problems += task_id_problems("validation", fewshot.eval_task_ids, fewshot.max_grid_size)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def section_digest(self, *sections: str) -> str:
        """A short content digest of the named sections, for cache keys."""
        payload = {name: getattr(self, name).model_dump(mode="json") for name in sections}
        return _digest(payload)

    def digest(self) -> str:
        """The whole config's digest, less ``runner``: where tasks run does not change results,
        so a run retried on another runner continues the same MLflow run."""
        return _digest(self.model_dump(mode="json", exclude={"runner"}))

    def flat(self) -> dict[str, Any]:
        """The config as ``{"lora.rank": 32, ...}``, as logged to MLflow."""
        return _flatten(self.model_dump(mode="json"))


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turn ``["lora.rank=8", "data.path=x.json"]`` into a nested dict.

    Values are read as YAML scalars, so ``8`` is an int, ``1e-3`` a float, ``[a, b]`` a list.
    Returns the nested dict and a list of problems (malformed overrides).
    """
    tree: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        # "1e-3" is a string to YAML 1.1; numbers are what users mean.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else value
            except ValueError:
                pass
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {part!r} is already set to a value")
                break
        else:
            node[leaf] = value
    return tree, problems


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> SealConfig:
    """Load a YAML config, apply ``section.key=value`` overrides and validate once.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``section.key=value`` strings, applied after the file.

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every problem found (unknown keys, wrong types, bad values,
            inconsistent sections, unreadable YAML).
    """
    tree: dict[str, Any] = {}
    source = str(path) if path is not None else "defaults"
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    update, problems = parse_overrides(list(overrides))
    tree = _merge(tree, update)
    try:
        config = SealConfig.model_validate(tree)
    except ValidationError as exc:
        problems += [_describe(error) for error in exc.errors()]
        config = None
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid config ({source}), {len(problems)} problem(s):\n{listing}")
    return config


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (check the spelling; see SealConfig for the valid keys)"
    received = error.get("input")
    if isinstance(received, dict):
        return f"{where}: {error['msg']}"
    return f"{where}: {error['msg']} (received {received!r})"
