"""Contexts for knowledge incorporation: passages with closed-book questions (SEAL §4.2).

Three sources give the same rows (:data:`COLUMNS`):

- synthetic passages about invented people, places, objects and organisations
  (``models/synthetic_passages.py``), so that no pretrained model can answer the questions
  before it is adapted (offline, seeded, train and validation share no invented name);
- SQuAD v1.1, the paper's data, from a local JSON file or the Hugging Face Hub;
- plain-text passages with no questions (:func:`load_text_passages`), training contexts only:
  their rewards ask question-answer pairs a model writes (``models/generated_questions.py``),
  and their held-out contexts come from a labelled source (``DataConfig.held_out``).

A row is one context: ``id``, ``title``, ``context`` (the passage), ``questions`` and, for
each question, ``answers`` (the acceptable gold answers, each stated verbatim in the passage).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import datasets

from models.config import DataConfig
from models.errors import DatasetError
from models.synthetic_passages import synthetic_rows

COLUMNS = ("id", "title", "context", "questions", "answers")
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "questions": datasets.Sequence(datasets.Value("string")),
        "answers": datasets.Sequence(datasets.Sequence(datasets.Value("string"))),
    }
)
SPLITS = ("train", "validation")


# ---------------------------------------------------------------------------------------------
# The synthetic dataset
# ---------------------------------------------------------------------------------------------


def make_synthetic_dataset(
    num_passages: int = 320, seed: int = 0, validation_fraction: float = 0.25
) -> datasets.DatasetDict:
    """The synthetic passages of :func:`models.synthetic_passages.synthetic_rows` as datasets.

    Args:
        num_passages: passages in both splits together.
        seed: the only source of randomness; the same arguments give the same datasets.
        validation_fraction: share of passages in the validation split (rounded).

    Returns:
        A ``DatasetDict`` with ``"train"`` and ``"validation"`` splits with :data:`COLUMNS`.

    Raises:
        ValueError: if ``num_passages`` is below 1 or ``validation_fraction`` outside [0, 1].
    """
    rows = synthetic_rows(num_passages, seed, validation_fraction)
    return datasets.DatasetDict({split: _to_dataset(rows[split]) for split in SPLITS})


def _to_dataset(rows: list[dict[str, Any]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({column: [row[column] for row in rows] for column in COLUMNS}, features=FEATURES)


# ---------------------------------------------------------------------------------------------
# SQuAD v1.1
# ---------------------------------------------------------------------------------------------

_SQUAD_HINT = (
    'expected SQuAD v1.1 format: {"data": [{"title": str, "paragraphs": [{"context": '
    'str, "qas": [{"question": str, "answers": [{"text": str}, ...]}]}]}]}'
)


def load_squad(path: str | os.PathLike) -> datasets.Dataset:
    """Read a local SQuAD v1.1 JSON file into one row per passage, in file order.

    Questions are grouped by passage (paragraphs with the same title and text become one
    row, so ids stay unique); passages with no questions are skipped; duplicate gold answers
    of a question are dropped (first occurrence kept).

    Args:
        path: a SQuAD v1.1-format JSON file, such as ``dev-v1.1.json``.

    Returns:
        A ``Dataset`` with :data:`COLUMNS`.

    Raises:
        DatasetError: if the file is missing, is not JSON, or a record lacks a field or holds
            the wrong type; the message names the file, the record and the field.
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise DatasetError(
            f"SQuAD file {source} does not exist; pass the path of a SQuAD v1.1 JSON file "
            "(such as dev-v1.1.json) or use data.source=synthetic"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read SQuAD file {source}: {error}") from error
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"bad SQuAD file {source}: not valid JSON at line {error.lineno}, column "
            f"{error.colno} ({error.msg}); {_SQUAD_HINT}"
        ) from error
    return group_squad_rows(_squad_records(document, source))


def _squad_records(document: Any, source: Path) -> Iterator[dict[str, Any]]:
    """Validate the file and yield its questions as flat rows, as the hub gives them."""
    top = _as_object(document, "top level", source)
    for a, article in enumerate(_field(top, "data", list, "top level", source)):
        where = f"data[{a}]"
        article = _as_object(article, where, source)
        title = _field(article, "title", str, where, source)
        for p, paragraph in enumerate(_field(article, "paragraphs", list, where, source)):
            where = f"data[{a}].paragraphs[{p}]"
            paragraph = _as_object(paragraph, where, source)
            context = _field(paragraph, "context", str, where, source)
            if not context.strip():
                raise DatasetError(
                    f"bad SQuAD file {source}: {where}.context is empty or whitespace-only, "
                    f"got {context!r}; every passage needs text"
                )
            for q, qa in enumerate(_field(paragraph, "qas", list, where, source)):
                yield _squad_question(qa, title, context, f"{where}.qas[{q}]", source)


def _squad_question(qa: Any, title: str, context: str, where: str, source: Path) -> dict[str, Any]:
    qa = _as_object(qa, where, source)
    question = _field(qa, "question", str, where, source)
    if not question.strip():
        raise DatasetError(f"bad SQuAD file {source}: {where}.question is empty or whitespace-only, got {question!r}")
    answers = _field(qa, "answers", list, where, source)
    if not answers:
        raise DatasetError(
            f"bad SQuAD file {source}: {where}.answers is empty, got []; every question needs "
            "at least one gold answer (SQuAD v2 unanswerable questions are not supported)"
        )
    texts = []
    for n, answer in enumerate(answers):
        answer_where = f"{where}.answers[{n}]"
        text = _field(_as_object(answer, answer_where, source), "text", str, answer_where, source)
        if not text.strip():
            raise DatasetError(
                f"bad SQuAD file {source}: {answer_where}.text is empty or whitespace-only, "
                f"got {text!r}; every gold answer needs text"
            )
        texts.append(text)
    return {"title": title, "context": context, "question": question, "answers": {"text": texts}}


def _as_object(value: Any, where: str, source: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DatasetError(
            f"bad SQuAD file {source}: {where} must be a JSON object, got "
            f"{_json_type(value)} {_preview(value)}; {_SQUAD_HINT}"
        )
    return value


def _field(record: dict[str, Any], key: str, kind: type, where: str, source: Path) -> Any:
    if key not in record:
        raise DatasetError(
            f"bad SQuAD file {source}: {where} has no field {key!r} (it has {sorted(record)}); {_SQUAD_HINT}"
        )
    value = record[key]
    if not isinstance(value, kind):
        raise DatasetError(
            f"bad SQuAD file {source}: {where}.{key} must be a {_JSON_TYPES[kind]}, got "
            f"{_json_type(value)} {_preview(value)}"
        )
    return value


_JSON_TYPES = {
    dict: "object",
    list: "list",
    str: "string",
    bool: "boolean",
    int: "number",
    float: "number",
    type(None): "null",
}


def _json_type(value: Any) -> str:
    return _JSON_TYPES[type(value)]


def _preview(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_squad_hub(name: str = "rajpurkar/squad", split: str = "validation") -> datasets.Dataset:
    """Load SQuAD from the Hugging Face Hub (or its local cache) grouped by passage.

    Args:
        name: a dataset on the Hub with SQuAD's flat columns.
        split: the split to load (SQuAD v1.1 has ``"train"`` and ``"validation"``).

    Returns:
        A ``Dataset`` with :data:`COLUMNS`, one row per passage.

    Raises:
        DatasetError: if the Hub cannot be reached (or the dataset is not cached while
            offline); the original exception is chained.
    """
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as error:  # network, auth, missing cache: all mean "use a local file"
        offline = [
            var
            for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
            if os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
        ]
        reason = f" ({' and '.join(offline)} set)" if offline else ""
        raise DatasetError(
            f"could not reach the Hugging Face Hub to load {name!r} split {split!r}{reason}: "
            f"{type(error).__name__}: {error}. Pass a local SQuAD v1.1 JSON file instead "
            "(data.path=dev-v1.1.json, read by load_squad)"
        ) from error
    return group_squad_rows(rows)


def group_squad_rows(rows: Iterable[dict[str, Any]]) -> datasets.Dataset:
    """Group flat SQuAD rows (one question each) into one row per passage.

    Passages are keyed by (title, context) and kept in order of first appearance; questions
    keep their order; a question's duplicate answers are dropped (first occurrence kept).

    Args:
        rows: dicts with ``title``, ``context``, ``question`` and ``answers: {"text": [...]}``.

    Returns:
        A ``Dataset`` with :data:`COLUMNS`.

    Raises:
        DatasetError: if a question has no non-blank answer (SQuAD v2's unanswerable ones).
    """
    passages: dict[tuple[str, str], dict[str, Any]] = {}
    for index, row in enumerate(rows):
        answers = list(dict.fromkeys(text.strip() for text in row["answers"]["text"]))
        answers = [text for text in answers if text]
        if not answers:
            raise DatasetError(
                f"rows[{index}] (question {row['question']!r}) has no answers, got "
                f"{row['answers']['text']!r}; SQuAD v2 unanswerable questions are not "
                "supported, use SQuAD v1.1 (rajpurkar/squad)"
            )
        key = (row["title"], row["context"])
        if key not in passages:
            passages[key] = {
                "id": _squad_id(*key),
                "title": key[0],
                "context": key[1],
                "questions": [],
                "answers": [],
            }
        passages[key]["questions"].append(row["question"].strip())
        passages[key]["answers"].append(answers)
    return _to_dataset(list(passages.values()))


def _squad_id(title: str, context: str) -> str:
    return "squad-" + hashlib.sha256(f"{title}\n{context}".encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Plain-text passages (unlabelled)
# ---------------------------------------------------------------------------------------------

_BLANK_LINES = re.compile(r"\n\s*\n")


def load_text_passages(path: str | os.PathLike) -> datasets.Dataset:
    """Unlabelled passages from a ``.txt`` file or a folder of them: one row per blank-line-separated
    block (a file with none is one passage), titled by its file's name, with no questions.

    A block's lines are joined with single spaces, so re-wrapping a file keeps its ids; blocks
    that repeat an earlier one (same title and text) are dropped. A folder's ``.txt`` files are
    read in name order, subfolders included.

    Args:
        path: a UTF-8 text file, or a folder holding ``.txt`` files.

    Returns:
        A ``Dataset`` with :data:`COLUMNS`; ``questions`` and ``answers`` are empty.

    Raises:
        DatasetError: if the path does not exist, a folder holds no ``.txt`` file, or a file is
            unreadable, not UTF-8 or holds no passage; the message names the file.
    """
    source = Path(path)
    if source.is_dir():
        files = sorted(f for f in source.rglob("*.txt") if f.is_file())
        if not files:
            raise DatasetError(f"text folder {source} holds no .txt file; put one passage per file or blank-line block")
    elif source.is_file():
        files = [source]
    else:
        raise DatasetError(f"text passages {source} do not exist; pass a .txt file or a folder of .txt files")
    rows: dict[str, dict[str, Any]] = {}
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DatasetError(f"text file {file} is not UTF-8 ({error.reason} at byte {error.start})") from error
        except OSError as error:
            raise DatasetError(f"cannot read text file {file}: {error}") from error
        blocks = [" ".join(block.split()) for block in _BLANK_LINES.split(text)]
        blocks = [block for block in blocks if block]
        if not blocks:
            raise DatasetError(f"text file {file} holds no passage (it is empty or whitespace only); remove it")
        title = file.stem
        for block in blocks:
            row_id = "text-" + hashlib.sha256(f"{title}\n{block}".encode()).hexdigest()[:12]
            rows.setdefault(row_id, {"id": row_id, "title": title, "context": block, "questions": [], "answers": []})
    return _to_dataset(list(rows.values()))


# ---------------------------------------------------------------------------------------------
# Choosing contexts
# ---------------------------------------------------------------------------------------------


def select_contexts(dataset: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """``n`` rows in a seeded random order (all rows, shuffled, if ``n`` is None or too big).

    Args:
        dataset: contexts to choose from.
        n: how many to keep.
        seed: seed of the shuffle; the same seed picks the same rows in the same order.

    Returns:
        The chosen rows, in shuffled order.

    Raises:
        ValueError: if ``n`` is negative.
    """
    if n is not None and n < 0:
        raise ValueError(f"cannot select a negative number of contexts, got n={n}")
    size = len(dataset) if n is None else min(n, len(dataset))
    return dataset.select(random.Random(seed).sample(range(len(dataset)), size))


def load_contexts(data: DataConfig, split: Literal["train", "validation"]) -> datasets.Dataset:
    """The contexts of ``split`` from the source ``data`` names.

    A local SQuAD file is split by article: an article goes to validation when the hash of its
    title falls in the first ``data.validation_fraction`` of the range, so no passage of a
    held-out article is ever trained on, and the split does not move when rows are added.
    Plain-text passages (``source: text``) are all training contexts; the held-out ones are
    ``data.eval_source``'s validation split (:meth:`DataConfig.held_out`).

    Args:
        data: the ``data`` section of the config.
        split: ``"train"`` (contexts for the outer loop) or ``"validation"`` (held out).

    Returns:
        A ``Dataset`` with :data:`COLUMNS`.

    Raises:
        ValueError: if ``split`` is not one of :data:`SPLITS`.
        DatasetError: if the SQuAD file or the Hub cannot be read.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if data.source == "text":
        return load_text_passages(data.path) if split == "train" else load_contexts(data.held_out(), split)
    if data.source == "synthetic":
        return make_synthetic_dataset(data.num_passages, data.seed, data.validation_fraction)[split]
    if data.path is not None:
        return split_by_title(load_squad(data.path), data.validation_fraction)[split]
    return load_squad_hub(data.hub_name, split)


def split_by_title(dataset: datasets.Dataset, validation_fraction: float) -> datasets.DatasetDict:
    """Deterministic train/validation split that keeps every article (title) on one side."""

    def held_out(title: str) -> bool:
        bucket = int(hashlib.sha256(title.encode()).hexdigest()[:8], 16) / 16**8
        return bucket < validation_fraction

    flags = [held_out(title) for title in dataset["title"]]
    return datasets.DatasetDict(
        train=dataset.select([i for i, flag in enumerate(flags) if not flag]),
        validation=dataset.select([i for i, flag in enumerate(flags) if flag]),
    )
