"""Self-generated rewards: the writer's prompt, a tolerant parser, the checkability filters."""

import pytest

from models.generated_questions import (
    FILTERS,
    QAPair,
    filter_qa_pairs,
    parse_qa_pairs,
    question_writer_prompt,
    write_questions_batch,
)

PASSAGE = "Orvanne Kelthrop founded the Glassmakers' Guild of Tessary in 1873, with forty members."


def test_the_prompt_shows_the_passage_and_asks_for_the_format():
    prompt = question_writer_prompt("Kelthrop", PASSAGE, 5)
    assert prompt.endswith(f"Passage:\nKelthrop\n{PASSAGE}\n\nQuestions:\n") and "5 questions" in prompt
    # The worked example is in the format the parser reads, and its answers are in its passage.
    example = prompt.split("Example passage:\n", 1)[1].split("\n\nPassage:", 1)[0]
    passage, pairs = example.split("\n\nExample questions:\n")
    parsed = parse_qa_pairs(pairs)
    assert len(parsed) == 4 and filter_qa_pairs(parsed, passage, 8)[0] == parsed
    assert filter_qa_pairs(parsed, PASSAGE, 8)[0] == []  # a copied example pair is never kept


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Q: Who founded the guild? A: Orvanne Kelthrop", [("Who founded the guild?", "Orvanne Kelthrop")]),
        ("1. Q: When? A: 1873\n2) Q: How many? A: forty", [("When?", "1873"), ("How many?", "forty")]),
        ("- Question: Who? Answer: Kelthrop", [("Who?", "Kelthrop")]),
        ("q: lower case? a: yes", [("lower case?", "yes")]),
        ("Q: On two lines?\nA: 1873", [("On two lines?", "1873")]),
        ("Q: Left hanging?\nQ: Next one? A: x", [("Next one?", "x")]),
        ("Q: Blank line between?\n\nA: 1873", [("Blank line between?", "1873")]),
        ("A: an answer with no question", []),
        ("Q: a question with no answer", []),
        ("just prose, no pairs at all\n\n", []),
        ("", []),
        ("Q:  A: ", [("", "")]),  # parsed, then dropped as empty by the filters
        ("Q: What year is it? A:", [("What year is it?", "")]),
        ("Q1: Numbered? A1: yes", [("Numbered?", "yes")]),
        ("\x00Q: garbage\x07 ### A: %%%", [("garbage  ###", "%%%")]),  # control characters are spaces
    ],
)
def test_parse_keeps_well_formed_pairs_and_skips_the_rest(text, expected):
    assert [(p.question, p.answer) for p in parse_qa_pairs(text)] == expected


def test_a_generation_cut_short_loses_its_last_line():
    text = "Q: When? A: 1873\nQ: Who? A: Orvanne Kel"
    assert [p.answer for p in parse_qa_pairs(text, complete=False)] == ["1873"]
    assert [p.answer for p in parse_qa_pairs(text + "\n", complete=False)] == ["1873", "Orvanne Kel"]
    assert len(parse_qa_pairs(text)) == 2


@pytest.mark.parametrize(
    "question, answer, reason",
    [
        ("Who founded the guild?", "Orvanne Kelthrop", None),
        ("When was it founded?", "in 1873.", None),  # punctuation and case do not matter
        ("How many members?", "Forty", None),
        ("", "1873", "empty"),
        ("When?", "", "empty"),
        ("When?", "the", "empty"),  # nothing left once normalized
        ("What happened?", PASSAGE, "answer_too_long"),
        ("Who founded the guild?", "Marie Curie", "answer_not_in_passage"),
        ("Who founded it?", "Kelth", "answer_not_in_passage"),  # whole words only
        ("When did Kelthrop found it in 1873?", "1873", "answer_in_question"),
        ("Which guild did Orvanne Kelthrop found?", "Orvanne Kelthrop", "answer_in_question"),
    ],
)
def test_each_filter_drops_what_it_names(question, answer, reason):
    kept, dropped = filter_qa_pairs([QAPair(question, answer)], PASSAGE, max_pairs=8)
    assert set(dropped) == set(FILTERS)
    if reason is None:
        assert kept == [QAPair(question, answer)] and sum(dropped.values()) == 0
    else:
        assert kept == [] and dropped[reason] == 1 and sum(dropped.values()) == 1


def test_duplicates_and_pairs_past_the_cap_are_dropped():
    pairs = [
        QAPair("Who founded the guild?", "Kelthrop"),
        QAPair("who founded THE guild", "Orvanne Kelthrop"),  # the same question, normalized
        QAPair("When was it founded?", "1873"),
        QAPair("How many members did it have?", "forty"),
    ]
    kept, dropped = filter_qa_pairs(pairs, PASSAGE, max_pairs=2)
    assert [p.answer for p in kept] == ["Kelthrop", "1873"]
    assert dropped["duplicate"] == 1 and dropped["over_limit"] == 1


def test_the_tiny_model_writes_reproducibly_and_never_crashes(tiny):
    passages = [("Kelthrop", PASSAGE), ("Empty-ish", "zq zq zq")]
    first = write_questions_batch(tiny.model, tiny.tokenizer, passages, num_questions=3, max_new_tokens=24)
    again = write_questions_batch(tiny.model, tiny.tokenizer, passages, num_questions=3, max_new_tokens=24)
    assert first == again  # greedy: the same writer and passage give the same pairs
    assert len(first) == 2
    for written, (_, passage) in zip(first, passages):
        assert written.parsed == len(written.pairs) + sum(written.dropped.values())
        assert len(written.pairs) <= 3
        assert filter_qa_pairs(written.pairs, passage, 3)[0] == list(written.pairs)
    assert write_questions_batch(tiny.model, tiny.tokenizer, []) == []
