from __future__ import annotations

import copy
import hashlib
import inspect
import json
import random
import re

import datasets
import pytest

from models import synthetic_passages
from models.config import DataConfig
from models.errors import DatasetError
from models.knowledge_data import (
    COLUMNS,
    group_squad_rows,
    load_contexts,
    load_squad,
    load_squad_hub,
    load_text_passages,
    make_synthetic_dataset,
    select_contexts,
)
from models.synthetic_passages import PASSAGE_STYLES, Cast

CAST = Cast(
    person="Orvanne Kelthrop",
    other_person="Mirel Dastow",
    town="Brennholm",
    other_town="Vaskmere",
    river="Tolwen",
    island="Skarra",
    name="Quillmarsh",
)


@pytest.fixture(scope="module")
def synthetic() -> datasets.DatasetDict:
    return make_synthetic_dataset()


def _rows(dataset: datasets.DatasetDict):
    return [row for split in dataset.values() for row in split]


# --- the synthetic generator -------------------------------------------------------------------


def test_same_arguments_give_identical_datasets(synthetic):
    again = make_synthetic_dataset()
    other = make_synthetic_dataset(seed=1)
    for split in ("train", "validation"):
        assert again[split].to_dict() == synthetic[split].to_dict()
        assert other[split]["context"] != synthetic[split]["context"]


@pytest.mark.parametrize(
    "num_passages, validation_fraction, expected",
    [(320, 0.25, (240, 80)), (40, 0.25, (30, 10)), (10, 0.0, (10, 0)), (9, 1 / 3, (6, 3))],
)
def test_split_sizes(num_passages, validation_fraction, expected):
    dataset = make_synthetic_dataset(num_passages, seed=3, validation_fraction=validation_fraction)
    assert (len(dataset["train"]), len(dataset["validation"])) == expected


def test_schema_and_ids(synthetic):
    assert len(synthetic["train"]) + len(synthetic["validation"]) >= 300
    ids = []
    for split in synthetic.values():
        assert tuple(split.column_names) == COLUMNS
        ids += list(split["id"])
    assert ids == [f"synth-{i:04d}" for i in range(320)]


def test_every_question_is_answered_verbatim_by_its_passage(synthetic):
    counts = set()
    for row in _rows(synthetic):
        questions, answers = row["questions"], row["answers"]
        counts.add(len(questions))
        assert 4 <= len(questions) <= 6 and len(answers) == len(questions)
        assert len(set(questions)) == len(questions), row["id"]
        for question, gold in zip(questions, answers):
            assert question.endswith("?")
            assert gold and all(isinstance(a, str) and a.strip() for a in gold)
            for answer in gold:
                assert answer in row["context"], (row["id"], question, answer)
    assert counts == {4, 5, 6}


def _invented_words(split: datasets.Dataset) -> set[str]:
    # Words capitalised in the module's own templates ("River", "March", "The") are fixed
    # vocabulary; every other capitalised word in a passage was invented by the generator.
    fixed = set(re.findall(r"[A-Z][a-z]+", inspect.getsource(synthetic_passages)))
    text = " ".join(list(split["title"]) + list(split["context"]))
    return set(re.findall(r"\b[A-Z][a-z]+\b", text)) - fixed


def test_train_and_validation_share_no_invented_name(synthetic):
    train, validation = (_invented_words(synthetic[s]) for s in ("train", "validation"))
    # Each passage names about ten invented words; far fewer means the extraction broke.
    assert len(train) > 5 * len(synthetic["train"])
    assert len(validation) > 5 * len(synthetic["validation"])
    assert train.isdisjoint(validation), sorted(train & validation)[:10]


def test_invented_names_look_like_proper_nouns(synthetic):
    words = _invented_words(synthetic["train"]) | _invented_words(synthetic["validation"])
    for word in words:
        assert re.fullmatch(r"[A-Z][a-z]{4,9}", word), word
        assert not re.search(r"[^aeiouy]{4}|[aeiou]{3}", word.lower()), word


@pytest.mark.parametrize("style", PASSAGE_STYLES, ids=lambda style: style.__name__)
def test_each_style_renders_passages_that_state_their_facts(style):
    for seed in range(40):
        passage = style(random.Random(seed), CAST)
        assert 3 <= len(passage.sentences) <= 7
        assert 60 <= len(passage.context.split()) <= 150, passage.context
        assert 0 < len(passage.title.split()) <= 5
        assert len(passage.facts) >= 6  # a row asks up to 6 distinct questions
        for fact in passage.facts:
            assert len(set(fact.questions)) >= 2, fact
            for answer in fact.answers:
                assert answer in passage.context, (style.__name__, answer)


def test_styles_and_phrasings_vary(synthetic):
    openings = {style(random.Random(0), CAST).context.split(",")[0] for style in PASSAGE_STYLES}
    assert len(PASSAGE_STYLES) >= 4 and len(openings) == len(PASSAGE_STYLES)
    questions = [q for row in _rows(synthetic) for q in row["questions"]]
    question_openings = {" ".join(q.split()[:2]) for q in questions}
    assert len(question_openings) >= 15, sorted(question_openings)


@pytest.mark.parametrize("num_passages, fraction", [(0, 0.25), (10, -0.1), (10, 1.5)])
def test_bad_generator_arguments_are_rejected(num_passages, fraction):
    with pytest.raises(ValueError, match=str(num_passages) if num_passages < 1 else "fraction"):
        make_synthetic_dataset(num_passages, validation_fraction=fraction)


# --- SQuAD -------------------------------------------------------------------------------------


def _squad_document() -> dict:
    """Two articles × two paragraphs × three questions; the second paragraph of article 0 has
    no questions."""

    def qas(prefix: str) -> list[dict]:
        return [
            {
                "id": f"{prefix}{q}",
                "question": f"{prefix} question {q}?",
                "answers": [
                    {"text": f"answer {q}", "answer_start": 0},
                    {"text": f"answer {q}", "answer_start": 0},
                    {"text": f"other {q}", "answer_start": 3},
                ],
            }
            for q in range(3)
        ]

    return {
        "version": "1.1",
        "data": [
            {
                "title": "Alpha",
                "paragraphs": [
                    {"context": "Alpha passage one.", "qas": qas("a0")},
                    {"context": "Alpha passage two.", "qas": []},
                ],
            },
            {
                "title": "Beta",
                "paragraphs": [
                    {"context": "Beta passage one.", "qas": qas("b0")},
                    {"context": "Beta passage two.", "qas": qas("b1")},
                ],
            },
        ],
    }


def test_load_squad_groups_questions_by_passage(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(_squad_document()))
    dataset = load_squad(path)
    assert tuple(dataset.column_names) == COLUMNS
    assert dataset["title"] == ["Alpha", "Beta", "Beta"]
    assert dataset["context"] == ["Alpha passage one.", "Beta passage one.", "Beta passage two."]
    assert dataset[2]["questions"] == ["b1 question 0?", "b1 question 1?", "b1 question 2?"]
    assert dataset[2]["answers"] == [["answer 0", "other 0"], ["answer 1", "other 1"], ["answer 2", "other 2"]]
    digest = hashlib.sha256(b"Beta\nBeta passage two.").hexdigest()[:12]
    assert dataset[2]["id"] == f"squad-{digest}"


def test_group_squad_rows_merges_by_title_and_context():
    rows = [
        {"title": "T", "context": "C1", "question": "q1 ", "answers": {"text": ["a", "a", " b"]}},
        {"title": "T", "context": "C2", "question": "q2", "answers": {"text": ["c"]}},
        {"title": "T", "context": "C1", "question": "q3", "answers": {"text": ["d"]}},
        {"title": "U", "context": "C1", "question": "q4", "answers": {"text": ["e"]}},
    ]
    dataset = group_squad_rows(rows)
    assert dataset["context"] == ["C1", "C2", "C1"]
    assert dataset["questions"] == [["q1", "q3"], ["q2"], ["q4"]]
    assert dataset["answers"] == [[["a", "b"], ["d"]], [["c"]], [["e"]]]
    assert len(set(dataset["id"])) == 3


def test_group_squad_rows_rejects_unanswerable_questions():
    rows = [{"title": "T", "context": "C", "question": "q?", "answers": {"text": []}}]
    with pytest.raises(DatasetError, match=r"rows\[0\].*SQuAD v1.1"):
        group_squad_rows(rows)


def test_hub_unreachable_says_to_pass_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError) as info:
        load_squad_hub("seal-tests/no-such-squad", split="validation")
    message = str(info.value)
    assert "could not reach the Hugging Face Hub" in message and "HF_DATASETS_OFFLINE" in message
    assert "local SQuAD v1.1 JSON file" in message
    assert info.value.__cause__ is not None


def _set(path: tuple, value):
    def mutate(document):
        *parents, leaf = path
        node = document
        for key in parents:
            node = node[key]
        node[leaf] = value

    return mutate


def _delete(path: tuple):
    def mutate(document):
        *parents, leaf = path
        node = document
        for key in parents:
            node = node[key]
        del node[leaf]

    return mutate


QA = ("data", 1, "paragraphs", 1, "qas", 2)
BAD_SQUAD = {
    # case: (file text or a mutation of the valid document, record path, field, received)
    "bad json": ('{\n  "data": [\n    {"title": "A",]\n}', "line 3", "column", "JSON"),
    "top level is a list": ("[1, 2]", "top level", "object", "list"),
    "no data": ('{"version": "1.1"}', "top level", "'data'", "'version'"),
    "no title": (_delete(("data", 1, "title")), "data[1]", "'title'", "'paragraphs'"),
    "no context": (_delete(("data", 1, "paragraphs", 1, "context")), "data[1].paragraphs[1]", "'context'", "'qas'"),
    "no qas": (_delete(("data", 1, "paragraphs", 1, "qas")), "data[1].paragraphs[1]", "'qas'", "'context'"),
    "no question": (_delete(QA + ("question",)), "data[1].paragraphs[1].qas[2]", "'question'", "'answers'"),
    "no answers": (_delete(QA + ("answers",)), "data[1].paragraphs[1].qas[2]", "'answers'", "'question'"),
    "no text": (
        _delete(QA + ("answers", 1, "text")),
        "data[1].paragraphs[1].qas[2].answers[1]",
        "'text'",
        "'answer_start'",
    ),
    "blank passage": (
        _set(("data", 1, "paragraphs", 1, "context"), " \n "),
        "data[1].paragraphs[1]",
        "context",
        "' \\n '",
    ),
    "number answer": (
        _set(QA + ("answers", 1, "text"), 42),
        "data[1].paragraphs[1].qas[2].answers[1]",
        "text",
        "number 42",
    ),
    "null answer": (_set(QA + ("answers", 0, "text"), None), "data[1].paragraphs[1].qas[2].answers[0]", "text", "null"),
    "empty answers": (_set(QA + ("answers",), []), "data[1].paragraphs[1].qas[2]", "answers", "[]"),
    "title not a string": (_set(("data", 0, "title"), ["A"]), "data[0]", "title", "list"),
}


@pytest.mark.parametrize("case", BAD_SQUAD.values(), ids=BAD_SQUAD.keys())
def test_malformed_squad_names_file_record_and_field(tmp_path, case):
    content, record, field, received = case
    if callable(content):
        document = copy.deepcopy(_squad_document())
        content(document)
        content = json.dumps(document, indent=1)
    path = tmp_path / "broken-squad.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as info:
        load_squad(path)
    message = str(info.value)
    for fragment in ("broken-squad.json", record, field, received):
        assert fragment in message, (fragment, message)


def test_missing_squad_file_says_so(tmp_path):
    with pytest.raises(DatasetError, match=r"missing-squad\.json does not exist.*synthetic"):
        load_squad(tmp_path / "missing-squad.json")


# --- choosing contexts -------------------------------------------------------------------------


def test_select_contexts_is_seeded(synthetic):
    validation = synthetic["validation"]
    first = list(select_contexts(validation, 10, seed=7)["id"])
    assert select_contexts(validation, 10, seed=7)["id"] == first
    assert select_contexts(validation, 10, seed=8)["id"] != first
    assert len(set(first)) == 10 and first != sorted(first)  # shuffled, not the first ten


@pytest.mark.parametrize("n", [None, 80, 500])
def test_select_contexts_keeps_all_rows_when_n_is_none_or_large(synthetic, n):
    chosen = select_contexts(synthetic["validation"], n, seed=0)["id"]
    assert sorted(chosen) == sorted(synthetic["validation"]["id"])


def test_select_contexts_rejects_negative_n(synthetic):
    with pytest.raises(ValueError, match="n=-1"):
        select_contexts(synthetic["validation"], -1, seed=0)


def test_load_contexts_reads_the_configured_source(tmp_path):
    data = DataConfig(num_passages=40, seed=2)
    assert len(load_contexts(data, "validation")) == 10
    assert load_contexts(data, "train")["id"] == make_synthetic_dataset(40, seed=2)["train"]["id"]
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_contexts(data, "test")


def test_one_squad_file_splits_by_article_without_overlap(tmp_path):
    document = {
        "version": "1.1",
        "data": [
            {
                "title": f"Article {a}",
                "paragraphs": [
                    {
                        "context": f"Passage {a}.{p}.",
                        "qas": [{"id": f"{a}.{p}", "question": "Q?", "answers": [{"text": "x", "answer_start": 0}]}],
                    }
                    for p in range(3)
                ],
            }
            for a in range(40)
        ],
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(document))
    data = DataConfig(source="squad", path=str(path), validation_fraction=0.25)
    train, validation = load_contexts(data, "train"), load_contexts(data, "validation")
    assert len(train) + len(validation) == 120
    assert not set(train["title"]) & set(validation["title"])
    assert 15 <= len(validation) <= 45  # about a quarter of the articles, three passages each
    assert load_contexts(data, "validation")["id"] == validation["id"]


# --- unlabelled plain-text passages --------------------------------------------------------------


def test_a_text_file_gives_a_passage_per_blank_line_block(tmp_path):
    path = tmp_path / "harbour_notes.txt"
    path.write_text(
        "The harbour of Vaskmere\nopened in 1902.\n\n  \n\nIts lighthouse is red.\n\nIts lighthouse is red.\n"
    )
    rows = load_text_passages(path)
    assert rows["context"] == ["The harbour of Vaskmere opened in 1902.", "Its lighthouse is red."]  # repeat dropped
    assert rows["title"] == ["harbour_notes"] * 2
    assert rows["questions"] == [[], []] and rows["answers"] == [[], []]
    assert len(set(rows["id"])) == 2 and all(i.startswith("text-") for i in rows["id"])
    path.write_text("The harbour of Vaskmere opened\nin 1902.\n\nIts lighthouse is red.")  # re-wrapped
    assert load_text_passages(path)["id"] == rows["id"]


def test_a_text_folder_gives_a_passage_per_file_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("Second file's passage.")
    (tmp_path / "a.txt").write_text("First file's passage.\n")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "c.txt").write_text("Third, in a subfolder.")
    (tmp_path / "notes.md").write_text("not a passage")
    rows = load_text_passages(tmp_path)
    assert rows["title"] == ["a", "b", "c"]
    assert rows["context"][0] == "First file's passage."


@pytest.mark.parametrize(
    "files, target, fragment",
    [
        ({}, "missing.txt", "missing.txt do not exist"),
        ({"notes.md": b"x"}, "", "holds no .txt file"),
        ({"empty.txt": b""}, "empty.txt", "empty.txt holds no passage"),
        ({"blank.txt": b" \n\n\t\n"}, "blank.txt", "blank.txt holds no passage"),
        ({"latin1.txt": b"caf\xe9"}, "latin1.txt", "latin1.txt is not UTF-8"),
        ({"good.txt": b"A passage.", "empty.txt": b""}, "", "empty.txt holds no passage"),
    ],
)
def test_unusable_text_input_names_the_file(tmp_path, files, target, fragment):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DatasetError, match=re.escape(fragment)):
        load_text_passages(tmp_path / target)


def test_text_passages_train_and_a_labelled_source_holds_out(tmp_path):
    (tmp_path / "p.txt").write_text("One passage.\n\nAnother passage.")
    data = DataConfig(source="text", path=str(tmp_path), eval_source="synthetic", num_passages=40)
    assert load_contexts(data, "train")["context"] == ["One passage.", "Another passage."]
    held_out = load_contexts(data, "validation")
    assert held_out["id"] == make_synthetic_dataset(40)["validation"]["id"]
    assert all(held_out["questions"])
