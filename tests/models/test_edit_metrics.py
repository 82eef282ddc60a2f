"""What a self-edit carries of its passage: the measures logged per iteration."""

import pytest

from models.edit_metrics import answer_coverage, copied_fraction, fact_recall, passage_facts

PASSAGE = "In 1873 Orvanne Kelthrop founded the Shebrarara Fellowship in Vellmouth with 42 members."

CASES = [
    # name, self-edit, fact recall, copied fraction
    ("a copy", PASSAGE, 1.0, 1.0),
    ("renamed entities", "In 1873 Orvanne Kelthrop founded the Shebabreframedi Fellowship.", 4 / 7, 0.5),
    ("restated", "The Fellowship had 42 members from 1873 on, Vellmouth says.", 4 / 7, 0.0),
    ("nothing of it", "The moon is made of cheese.", 0.0, 0.0),
    ("empty", "", 0.0, 0.0),
]


@pytest.mark.parametrize("name, text, recall, copied", CASES, ids=[c[0] for c in CASES])
def test_fact_recall_and_copying(name, text, recall, copied):
    assert fact_recall(text, PASSAGE) == pytest.approx(recall, abs=0.01)
    assert copied_fraction(text, PASSAGE) == pytest.approx(copied, abs=0.01)


def test_facts_are_names_and_numbers_not_sentence_openers():
    assert passage_facts(PASSAGE) == {"1873", "Orvanne", "Kelthrop", "Shebrarara", "Fellowship", "Vellmouth", "42"}


def test_answer_coverage_counts_questions_whose_answer_is_stated():
    answers = [["Orvanne Kelthrop"], ["1873", "in 1873"], ["Vellmouth"]]
    assert answer_coverage("orvanne kelthrop, in 1873!", answers) == pytest.approx(2 / 3)
    assert answer_coverage("Kelthrop", answers) == 0.0  # a part of an answer is not the answer
    assert answer_coverage("anything", []) == 0.0
