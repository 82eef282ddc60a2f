"""Grid augmentations for ARC test-time training (SEAL §4.1, after Akyürek et al. 2024).

A transform maps a grid to a grid and is applied to every grid of a task (inputs and outputs
alike), which turns one task into a new, equally consistent one. The self-edit's four switches
pick the families:

- basic: rotations by 90/180/270 degrees, left-right and up-down flips, transpose and
  anti-transpose (the dihedral group; each has an inverse, so they also serve for voting);
- size: x2 upscaling of both sides, of the height only, of the width only;
- chain: a basic transform followed by x2 upscaling;
- repeat: the grid tiled twice side by side, twice stacked, and 2x2.

With any family switched on, each augmented copy also gets its colours 1-9 permuted (0, the
background, stays) and its demonstrations shuffled, from a seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from models.fewshot.grids import MAX_SIDE, Grid

Transform = Callable[[Grid], Grid]


def rotate90(grid: Grid) -> Grid:
    """Clockwise quarter turn: (h, w) -> (w, h)."""
    return tuple(zip(*grid[::-1]))


def rotate180(grid: Grid) -> Grid:
    return tuple(tuple(row[::-1]) for row in grid[::-1])


def rotate270(grid: Grid) -> Grid:
    """Counter-clockwise quarter turn."""
    return tuple(zip(*grid))[::-1]


def flip_lr(grid: Grid) -> Grid:
    return tuple(tuple(row[::-1]) for row in grid)


def flip_ud(grid: Grid) -> Grid:
    return tuple(grid[::-1])


def transpose(grid: Grid) -> Grid:
    return tuple(zip(*grid))


def anti_transpose(grid: Grid) -> Grid:
    """Reflection across the anti-diagonal."""
    return rotate180(transpose(grid))


def upscale(grid: Grid, height: int = 2, width: int = 2) -> Grid:
    """Each cell becomes a ``height`` x ``width`` block."""
    return tuple(tuple(v for v in row for _ in range(width)) for row in grid for _ in range(height))


def tile(grid: Grid, down: int = 2, across: int = 2) -> Grid:
    """The grid repeated ``down`` times vertically and ``across`` times horizontally."""
    return tuple(tuple(row) * across for _ in range(down) for row in grid)


# name -> (transform, inverse). The inverses are what voting maps predictions back with.
BASIC: dict[str, tuple[Transform, Transform]] = {
    "rotate90": (rotate90, rotate270),
    "rotate180": (rotate180, rotate180),
    "rotate270": (rotate270, rotate90),
    "flip_lr": (flip_lr, flip_lr),
    "flip_ud": (flip_ud, flip_ud),
    "transpose": (transpose, transpose),
    "anti_transpose": (anti_transpose, anti_transpose),
}
SIZE: dict[str, Transform] = {
    "upscale": upscale,
    "upscale_height": lambda g: upscale(g, 2, 1),
    "upscale_width": lambda g: upscale(g, 1, 2),
}
CHAIN: dict[str, Transform] = {
    f"{name}+upscale": (lambda g, f=forward: upscale(f(g))) for name, (forward, _) in BASIC.items()
}
REPEAT: dict[str, Transform] = {
    "tile_across": lambda g: tile(g, 1, 2),
    "tile_down": lambda g: tile(g, 2, 1),
    "tile_2x2": tile,
}
FAMILIES = {
    "use_basic_augmentations": {name: forward for name, (forward, _) in BASIC.items()},
    "use_size_augmentations": SIZE,
    "use_chain_augmentations": CHAIN,
    "use_repeat_augmentations": REPEAT,
}


def identity(grid: Grid) -> Grid:
    return grid


def selected_transforms(switches: dict[str, bool]) -> dict[str, Transform]:
    """The transforms the self-edit's ``data_generation`` switches turn on, in a fixed order."""
    chosen: dict[str, Transform] = {}
    for switch, family in FAMILIES.items():
        if switches[switch]:
            chosen.update(family)
    return chosen


def count_transforms(switches: dict[str, bool]) -> int:
    return sum(len(family) for switch, family in FAMILIES.items() if switches[switch])


def permute_colours(grid: Grid, permutation: Sequence[int]) -> Grid:
    """Colour ``c`` becomes ``permutation[c]``."""
    return tuple(tuple(permutation[v] for v in row) for row in grid)


def random_colour_permutation(rng: random.Random) -> tuple[int, ...]:
    """A permutation of 0-9 that keeps 0 (the background) in place."""
    colours = list(range(1, 10))
    rng.shuffle(colours)
    return (0, *colours)


def invert_permutation(permutation: Sequence[int]) -> tuple[int, ...]:
    inverse = [0] * len(permutation)
    for source, target in enumerate(permutation):
        inverse[target] = source
    return tuple(inverse)


Pair = tuple[Grid, Grid]  # (input, output)


@dataclass(frozen=True)
class Example:
    """One test-time training example: demonstrations in the prompt, a query to answer."""

    demonstrations: tuple[Pair, ...]
    query: Pair
    view: str  # the transform that made it ("identity" for the original)


def fits(pair: Pair) -> bool:
    return all(len(g) <= MAX_SIDE and len(g[0]) <= MAX_SIDE for g in pair)


def augment_example(example: Example, name: str, transform: Transform, rng: random.Random) -> Example | None:
    """``example`` under ``transform``, with colours permuted and demonstrations shuffled.

    Returns None when a grid would outgrow ARC's 30x30 (upscaling a large grid).
    """
    permutation = random_colour_permutation(rng)

    def apply(pair: Pair) -> Pair:
        return tuple(permute_colours(transform(g), permutation) for g in pair)

    demonstrations = [apply(p) for p in example.demonstrations]
    query = apply(example.query)
    if not all(fits(p) for p in (*demonstrations, query)):
        return None
    rng.shuffle(demonstrations)
    return Example(tuple(demonstrations), query, name)
