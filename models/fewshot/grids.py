"""ARC grids as text: an encoding the tokenizer splits one cell per token, and its exact parser.

A grid is a tuple of rows of colours 0-9. Two encodings, one row per line:

- ``compact``: ``"012\\n345"``, one digit per cell and nothing between cells. Tokenizers that
  split digits one by one (SmolLM2, byte-level ones) see one token per cell;
- ``spaced``: ``"0 1 2\\n3 4 5"``, cells separated by a space. Llama-3's tokenizer merges up to
  three digits into one token, so it needs a separator; each digit is then its own token.

:func:`choose_format` picks the compact one when the tokenizer allows it, and
:func:`cells_per_token_problems` checks it on a real tokenizer. The parser accepts exactly what
the encoder writes (plus surrounding whitespace); anything else is malformed and scores as a
wrong answer. Nothing is ever ``eval``-ed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from transformers import PreTrainedTokenizerBase

Grid = tuple[tuple[int, ...], ...]
GridFormat = Literal["compact", "spaced"]
MAX_SIDE = 30  # ARC's largest grid side
_ROW = {"compact": re.compile(r"[0-9]+"), "spaced": re.compile(r"[0-9]( [0-9])*")}


class MalformedGrid(ValueError):
    """Text that is not a grid in the expected encoding; the message says what is wrong."""


def as_grid(rows: Sequence[Sequence[int]]) -> Grid:
    """A grid from nested sequences (lists, numpy rows), checked to be rectangular with colours 0-9.

    Raises:
        MalformedGrid: empty, ragged, too large, or a value outside 0-9.
    """
    grid = tuple(tuple(int(v) for v in row) for row in rows)
    if not grid or not grid[0]:
        raise MalformedGrid("a grid needs at least one row and one column")
    width = len(grid[0])
    if any(len(row) != width for row in grid):
        raise MalformedGrid(f"rows of different widths: {[len(r) for r in grid]}")
    if len(grid) > MAX_SIDE or width > MAX_SIDE:
        raise MalformedGrid(f"grid of {len(grid)}x{width} is larger than {MAX_SIDE}x{MAX_SIDE}")
    if any(not 0 <= v <= 9 for row in grid for v in row):
        raise MalformedGrid("colours must be 0-9")
    return grid


def encode_grid(grid: Grid, fmt: GridFormat) -> str:
    """One line per row, no trailing newline: ``"01\\n23"`` (compact) or ``"0 1\\n2 3"`` (spaced)."""
    separator = "" if fmt == "compact" else " "
    return "\n".join(separator.join(str(v) for v in row) for row in grid)


def parse_grid(text: str, fmt: GridFormat) -> Grid:
    """The grid written in ``text``, exactly as :func:`encode_grid` writes it.

    Leading and trailing whitespace is ignored; every other deviation (a stray character, a
    blank line inside the grid, ragged rows, a wrong separator) is an error.

    Raises:
        MalformedGrid: saying what is wrong.
    """
    body = text.strip()
    if not body:
        raise MalformedGrid("no grid: the text is empty")
    pattern = _ROW[fmt]
    rows = []
    for number, line in enumerate(body.split("\n"), 1):
        line = line.rstrip("\r")
        if not pattern.fullmatch(line):
            raise MalformedGrid(f"line {number} {line[:40]!r} is not a row of {fmt} digits")
        rows.append(tuple(int(c) for c in line.replace(" ", "")))
    return as_grid(rows)


def cell_accuracy(predicted: Grid | None, expected: Grid) -> float:
    """Share of cells right, 0 when the shape differs or nothing was parsed (partial credit)."""
    if predicted is None or len(predicted) != len(expected) or len(predicted[0]) != len(expected[0]):
        return 0.0
    cells = [p == e for prow, erow in zip(predicted, expected) for p, e in zip(prow, erow)]
    return sum(cells) / len(cells)


def cells_per_token_problems(tokenizer: PreTrainedTokenizerBase, fmt: GridFormat) -> list[str]:
    """Where ``tokenizer`` does not give every cell of an ``fmt``-encoded grid its own token.

    Encodes grids with every digit pair side by side (and after ``Input:`` / ``Output:`` lines,
    as in the prompts) and checks from the offsets that no token covers two cells or part of one.

    Returns:
        One line per offending token; empty when each cell is exactly one token.
    """
    digits = range(10)
    grids = [tuple(tuple((a + b + k) % 10 for k in range(3)) for b in digits) for a in digits]
    text = "\n".join(f"Input:\n{encode_grid(g, fmt)}\nOutput:\n{encode_grid(g, fmt)}" for g in grids)
    cells = [m.start() for m in re.finditer(r"[0-9]", text)]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    problems = []
    starts = set()
    for token_id, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        covered = [c for c in cells if start <= c < end]
        if len(covered) > 1 or (covered and text[start:end].strip() != text[covered[0]]):
            problems.append(f"token {token_id} {text[start:end]!r} covers {len(covered)} cells")
        starts.update(covered)
    missing = len(set(cells) - starts)
    if missing:
        problems.append(f"{missing} cells fall in no token")
    return problems


def choose_format(tokenizer: PreTrainedTokenizerBase) -> GridFormat:
    """``compact`` when the tokenizer gives each cell its own token that way, else ``spaced``.

    Raises:
        ValueError: if neither encoding gives one token per cell.
    """
    for fmt in ("compact", "spaced"):
        if not cells_per_token_problems(tokenizer, fmt):
            return fmt
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} merges grid cells in both the compact and the "
        f"spaced encoding: {cells_per_token_problems(tokenizer, 'spaced')[:3]}"
    )
