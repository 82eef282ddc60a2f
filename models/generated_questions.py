"""Self-generated rewards: question-answer pairs a model writes from a passage (beyond the paper).

The paper's reward needs every training context to come with questions (§5 names it as a
limitation). Here a model (the current policy or the frozen base) reads the passage, with the
passage in its prompt, and writes ``Q: ... A: ...`` lines; the pairs that can be checked
against the passage become the context's questions, and the inner loop's adapted model answers
them closed-book exactly as it answers real ones (``models/inner_loop.py``).

A pair is kept only if it is checkable (:func:`filter_qa_pairs`): a non-empty question and a
short answer, the answer found in the passage (normalized, whole words), the question not
giving its answer away, no question asked twice. Malformed output yields fewer pairs, never an
error; a passage left with none has nothing to reward against.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.inner_loop import normalize_answer
from models.self_edit import generate, render_prompt

# One worked example: SmolLM2-135M follows a demonstration where it ignores the instruction alone
# (benchmarks/README.md, "Self-generated questions"). Its names are in no passage, so a copied
# example pair fails the answer-in-passage filter.
QUESTION_WRITER_PROMPT = (
    "Read the passage and write {count} questions that it answers. Each answer is a short fact "
    "copied word for word from the passage: a name, a number, a date or a place.\n\n"
    "Example passage:\nHarbour of Lindqvist\nThe harbour of Lindqvist was built in 1887 by the engineer "
    "Maren Osk. Its lighthouse is painted green and stands on Tarrow Point.\n\n"
    "Example questions:\nQ: When was the harbour of Lindqvist built? A: 1887\n"
    "Q: Who built the harbour of Lindqvist? A: Maren Osk\nQ: What colour is the lighthouse? A: green\n"
    "Q: Where does the lighthouse stand? A: Tarrow Point\n\n"
    "Passage:\n{title}\n{context}\n\nQuestions:\n"
)
# Why each pair was dropped, in the order the filters run.
FILTERS = ("empty", "answer_too_long", "answer_not_in_passage", "answer_in_question", "duplicate", "over_limit")
# Longer answers are clauses, not facts: closed-book answers would almost never contain them.
MAX_ANSWER_WORDS = 10

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_NUMBERING = re.compile(r"^\s*(?:[-*•]+|\(?\d{1,3}[.):]|\(?[a-zA-Z][.)])\s+")
# "Q: ... A: ..." or "Question: ... Answer: ..." (any case), on one line or split over two.
_QUESTION = re.compile(r"^(?:q|question)\s*\d*\s*[:.)-]\s*", re.IGNORECASE)
_ANSWER = re.compile(r"(?:^|\s)(?:a|answer)\s*\d*\s*:\s*", re.IGNORECASE)


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str


@dataclass(frozen=True)
class GeneratedQuestions:
    """What the writer wrote for one passage and the pairs kept from it."""

    text: str  # the raw generation
    parsed: int  # pairs parsed from it, before filtering
    pairs: tuple[QAPair, ...]  # the checkable ones, in order
    dropped: dict[str, int] = field(default_factory=dict)  # per filter (:data:`FILTERS`)


def question_writer_prompt(title: str, context: str, count: int) -> str:
    """The prompt that asks for ``count`` question-answer pairs about a passage it shows."""
    return QUESTION_WRITER_PROMPT.format(count=count, title=title, context=context)


def parse_qa_pairs(text: str, complete: bool = True) -> list[QAPair]:
    """Question-answer pairs from a generation, tolerant of what small models write.

    A pair is a ``Q: ... A: ...`` line (``Question:``/``Answer:`` and list numbering accepted),
    or a ``Q:`` line whose answer is the next line's ``A:``. Anything else (prose, a question
    with no answer, an answer with no question) is skipped. ``complete=False`` (the generation
    ran out of tokens) drops the last line, cut short, unless the text ends with a line break:
    a truncated answer may still be words of the passage, but not the fact asked for.

    Returns:
        The pairs in order, stripped; possibly empty, never an error.
    """
    lines = _CONTROL.sub(" ", text).splitlines()
    if not complete and not text.endswith("\n"):
        lines = lines[:-1]
    pairs, pending = [], None  # pending: a question still waiting for its "A:" line
    for raw in lines:
        line = _NUMBERING.sub("", raw.strip()).strip()
        if not line:
            continue
        question = _QUESTION.match(line)
        if question:
            body = line[question.end() :]
            answer = _ANSWER.search(body)
            if answer:
                pairs.append(QAPair(body[: answer.start()].strip(), body[answer.end() :].strip()))
                pending = None
            else:
                pending = body.strip()
            continue
        answer = _ANSWER.match(line)
        if answer and pending is not None:
            pairs.append(QAPair(pending, line[answer.end() :].strip()))
        pending = None
    return pairs


def filter_qa_pairs(pairs: Sequence[QAPair], passage: str, max_pairs: int) -> tuple[list[QAPair], dict[str, int]]:
    """The checkable pairs, at most ``max_pairs``, and how many each filter dropped.

    In order: an empty question or answer; an answer of more than :data:`MAX_ANSWER_WORDS`
    words; an answer not in the passage; a question that contains its answer; a question asked
    before (all compared normalized, as grading does: ``normalize_answer``, whole words); pairs
    past ``max_pairs``.

    Returns:
        The kept pairs in order, and a count for every name in :data:`FILTERS`.
    """
    dropped = dict.fromkeys(FILTERS, 0)
    text = f" {normalize_answer(passage)} "
    kept, seen = [], set()
    for pair in pairs:
        question, answer = normalize_answer(pair.question), normalize_answer(pair.answer)
        if not question or not answer:
            reason = "empty"
        elif len(answer.split()) > MAX_ANSWER_WORDS:
            reason = "answer_too_long"
        elif f" {answer} " not in text:
            reason = "answer_not_in_passage"
        elif f" {answer} " in f" {question} ":
            reason = "answer_in_question"
        elif question in seen:
            reason = "duplicate"
        elif len(kept) == max_pairs:
            reason = "over_limit"
        else:
            kept.append(QAPair(pair.question, pair.answer))
            seen.add(question)
            continue
        dropped[reason] += 1
    return kept, dropped


def write_questions_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    passages: Sequence[tuple[str, str]],
    *,
    num_questions: int = 8,
    max_new_tokens: int = 256,
) -> list[GeneratedQuestions]:
    """Question-answer pairs for each ``(title, context)`` passage, written greedily in one
    batched ``generate`` call and filtered to the checkable ones.

    Greedy, so the pairs depend on the writer's weights and the passage alone: a rerun writes
    the same ones, and a cached result is the result.

    Args:
        passages: ``(title, context)`` of each passage.
        num_questions: pairs asked for, and the most kept, per passage.
        max_new_tokens: the generation budget per passage.

    Returns:
        One :class:`GeneratedQuestions` per passage, in order.
    """
    if not passages:
        return []
    prompts = [render_prompt(tokenizer, question_writer_prompt(t, c, num_questions)) for t, c in passages]
    texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    written = []
    for (_, context), text in zip(passages, texts):
        complete = len(tokenizer(text, add_special_tokens=False).input_ids) < max_new_tokens
        parsed = parse_qa_pairs(text, complete)
        kept, dropped = filter_qa_pairs(parsed, context, num_questions)
        written.append(GeneratedQuestions(text, len(parsed), tuple(kept), dropped))
    return written
