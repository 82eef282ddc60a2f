"""SEAL's M-step: the policy learns to write the self-edits that earned reward.

ReST-EM's policy update is filtered behaviour cloning. The kept (prompt -> self-edit) pairs
become supervised data with the loss on the self-edit tokens only. Training goes through a
fresh LoRA adapter (paper: r=64, alpha=128, all projections, lr 3e-4, 2 epochs), which is
then merged into the weights. The result is the next policy, saved as an ordinary model folder
with a content digest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.config import LoraConfig, PolicyUpdateConfig
from models.inner_loop import pad_batch, train_and_merge
from models.self_edit import render_prompt
from models.training import backward_loss, fit

# One training example: (prompt token ids, self-edit token ids). Only the second part is learned.
Example = tuple[list[int], list[int]]


@dataclass(frozen=True)
class PolicyUpdateResult:
    """The saved next policy and how its update went."""

    path: Path
    digest: str
    steps: int
    mean_loss: float
    final_loss: float
    pairs: int  # pairs trained on
    skipped: int  # pairs whose prompt left no room for the self-edit within max_length
    seconds: float


def format_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, self_edit: str) -> Example:
    """Token ids of the rendered prompt, and of the self-edit followed by EOS.

    The prompt is rendered and tokenized as the sampler does (``render_prompt``, no added
    special tokens: a chat template brings its own), so the policy learns under exactly the
    conditioning it sampled from. Tokenizing the two parts separately makes the boundary exact.

    Args:
        prompt: the raw self-edit prompt (``models.self_edit.self_edit_prompt``), not rendered.
        self_edit: the text the policy wrote for it.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    self_edit_ids = tokenizer(self_edit, add_special_tokens=False)["input_ids"]
    return prompt_ids, self_edit_ids + [tokenizer.eos_token_id]


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], max_length: int
) -> tuple[list[Example], int]:
    """Format every pair (see :func:`format_pair`) and fit it into ``max_length`` tokens.

    A prompt is never cut: a policy trained on a cut prompt would learn under a conditioning
    it never samples from. The self-edit is cut on the right instead, and loses its EOS
    because it did not end there. A pair whose prompt leaves no room for one self-edit token
    is skipped.

    Returns:
        The examples that fit, and how many pairs were skipped.
    """
    examples: list[Example] = []
    skipped = 0
    for prompt, self_edit in pairs:
        prompt_ids, self_edit_ids = format_pair(tokenizer, prompt, self_edit)
        room = max_length - len(prompt_ids)
        if room < 1:
            skipped += 1
            continue
        examples.append((prompt_ids, self_edit_ids[:room]))
    return examples, skipped


def collate_pairs(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch and label only the self-edit tokens.

    Prompt positions and padding get label -100. The mask comes from positions, not token
    ids, so an EOS that doubles as the pad token is still learned.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each (batch, longest example).
    """
    batch = pad_batch([prompt + self_edit for prompt, self_edit in examples], pad_id)
    for row, (prompt, _) in enumerate(examples):
        batch["labels"][row, : len(prompt)] = -100
    return batch


def update_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    config: PolicyUpdateConfig,
    target_modules: Sequence[str],
    output_dir: Path,
    source: str,
) -> PolicyUpdateResult:
    """Fine-tune the policy on its rewarded self-edits, merge the update and save the result.

    ``model`` is modified in place: the update is merged into its weights. Pass a fresh copy
    of the policy, never a model shared through a cache. If training fails, the adapter is
    removed again and ``model`` keeps its weights.

    AdamW on a fresh LoRA adapter (``config.rank``/``config.alpha``, dropout 0, initialized
    from ``config.seed``), gradients clipped to ``config.max_grad_norm``. The learning rate
    decays linearly to zero and pairs are reshuffled every epoch from ``config.seed``. The loss
    covers the self-edit tokens and EOS only.

    Args:
        model: the current policy, on the device to train on.
        tokenizer: its tokenizer.
        pairs: ``(prompt, self_edit)``: the raw self-edit prompt (as from
            ``models.self_edit.self_edit_prompt``, not chat-rendered) and the self-edit the
            policy wrote for it that earned reward.
        config: rank, alpha, learning rate, epochs, batch size, max length, seed and clipping.
        target_modules: the linear layers that get LoRA weights (those of the inner loop).
        output_dir: the folder to write the next policy to, atomically.
        source: what to record as the model's origin in its ``seal-model.json``.

    Returns:
        The saved folder and its digest, step count, mean and final loss, pairs trained on
        and skipped, seconds.

    Raises:
        ValueError: if ``pairs`` is empty or every prompt is too long for ``config.max_length``,
            or no layer matches ``target_modules``.
        NonFiniteLossError: if a loss is NaN or infinite; nothing is written.
    """
    if not pairs:
        raise ValueError(
            "update_policy needs at least one (prompt, self_edit) pair, got none. When no "
            "self-edit earned reward, keep the previous policy instead of updating it."
        )
    examples, skipped = tokenize_pairs(tokenizer, pairs, config.max_length)
    if not examples:
        raise ValueError(
            f"all {len(pairs)} pairs have prompts of at least policy_update.max_length="
            f"{config.max_length} tokens, leaving no room for the self-edit; raise "
            "policy_update.max_length"
        )
    start = time.perf_counter()
    lora = LoraConfig(rank=config.rank, alpha=config.alpha, dropout=0.0, target_modules=list(target_modules))

    def train(adapted: peft.PeftModel) -> list[float]:
        return fit(
            adapted,
            examples,
            lambda step: accumulate_gradients(adapted, step, tokenizer.pad_token_id),
            learning_rate=config.learning_rate,
            epochs=config.epochs,
            batch_size=config.batch_size,
            seed=config.seed,
            max_grad_norm=config.max_grad_norm,
            # PyTorch's default AdamW kernel, as the update has always used: fused would round differently.
            fused=None,
            learning_rate_setting="policy_update.learning_rate",
        )

    digest, losses = train_and_merge(model, tokenizer, lora, config.seed, train, Path(output_dir), source)
    return PolicyUpdateResult(
        path=Path(output_dir),
        digest=digest,
        steps=len(losses),
        mean_loss=sum(losses) / len(losses),
        final_loss=losses[-1],
        pairs=len(examples),
        skipped=skipped,
        seconds=time.perf_counter() - start,
    )


def accumulate_gradients(model: peft.PeftModel, examples: Sequence[Example], pad_id: int) -> float:
    """Backpropagate the mean loss over ``examples``' self-edit tokens; return that loss.

    One example at a time, each loss summed and divided by the step's self-edit token count:
    the gradient of one padded batch (up to float rounding), with one example's activations in
    memory instead of the whole batch's (the logits alone are tokens x vocabulary floats).
    Stops at the first non-finite part and returns it, leaving the gradients partial.
    """
    targets = sum(len(self_edit) for _, self_edit in examples)
    total = 0.0
    for example in examples:
        loss = backward_loss(model, collate_pairs([example], pad_id), num_items_in_batch=targets)
        if not math.isfinite(loss):
            return loss
        total += loss
    return total
