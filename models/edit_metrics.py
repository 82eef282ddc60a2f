"""What a knowledge self-edit contains: does it carry the passage's facts, or something else?

RL can teach a policy to write self-edits that help for several reasons: they restate the
passage's content, they copy it, or they are short (fewer steps away from the passage). These
measures tell them apart, per self-edit, from text alone:

- ``fact_recall``: the share of the passage's facts (capitalised names, numbers, years) the
  self-edit reproduces exactly, as whole words;
- ``answer_coverage``: the share of the context's questions whose gold answer appears in the
  self-edit (normalized as graded), i.e. whether it states what will be asked;
- ``copied_fraction``: the share of the self-edit's word 4-grams found in the passage (1: copying).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from models.inner_loop import is_correct, normalize_answer

# Words that open sentences or are capitalised for other reasons: not facts of the passage.
_COMMON = frozenset(
    """
a an the in on at by for from with as of to and or but after before during when while since until
it its he she his her they their them this that these those there here we our you your i my
is was were are be been has had have do did not no yes also then than so if into over under
between among about through january february march april may june july august september october
november december monday tuesday wednesday thursday friday saturday sunday one two three four five
six seven eight nine ten first second third
""".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|\d[\d,.]*\d|\d")


def passage_facts(passage: str) -> set[str]:
    """The passage's checkable facts: capitalised words that are not common words, and numbers."""
    facts = set()
    for word in _WORD.findall(passage):
        if word[0].isdigit():
            facts.add(word.rstrip(".,"))
        elif word[0].isupper() and word.lower() not in _COMMON and len(word) > 1:
            facts.add(word)
    return facts


def fact_recall(text: str, passage: str) -> float:
    """Share of :func:`passage_facts` that ``text`` reproduces exactly (1.0 when there are none)."""
    facts = passage_facts(passage)
    if not facts:
        return 1.0
    words = {w.rstrip(".,") for w in _WORD.findall(text)}
    return sum(1 for fact in facts if fact in words) / len(facts)


def answer_coverage(text: str, answers: Sequence[Sequence[str]]) -> float:
    """Share of questions (``answers[i]``: question i's gold answers) whose answer ``text`` states,
    matched as answers are graded (:func:`models.inner_loop.is_correct`)."""
    if not answers:
        return 0.0
    return sum(1 for golds in answers if is_correct(text, golds)) / len(answers)


def copied_fraction(text: str, passage: str, n: int = 4) -> float:
    """Share of ``text``'s word ``n``-grams that occur in ``passage`` (0.0 for a shorter text)."""

    def grams(words: list[str]) -> list[tuple[str, ...]]:
        return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]

    own = grams(normalize_answer(text).split())
    if not own:
        return 0.0
    source = set(grams(normalize_answer(passage).split()))
    return sum(1 for g in own if g in source) / len(own)


def describe_self_edit(text: str, passage: str, answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """The three measures of one self-edit, keyed as they are logged."""
    return {
        "fact_recall": fact_recall(text, passage),
        "answer_coverage": answer_coverage(text, answers),
        "copied_fraction": copied_fraction(text, passage),
    }
