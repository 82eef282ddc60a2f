"""Self-edits for knowledge incorporation: the paper's prompts, batched sampling, parsing.

A self-edit is text the model writes about a passage (implications, rewrites, or
question-answer pairs). It becomes fine-tuning data as in the paper: one line one document,
list numbering stripped, the title prefixed, and the original passage appended.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from models.config import InnerLoopConfig

# The paper's prompts (SEAL §4.2 and its reference code).
SELF_EDIT_PROMPTS = {
    "implications": (
        "Let's read the following passage and produce a list of implications derived directly "
        "or indirectly from the content.\n\nPassage:\n{title}\n{context}\n\nImplications:\n"
    ),
    "rewrite": (
        "Let's read the following passage and rewrite it in a few different ways, each one "
        "separated by a newline.\n\nPassage:\n{title}\n{context}\n\nRewritten passages:\n"
    ),
    "self-qa": (
        "Let's read the following passage and rewrite it in a question-answer format, one "
        "question and its answer per line.\n\nPassage:\n{title}\n{context}\n\n"
        "Question-answer pairs:\n"
    ),
}
QUESTION_PROMPT = "Let's answer a question directly and concisely.\nQuestion: {question}\nAnswer:\n"

_NUMBERING = re.compile(r"^\s*(?:[-*•]+|\(?\d{1,3}[.):]|\(?[a-zA-Z][.)])\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_MIN_DOCUMENT_CHARS = 8


@dataclass(frozen=True)
class SelfEdit:
    """One sampled self-edit: the raw generation, the documents parsed from it, its length in tokens."""

    text: str
    documents: tuple[str, ...]
    tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.documents

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def render_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """Wrap ``text`` as a user turn in the model's chat template; plain text if it has none."""
    if tokenizer.chat_template is None:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def self_edit_prompt(kind: str, title: str, context: str) -> str:
    """The paper's self-edit prompt ``kind`` filled with a passage.

    Raises:
        ValueError: if ``kind`` is not one of :data:`SELF_EDIT_PROMPTS`.
    """
    if kind not in SELF_EDIT_PROMPTS:
        raise ValueError(f"unknown self-edit prompt {kind!r}; choose one of {sorted(SELF_EDIT_PROMPTS)}")
    return SELF_EDIT_PROMPTS[kind].format(title=title, context=context)


def row_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of a prompt sampled with ``seed``."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RowSampler(LogitsProcessor):
    """Draws each row's next token from the row's own generator (temperature, then top-p) and
    leaves only that token, which greedy decoding then takes.

    With one generator per row, a row's sample depends on its seed alone, not on which other
    rows share its batch: sampling many prompts in one ``generate`` call gives each prompt what
    sampling it alone would (up to floating-point round-off in the batched matrix multiplies).
    """

    def __init__(self, generators: Sequence[torch.Generator], temperature: float, top_p: float) -> None:
        self.generators = list(generators)
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = self.warpers(input_ids, scores).float().softmax(-1)
        tokens = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    num_return_sequences: int = 1,
    temperature: float | None = None,
    top_p: float = 1.0,
    seed: int | Sequence[int] = 0,
) -> list[str]:
    """Batched, KV-cached generation; greedy when ``temperature`` is None.

    Prompts are already rendered (see :func:`render_prompt`) and left-padded here so that
    every row's new tokens start at the same position. When sampling, ``seed`` is one per
    prompt (an int: the same for every prompt) and sample j of a prompt draws from its own
    generator, seeded ``row_seed(seed, j)`` (:class:`RowSampler`).

    Returns:
        ``len(prompts) * num_return_sequences`` completions, prompt-major, special tokens removed.
    """
    seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = padding_side
    # Each prompt's rows side by side (what num_return_sequences would do, which greedy refuses).
    batch = {name: t.repeat_interleave(num_return_sequences, dim=0).to(model.device) for name, t in batch.items()}
    processors = LogitsProcessorList()
    if temperature is not None:
        generators = [
            torch.Generator(model.device).manual_seed(row_seed(s, j))
            for s in seeds
            for j in range(num_return_sequences)
        ]
        processors.append(RowSampler(generators, temperature, top_p))
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,  # sampled rows are drawn by RowSampler, which leaves greedy one token
        temperature=None,
        top_p=None,
        top_k=None,
        logits_processor=processors,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # (rows, prompt_len + new) -> (rows, new)
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


@torch.no_grad()
def answer_lines(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    on_rows: Callable[[torch.Tensor], None] | None = None,
) -> list[str]:
    """Greedy, KV-cached first lines: each row's tokens up to the first that holds a newline
    or ends the sequence, at most ``max_new_tokens``.

    A row that has written its line leaves the batch (its cache rows dropped), so each step
    costs the rows still answering: answers to a batch's questions run from a few tokens to
    ``max_new_tokens``, and ``model.generate`` would decode every row until the longest is
    done (benchmarks/README.md, "Evaluation"). ``on_rows`` is called with the
    indices (into ``prompts``) of the rows left whenever some leave, before the next step (to
    route them, as :func:`models.stacked_lora.evaluate_stacked` does). Prompts are rendered
    (:func:`render_prompt`) and left-padded as in :func:`generate`.

    Returns:
        One completion per prompt, special tokens removed; text after its first line is not
        generated.
    """
    if not prompts:
        return []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = padding_side
    inputs, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    rows = torch.arange(len(prompts), device=model.device)
    tokens: list[list[int]] = [[] for _ in prompts]
    ends = None
    for step in range(max_new_tokens):
        logits = model(
            input_ids=inputs, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        ).logits[:, -1]
        if ends is None:
            ends = _line_ends(tokenizer, logits.shape[-1]).to(model.device)
        chosen = logits.argmax(-1)
        for row, token in zip(rows.tolist(), chosen.tolist()):
            tokens[row].append(token)
        done = ends[chosen]
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, mask, positions, chosen = rows[keep], mask[keep], positions[keep], chosen[keep]
            if on_rows is not None:
                on_rows(rows)
        inputs = chosen[:, None]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        positions = positions[:, -1:] + 1
    return tokenizer.batch_decode(tokens, skip_special_tokens=True)


@functools.lru_cache(maxsize=8)
def _line_ends(tokenizer: PreTrainedTokenizerBase, vocabulary: int) -> torch.Tensor:
    """Which of ``vocabulary`` token ids end an answer line: the end-of-sequence tokens and
    every token whose text holds a newline (the model's own ids past the tokenizer's none)."""
    texts = tokenizer.batch_decode([[i] for i in range(min(len(tokenizer), vocabulary))])
    ends = torch.zeros(vocabulary, dtype=torch.bool)
    ends[: len(texts)] = torch.tensor(["\n" in text for text in texts])
    eos = tokenizer.eos_token_id
    for token in eos if isinstance(eos, list) else [eos]:
        if token is not None and token < vocabulary:
            ends[token] = True
    return ends


def sample_self_edits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    title: str,
    context: str,
    kind: str = "implications",
    num_samples: int = 5,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 192,
    max_documents: int = 16,
    seed: int = 0,
) -> list[SelfEdit]:
    """Sample K self-edits for one context in a single batched ``generate`` call.

    Returns:
        ``num_samples`` self-edits; a garbled generation yields an empty one, never an error.
    """
    (edits,) = sample_self_edits_batch(
        model,
        tokenizer,
        [(title, context)],
        [seed],
        kind=kind,
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        max_documents=max_documents,
    )
    return edits


def sample_self_edits_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    passages: Sequence[tuple[str, str]],
    seeds: Sequence[int],
    *,
    kind: str = "implications",
    num_samples: int = 5,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 192,
    max_documents: int = 16,
) -> list[list[SelfEdit]]:
    """K self-edits for each ``(title, context)`` passage, all in one batched ``generate`` call.

    Decoding is dominated by streaming the weights once per step, not by the rows
    (benchmarks/README.md, "Evaluation"), so an iteration's contexts are sampled together.
    Passage i's samples come from ``seeds[i]`` alone: the same as :func:`sample_self_edits`
    with that seed gives for it (up to round-off).

    Returns:
        For each passage, ``num_samples`` self-edits; a garbled generation yields an empty one.
    """
    prompts = [render_prompt(tokenizer, self_edit_prompt(kind, title, context)) for title, context in passages]
    texts = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples,
        temperature=temperature,
        top_p=top_p,
        seed=seeds,
    )
    # A generation that used its whole budget stopped mid-line: that line is a fragment (a
    # number cut short is a wrong fact), so it is not a document.
    lengths = [len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
    edits = [
        SelfEdit(text, parse_self_edit(text, max_documents, complete=n < max_new_tokens), n)
        for text, n in zip(texts, lengths)
    ]
    return [edits[i * num_samples : (i + 1) * num_samples] for i in range(len(passages))]


def parse_self_edit(text: str, max_documents: int = 16, complete: bool = True) -> tuple[str, ...]:
    """Split a generation into documents: one non-empty line each, list numbering stripped.

    Lines with fewer than 8 characters or no letters are dropped (fragments, separators,
    stray tokens); duplicates keep their first occurrence. ``complete=False`` (the generation
    ran out of tokens) drops the last line, cut short, unless the text ends with a line break
    or that line is all there is.
    """
    lines = [line for line in _CONTROL.sub(" ", text).splitlines() if line.strip()]
    if not complete and len(lines) > 1 and not text.endswith("\n"):
        lines = lines[:-1]
    documents: list[str] = []
    for line in lines:
        line = _NUMBERING.sub("", line).strip()
        if len(line) < _MIN_DOCUMENT_CHARS or not any(c.isalpha() for c in line):
            continue
        if line not in documents:
            documents.append(line)
        if len(documents) == max_documents:
            break
    return tuple(documents)


def inner_loop_plan(
    self_edit: SelfEdit | None, title: str, context: str, config: InnerLoopConfig
) -> tuple[list[str], InnerLoopConfig]:
    """What an inner loop trains on, and with which settings.

    With ``config.self_edit_epochs`` unset (the paper's), :func:`training_documents` for
    ``config.epochs`` passes. Set to k, the self-edit's documents k times and the passage
    ``config.epochs`` times, in one shuffled pass: the passage gets the steps passage-only
    training gives it, the self-edit k steps per document on top.

    Returns:
        The documents and the config to train them with (the same for every self-edit).
    """
    documents = training_documents(self_edit, title, context)
    if config.self_edit_epochs is None:
        return documents, config
    *lines, passage = documents
    return lines * config.self_edit_epochs + [passage] * config.epochs, config.model_copy(update={"epochs": 1})


def training_documents(self_edit: SelfEdit | None, title: str, context: str) -> list[str]:
    """The fine-tuning data for one self-edit: titled documents, then the passage itself.

    ``None`` gives the "passage only" baseline.
    """
    documents = [f"{title}\n{doc}" for doc in (self_edit.documents if self_edit else ())]
    return documents + [f"{title}\n{context}"]
