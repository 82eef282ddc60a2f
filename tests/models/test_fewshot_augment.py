"""Augmentations: shapes, invertibility of the geometric ones (voting maps answers back with the
inverse), colour permutations, and augmented examples."""

import random

import pytest

from models.fewshot import augment
from models.fewshot.augment import BASIC, Example

GRID = ((1, 2, 3), (4, 5, 6))  # not square, so a wrong axis shows


@pytest.mark.parametrize("name", sorted(BASIC))
def test_every_basic_transform_is_undone_by_its_inverse(name):
    forward, inverse = BASIC[name]
    assert inverse(forward(GRID)) == GRID
    assert forward(inverse(GRID)) == GRID
    assert forward(GRID) != GRID  # and it does something


@pytest.mark.parametrize(
    "name, expected",
    [
        ("rotate90", ((4, 1), (5, 2), (6, 3))),
        ("rotate180", ((6, 5, 4), (3, 2, 1))),
        ("rotate270", ((3, 6), (2, 5), (1, 4))),
        ("flip_lr", ((3, 2, 1), (6, 5, 4))),
        ("flip_ud", ((4, 5, 6), (1, 2, 3))),
        ("transpose", ((1, 4), (2, 5), (3, 6))),
        ("anti_transpose", ((6, 3), (5, 2), (4, 1))),
    ],
)
def test_basic_transforms(name, expected):
    assert BASIC[name][0](GRID) == expected


def test_the_basic_transforms_are_the_seven_non_identity_symmetries_of_the_square():
    square = ((1, 2), (3, 4))
    images = {forward(square) for forward, _ in BASIC.values()}
    assert len(images) == 7 and square not in images


def test_size_and_repeat_transforms():
    assert augment.upscale(((1, 2),)) == ((1, 1, 2, 2), (1, 1, 2, 2))
    assert augment.SIZE["upscale_height"](GRID) == ((1, 2, 3), (1, 2, 3), (4, 5, 6), (4, 5, 6))
    assert augment.SIZE["upscale_width"](((1, 2),)) == ((1, 1, 2, 2),)
    assert augment.REPEAT["tile_across"](((1, 2),)) == ((1, 2, 1, 2),)
    assert augment.REPEAT["tile_down"](((1, 2),)) == ((1, 2), (1, 2))
    assert augment.tile(((1,),)) == ((1, 1), (1, 1))
    assert augment.CHAIN["rotate90+upscale"](((1, 2),)) == ((1, 1), (1, 1), (2, 2), (2, 2))


@pytest.mark.parametrize(
    "switches, count",
    [
        ({}, 0),
        ({"use_basic_augmentations": True}, 7),
        ({"use_size_augmentations": True}, 3),
        ({"use_chain_augmentations": True}, 7),
        ({"use_repeat_augmentations": True}, 3),
        (dict.fromkeys(augment.FAMILIES, True), 20),
    ],
)
def test_the_switches_select_families(switches, count):
    switches = dict.fromkeys(augment.FAMILIES, False) | switches
    assert len(augment.selected_transforms(switches)) == augment.count_transforms(switches) == count


def test_colour_permutations_keep_the_background_and_invert():
    rng = random.Random(0)
    for _ in range(20):
        permutation = augment.random_colour_permutation(rng)
        assert permutation[0] == 0 and sorted(permutation) == list(range(10))
        permuted = augment.permute_colours(GRID, permutation)
        assert augment.permute_colours(permuted, augment.invert_permutation(permutation)) == GRID


def test_an_augmented_example_transforms_every_grid_alike_and_shuffles_demonstrations():
    demos = tuple((((i, 0),), ((0, i),)) for i in range(1, 6))
    example = Example(demos, (((7, 0),), ((0, 7),)), "identity")
    augmented = augment.augment_example(example, "flip_lr", augment.flip_lr, random.Random(3))
    assert augmented.view == "flip_lr"
    # Colours are permuted consistently: undo the flip, and each input/output pair still mirrors.
    for grid_in, grid_out in (*augmented.demonstrations, augmented.query):
        assert augment.flip_lr(grid_in) == tuple(tuple(reversed(r)) for r in augment.flip_lr(grid_out))


def test_augmented_copies_shuffle_the_demonstrations():
    demos = tuple((((1,) * width,), ((2,) * width,)) for width in range(1, 6))  # told apart by width
    example = Example(demos, (((1,),), ((2,),)), "identity")
    orders = set()
    for seed in range(5):
        augmented = augment.augment_example(example, "flip_lr", augment.flip_lr, random.Random(seed))
        widths = tuple(len(grid_in[0]) for grid_in, _ in augmented.demonstrations)
        assert sorted(widths) == [1, 2, 3, 4, 5]
        orders.add(widths)
    assert len(orders) > 1


def test_an_example_that_would_outgrow_30x30_is_left_out():
    big = tuple(tuple([1] * 16) for _ in range(16))
    example = Example(((big, big),), (big, big), "identity")
    assert augment.augment_example(example, "upscale", augment.upscale, random.Random(0)) is None
    assert augment.augment_example(example, "flip_lr", augment.flip_lr, random.Random(0)) is not None
