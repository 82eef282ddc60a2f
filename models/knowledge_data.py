"""Contexts for knowledge incorporation: passages with closed-book questions (SEAL §4.2).

Two sources give the same rows (:data:`COLUMNS`):

- a synthetic generator of passages about invented people, places, objects and organisations,
  so that no pretrained model can answer the questions before it is adapted (offline, seeded,
  train and validation share no invented name);
- SQuAD v1.1, the paper's data, from a local JSON file or the Hugging Face Hub.

A row is one context: ``id``, ``title``, ``context`` (the passage), ``questions`` and, for
each question, ``answers`` (the acceptable gold answers, each stated verbatim in the passage).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets

from models.config import DataConfig
from models.errors import DatasetError

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
# Invented names
# ---------------------------------------------------------------------------------------------

_ONSETS = (
    "b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "pr", "r", "s",
    "sh", "st", "t", "th", "tr", "v", "w", "z", "qu", "cl", "fl",
)
# After a coda only a single consonant follows, so clusters stay pronounceable ("Kel-throp").
_SIMPLE_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou")
_FIRST_VOWELS = ("a", "e", "i", "o")  # a name opening on "ou" or "ea" reads badly
_CODAS = ("", "", "", "n", "r", "l", "s")
# A final syllable per kind of name makes a surname read as a surname and a town as a town.
_ENDINGS = {
    "given": ("a", "el", "anne", "is", "wen", "ric", "ora", "ian", "eth", "ith", "o", "ine"),
    "surname": ("throp", "wick", "ley", "more", "ford", "ton", "rell", "vane", "ash", "den"),
    "town": ("mouth", "bury", "holm", "mere", "moor", "dale", "stead", "wyn", "fell", "ham"),
    "river": ("ey", "wen", "ell", "ash", "bourne", "burn", "ock", "an", "ine", "water"),
    "island": ("holm", "ey", "ay", "ska", "ra", "ness", "sey", "ore", "vik", "garth"),
    "thing": ("ory", "arsh", "ane", "ell", "ix", "ond", "ara", "esk", "ent", "oth"),
}
_UNPRONOUNCEABLE = re.compile(r"(.)\1\1|[aeiou]{3}|[^aeiouy]{4}|quu|uu|ii|aa")


class _NameForge:
    """Invents capitalised 2-4 syllable words and never hands out the same word twice."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, kind: str) -> str:
        while True:
            candidate = self._candidate(kind)
            if 5 <= len(candidate) <= 10 and not _UNPRONOUNCEABLE.search(candidate):
                if candidate not in self.used:
                    self.used.add(candidate)
                    return candidate.capitalize()

    def person(self) -> str:
        return f"{self.word('given')} {self.word('surname')}"

    def _candidate(self, kind: str) -> str:
        rng = self.rng
        # Some names open on a vowel ("Elis"), most on a consonant ("Kelthrop").
        if rng.random() < 0.2:
            stem = rng.choice(_FIRST_VOWELS)
        else:
            stem = rng.choice(_ONSETS) + rng.choice(_VOWELS)
        stem += rng.choice(_CODAS)
        if rng.random() < 0.3:
            stem += rng.choice(_SIMPLE_ONSETS if stem[-1] not in "aeiou" else _ONSETS)
            stem += rng.choice(_VOWELS) + rng.choice(_CODAS)
        ending = rng.choice(_ENDINGS[kind])
        if ending[0] in "aeiou" and stem[-1] in "aeiou":
            stem += rng.choice(_SIMPLE_ONSETS)  # "Tha" + "ory" would be a vowel run
        return stem + ending


@dataclass(frozen=True)
class Cast:
    """The invented names one passage draws on. Two casts never share a name or name word."""

    person: str  # founder, maker, architect or inventor
    other_person: str  # chair, donor, mayor, festival organiser or diarist
    town: str
    other_town: str
    river: str  # bare name: prose says "the {river} River"
    island: str  # bare name: prose says "{island} Island"
    name: str  # the main invented thing: organisation, landmark, object, festival, machine


def _draw_cast(forge: _NameForge) -> Cast:
    return Cast(
        person=forge.person(),
        other_person=forge.person(),
        town=forge.word("town"),
        other_town=forge.word("town"),
        river=forge.word("river"),
        island=forge.word("island"),
        name=forge.word("thing"),
    )


# ---------------------------------------------------------------------------------------------
# Passage styles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One fact a passage states: several phrasings of its question and its gold answers."""

    questions: tuple[str, ...]
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Passage:
    """A rendered passage and every fact it states (a row asks about 4 to 6 of them)."""

    title: str
    sentences: tuple[str, ...]
    facts: tuple[Fact, ...]

    @property
    def context(self) -> str:
        return " ".join(self.sentences)


_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
_TRADES = (
    ("clockmakers", "clockmaker"), ("cartographers", "cartographer"),
    ("glassblowers", "glassblower"), ("bookbinders", "bookbinder"),
    ("lens grinders", "lens grinder"), ("bell founders", "bell founder"),
    ("rope makers", "rope maker"), ("instrument makers", "instrument maker"),
)
_ORGANISATIONS = ("Guild", "Society", "Company", "Fellowship", "Academy")
_LANDMARKS = ("Bridge", "Clock Tower", "Observatory", "Lighthouse", "Library")
_OBJECTS = (
    ("lantern", "lanterns"), ("compass", "compasses"), ("astrolabe", "astrolabes"),
    ("music box", "music boxes"), ("chronometer", "chronometers"), ("telescope", "telescopes"),
)
_MATERIALS = ("brass", "silver", "copper", "oak", "walnut", "pewter")
_MACHINES = ("engine", "loom", "press", "pump", "mill")


def _years(rng: random.Random, count: int) -> list[int]:
    """``count`` distinct increasing years, so every year question has one answer."""
    return sorted(rng.sample(range(1640, 1895), count))


def _date(rng: random.Random, year: int) -> tuple[str, tuple[str, ...]]:
    """A year, sometimes with its month; the answers accept the full date or the year."""
    if rng.random() < 0.5:
        return str(year), (str(year),)
    month = rng.choice(_MONTHS)
    return f"{month} {year}", (f"{month} {year}", str(year))


def _count(value: int) -> str:
    return f"{value:,}"


def _place(name: str, kind: str) -> tuple[str, ...]:
    """Answers for "the Vessmoor River" or "Tarn Island": the full name or the bare one."""
    return (f"{name} {kind}", name)


def _measure(value: int | float, unit: str) -> tuple[str, ...]:
    return (f"{value} {unit}", str(value))


def _surname(person: str) -> str:
    return person.split()[-1]


def encyclopedia_entry(rng: random.Random, cast: Cast) -> Passage:
    """An organisation of craftspeople, as a reference work would describe it."""
    kind = rng.choice(_ORGANISATIONS)
    org = f"the {cast.name} {kind}"
    plural, singular = rng.choice(_TRADES)
    founded, chaired, counted = _years(rng, 3)
    founded_text, founded_answers = _date(rng, founded)
    members = rng.randint(24, 960)
    sentences = [
        rng.choice((
            f"The {cast.name} {kind} is an association of {plural} based in {cast.town}, "
            f"known across the region for the strict standards it sets for their craft.",
            f"The {cast.name} {kind} is a professional body of {plural} with its seat in the "
            f"town of {cast.town}, where it also examines and licenses apprentices.",
        )),
        rng.choice((
            f"It was founded in {founded_text} by {cast.person}, who had trained as a "
            f"{singular} along the {cast.river} River.",
            f"{cast.person}, a {singular} who had worked for years along the {cast.river} "
            f"River, established it in {founded_text}.",
        )),
        rng.choice((
            f"By {counted} it counted {members} members.",
            f"Membership grew steadily and reached {members} by {counted}.",
        )),
        rng.choice((
            f"In {chaired}, {cast.other_person} became the first elected chair of the "
            f"{kind.lower()}.",
            f"{cast.other_person} was elected its first chair in {chaired}.",
        )),
    ]
    facts = [
        Fact((f"Who founded {org}?", f"Which person established {org}?",
              f"Who was the founder of {org}?"), (cast.person,)),
        Fact((f"In what year was {org} founded?", f"When was {org} established?",
              f"When did {cast.person} found {org}?"), founded_answers),
        Fact((f"In which town is {org} based?", f"Where does {org} have its seat?"),
             (cast.town,)),
        Fact((f"Along which river did {cast.person} train?",
              f"Where did {cast.person} train as a {singular}?"), _place(cast.river, "River")),
        Fact((f"How many members did {org} have in {counted}?",
              f"What was the membership of {org} in {counted}?"), (str(members),)),
        Fact((f"Who was the first elected chair of {org}?",
              f"Which person first led {org} as its elected chair?"), (cast.other_person,)),
        Fact((f"In which year was {cast.other_person} elected chair of {org}?",
              f"When did {cast.other_person} become chair of {org}?"), (str(chaired),)),
    ]
    if rng.random() < 0.6:
        sentences.append(f"The {kind.lower()} keeps its meeting hall on {cast.island} Island.")
        facts.append(Fact((f"On which island does {org} keep its meeting hall?",
                           f"Where is the meeting hall of {org}?"), _place(cast.island, "Island")))
    if rng.random() < 0.5:
        dues = rng.randint(2, 40)
        sentences.append(f"Members pay dues of {dues} silver crowns a year.")
        facts.append(Fact((f"How much do members of {org} pay each year?",
                           f"What are the yearly dues of {org}?"), _measure(dues, "silver crowns")))
    sentences.append(rng.choice((
        "Its archives are thought to be among the most complete of their kind.",
        "Apprentices train for seven years before they may sign their own work.",
        "Its yearly register of members has been printed without a break since the start.",
    )))
    return Passage(f"{cast.name} {kind}", tuple(sentences), tuple(facts))


def news_report(rng: random.Random, cast: Cast) -> Passage:
    """The opening of a landmark, as a local newspaper would report it."""
    kind = rng.choice(_LANDMARKS)
    landmark = f"the {cast.name} {kind}"
    month, (opened,) = rng.choice(_MONTHS), _years(rng, 1)
    height, workers, years = rng.randint(18, 140), rng.randint(120, 900), rng.randint(2, 9)
    sentences = [
        rng.choice((
            f"The {cast.name} {kind} was officially opened in {cast.town} in {month} {opened}, "
            f"after years of debate in the town council.",
            f"The people of {cast.town} gathered in {month} {opened} to watch the opening of "
            f"the new {cast.name} {kind}, which had been promised for a generation.",
        )),
        rng.choice((
            f"Mayor {cast.other_person} cut the ribbon before a crowd of several hundred, "
            f"and a brass band played until dusk.",
            f"{cast.other_person}, the town's mayor, performed the opening ceremony and "
            f"thanked everyone who had worked on the project.",
        )),
        rng.choice((
            f"Designed by the architect {cast.person}, the {kind.lower()} rises {height} metres "
            f"above the {cast.river} River.",
            f"The architect {cast.person} drew the plans, and the finished {kind.lower()} stands "
            f"{height} metres tall on the bank of the {cast.river} River.",
        )),
        rng.choice((
            f"Some {workers} workers spent {years} years on its construction.",
            f"Construction took {years} years and employed {workers} labourers.",
        )),
    ]
    facts = [
        Fact((f"Who designed {landmark}?", f"Which architect was responsible for {landmark}?",
              f"Who was the architect of {landmark}?"), (cast.person,)),
        Fact((f"When did {landmark} open?", f"In what year was {landmark} opened?"),
             (f"{month} {opened}", str(opened))),
        Fact((f"Who officially opened {landmark}?",
              f"Which mayor performed the opening of {landmark}?"), (cast.other_person,)),
        Fact((f"In which town was {landmark} opened?", f"Where is {landmark} located?"),
             (cast.town,)),
        Fact((f"How tall is {landmark}?", f"What is the height of {landmark}?"),
             _measure(height, "metres")),
        Fact((f"How many workers built {landmark}?",
              f"How many labourers worked on {landmark}?"), (str(workers),)),
        Fact((f"Beside which river does {landmark} stand?",
              f"Which river runs below {landmark}?"), _place(cast.river, "River")),
        Fact((f"How many years did it take to build {landmark}?",
              f"How long did the construction of {landmark} last?"), _measure(years, "years")),
    ]
    if rng.random() < 0.5:
        cost = rng.randint(3, 90) * 1000
        sentences.append(rng.choice((
            f"The final cost came to {_count(cost)} crowns, well above the original estimate.",
            f"Its builders reported a total cost of {_count(cost)} crowns.",
        )))
        facts.append(Fact((f"How much did {landmark} cost?",
                           f"What was the cost of building {landmark}?"),
                          (f"{_count(cost)} crowns", _count(cost))))
    if rng.random() < 0.5:
        sentences.append(
            f"Officials expect the {kind.lower()} to draw visitors from across the region."
        )
    return Passage(f"{cast.name} {kind}", tuple(sentences), tuple(facts))


def museum_placard(rng: random.Random, cast: Cast) -> Passage:
    """A crafted object, as the label beside its display case describes it."""
    obj, plural = rng.choice(_OBJECTS)
    thing = f"the {cast.name} {obj}"
    material = rng.choice(_MATERIALS)
    made, donated, restored = _years(rng, 3)
    weight = rng.choice((rng.randint(2, 60), rng.randint(15, 95) / 10))
    copies = rng.randint(2, 14)
    sentences = [
        f"This case holds the {cast.name} {obj}, one of the most admired pieces in the "
        f"{cast.other_town} Museum.",
        rng.choice((
            f"It was made in {made} by {cast.person} in a small workshop in {cast.town}.",
            f"{cast.person} completed it in {made} at a workshop in {cast.town}.",
        )),
        rng.choice((
            f"Its {material} frame was brought from {cast.island} Island, and the finished "
            f"piece weighs {weight} kilograms.",
            f"It weighs {weight} kilograms; the {material} for its frame came from "
            f"{cast.island} Island.",
        )),
        f"{_surname(cast.person)} made only {copies} {plural} of this design before the "
        f"workshop closed.",
        rng.choice((
            f"It was donated to the museum by {cast.other_person} in {donated}.",
            f"{cast.other_person} gave it to the museum in {donated}.",
        )),
    ]
    facts = [
        Fact((f"Who made {thing}?", f"Which craftsperson built {thing}?",
              f"Who was the maker of {thing}?"), (cast.person,)),
        Fact((f"In what year was {thing} made?", f"When was {thing} completed?"), (str(made),)),
        Fact((f"In which town was {thing} made?", f"Where was {thing} crafted?"), (cast.town,)),
        Fact((f"From which island did the {material} for {thing} come?",
              f"Where was the {material} of {thing} brought from?"),
             _place(cast.island, "Island")),
        Fact((f"How much does {thing} weigh?", f"What is the weight of {thing}?"),
             _measure(weight, "kilograms")),
        Fact((f"How many {plural} of this design did {cast.person} make?",
              f"How many {plural} like {thing} did {cast.person} build?"), (str(copies),)),
        Fact((f"Who donated {thing} to the museum?", f"Which person gave {thing} to the museum?"),
             (cast.other_person,)),
        Fact((f"In which year was {thing} donated to the museum?",
              f"When did {thing} enter the museum?"), (str(donated),)),
        Fact((f"In which museum is {thing} displayed?", f"Where can {thing} be seen today?"),
             _place(cast.other_town, "Museum")),
    ]
    if rng.random() < 0.5:
        sentences.append(f"It was last restored in {restored}.")
        facts.append(Fact((f"When was {thing} last restored?",
                           f"In what year was {thing} last restored?"), (str(restored),)))
    if rng.random() < 0.4:
        sentences.append("Visitors are asked not to touch the glass case.")
    return Passage(f"{cast.name} {obj}", tuple(sentences), tuple(facts))


def travel_guide(rng: random.Random, cast: Cast) -> Passage:
    """A town, as a travel guide would introduce it."""
    festival = f"the {cast.name} Festival"
    population = rng.randint(8, 400) * 50
    (founded,) = _years(rng, 1)
    founded_text, founded_answers = _date(rng, founded)
    month, minutes = rng.choice(_MONTHS), rng.randint(15, 95)
    sentences = [
        rng.choice((
            f"{cast.town} is a quiet market town on the {cast.river} River, home to about "
            f"{_count(population)} people.",
            f"Set on the banks of the {cast.river} River, {cast.town} has a population of "
            f"roughly {_count(population)}.",
        )),
        rng.choice((
            f"The town was founded in {founded_text} by {cast.person}, whose statue still "
            f"stands in the square.",
            f"According to local records, {cast.person} founded the settlement in "
            f"{founded_text}.",
        )),
        rng.choice((
            f"Each {month}, visitors crowd the streets for the {cast.name} Festival, first "
            f"organised by {cast.other_person}.",
            f"The highlight of the year is the {cast.name} Festival in {month}, which "
            f"{cast.other_person} started.",
        )),
        rng.choice((
            f"A ferry leaves the harbour every morning for {cast.island} Island, a crossing of "
            f"{minutes} minutes.",
            f"From the harbour, a ferry ride of {minutes} minutes takes you to {cast.island} "
            f"Island.",
        )),
    ]
    facts = [
        Fact((f"On which river does {cast.town} lie?", f"Which river flows past {cast.town}?"),
             _place(cast.river, "River")),
        Fact((f"How many people live in {cast.town}?", f"What is the population of {cast.town}?"),
             (_count(population),)),
        Fact((f"In what year was {cast.town} founded?", f"When was {cast.town} founded?"),
             founded_answers),
        Fact((f"Who founded {cast.town}?", f"Which settler established the town of {cast.town}?"),
             (cast.person,)),
        Fact((f"In which month is {festival} held?", f"When does {cast.town} hold {festival}?"),
             (month,)),
        Fact((f"Who started {festival}?", f"Which person first organised {festival}?"),
             (cast.other_person,)),
        Fact((f"Which island can be reached by ferry from {cast.town}?",
              f"Where does the morning ferry from {cast.town} go?"),
             _place(cast.island, "Island")),
        Fact((f"How long is the ferry crossing from {cast.town} to {cast.island} Island?",
              f"How many minutes does the ferry from {cast.town} take?"),
             _measure(minutes, "minutes")),
    ]
    sentences.append(rng.choice((
        "Travellers should try the smoked eel sold near the old bridge.",
        "Rooms fill quickly during the festival, so book early.",
        "The covered market by the quay is at its busiest on Saturday mornings.",
    )))
    if rng.random() < 0.4:
        sentences.append(f"The road north leads on to {cast.other_town}, a day's walk away.")
        facts.append(Fact((f"Which town lies a day's walk north of {cast.town}?",
                           f"Where does the road north from {cast.town} lead?"),
                          (cast.other_town,)))
    return Passage(cast.town, tuple(sentences), tuple(facts))


def diary_entry(rng: random.Random, cast: Cast) -> Passage:
    """A visit to an inventor's workshop, as a diary or a letter records it."""
    machine = rng.choice(_MACHINES)
    invention = f"the {cast.name} {machine}"
    inventor = _surname(cast.person)
    (visited,) = _years(rng, 1)
    month = rng.choice(_MONTHS)
    perfecting, operators, price = rng.randint(3, 20), rng.randint(2, 9), rng.randint(40, 900)
    letter = rng.random() < 0.5
    sentences = [
        f"{rng.randint(1, 28)} {month} {visited}. " + (
            f"At last I have visited {cast.person} in {cast.town}, as I promised you I would."
            if letter
            else f"Today I travelled to {cast.town} to see the workshop of {cast.person}."
        ),
        f"{inventor} showed me the {cast.name} {machine}, which took {perfecting} years to "
        f"perfect.",
        rng.choice((
            f"It needs only {operators} people to run it, yet does the work of a whole street.",
            f"To my surprise, {operators} people are enough to run it, and the noise is far "
            f"less than I had feared.",
        )),
        f"{inventor} asks {price} crowns for each one, which I think a fair price.",
        rng.choice((
            f"Tomorrow I take the boat down the {cast.river} River to {cast.other_town}.",
            f"I leave for {cast.other_town} tomorrow, by boat down the {cast.river} River.",
        )),
    ]
    facts = [
        Fact((f"Who built {invention}?", f"Who invented {invention}?",
              f"Which inventor made {invention}?"), (cast.person,)),
        Fact((f"In which town is the workshop of {cast.person}?",
              f"Where did {cast.other_person} visit {cast.person}?"), (cast.town,)),
        Fact((f"In what year did {cast.other_person} visit {cast.person}?",
              f"When did {cast.other_person} see {invention}?"),
             (str(visited), f"{month} {visited}")),
        Fact((f"How many years did it take to perfect {invention}?",
              f"How long did {cast.person} spend perfecting {invention}?"),
             _measure(perfecting, "years")),
        Fact((f"How many people are needed to run {invention}?",
              f"How many operators does {invention} need?"), (str(operators),)),
        Fact((f"What price does {cast.person} ask for {invention}?",
              f"How much does {invention} cost?"), _measure(price, "crowns")),
        Fact((f"Where did {cast.other_person} go after visiting {cast.person}?",
              f"Which town did {cast.other_person} travel to after seeing {invention}?"),
             (cast.other_town,)),
        Fact((f"Down which river did {cast.other_person} travel to {cast.other_town}?",
              f"Which river leads from {cast.town} to {cast.other_town}?"),
             _place(cast.river, "River")),
    ]
    if rng.random() < 0.5:
        sentences.append("I shall write again when I have more news." if letter
                         else "I slept badly, thinking of the machine.")
    title = f"Letter from {cast.other_person}" if letter else f"Diary of {cast.other_person}"
    # The writer is named only in the title, as a signature would name them.
    return Passage(title, tuple(sentences), tuple(facts))


PASSAGE_STYLES: tuple[Callable[[random.Random, Cast], Passage], ...] = (
    encyclopedia_entry,
    news_report,
    museum_placard,
    travel_guide,
    diary_entry,
)


# ---------------------------------------------------------------------------------------------
# The synthetic dataset
# ---------------------------------------------------------------------------------------------


def make_synthetic_dataset(
    num_passages: int = 320, seed: int = 0, validation_fraction: float = 0.25
) -> datasets.DatasetDict:
    """Passages about invented facts, with 4 to 6 closed-book questions each.

    Every passage draws its names from its own :class:`Cast`, and all casts are drawn from
    one name forge that never repeats a word, before any passage is written. The train casts
    are drawn first, the validation casts after, so the two splits share no invented name.
    Styles rotate through :data:`PASSAGE_STYLES`.

    Args:
        num_passages: passages in both splits together.
        seed: the only source of randomness; the same arguments give the same datasets.
        validation_fraction: share of passages in the validation split (rounded).

    Returns:
        A ``DatasetDict`` with ``"train"`` and ``"validation"`` splits with :data:`COLUMNS`.

    Raises:
        ValueError: if ``num_passages`` is below 1 or ``validation_fraction`` outside [0, 1].
    """
    if num_passages < 1:
        raise ValueError(f"num_passages must be at least 1, got {num_passages}")
    if not 0 <= validation_fraction <= 1:
        raise ValueError(
            f"validation_fraction must lie in [0, 1], got {validation_fraction}; "
            "0.25 holds out a quarter of the passages"
        )
    rng = random.Random(seed)
    num_validation = round(num_passages * validation_fraction)
    forge = _NameForge(rng)
    # Partition the names before writing a word of prose: disjoint by construction.
    casts = {
        "train": [_draw_cast(forge) for _ in range(num_passages - num_validation)],
        "validation": [_draw_cast(forge) for _ in range(num_validation)],
    }
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    index = 0
    for split in SPLITS:
        for cast in casts[split]:
            style = PASSAGE_STYLES[index % len(PASSAGE_STYLES)]
            rows[split].append(_synthetic_row(rng, f"synth-{index:04d}", style(rng, cast)))
            index += 1
    return datasets.DatasetDict({split: _to_dataset(rows[split]) for split in SPLITS})


def _synthetic_row(rng: random.Random, row_id: str, passage: Passage) -> dict[str, Any]:
    facts = rng.sample(passage.facts, rng.randint(4, 6))
    return {
        "id": row_id,
        "title": passage.title,
        "context": passage.context,
        "questions": [rng.choice(fact.questions) for fact in facts],
        "answers": [list(fact.answers) for fact in facts],
    }


def _to_dataset(rows: list[dict[str, Any]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {column: [row[column] for row in rows] for column in COLUMNS}, features=FEATURES
    )


# ---------------------------------------------------------------------------------------------
# SQuAD v1.1
# ---------------------------------------------------------------------------------------------

_SQUAD_HINT = (
    "expected SQuAD v1.1 format: {\"data\": [{\"title\": str, \"paragraphs\": [{\"context\": "
    "str, \"qas\": [{\"question\": str, \"answers\": [{\"text\": str}, ...]}]}]}]}"
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


def _squad_question(
    qa: Any, title: str, context: str, where: str, source: Path
) -> dict[str, Any]:
    qa = _as_object(qa, where, source)
    question = _field(qa, "question", str, where, source)
    if not question.strip():
        raise DatasetError(
            f"bad SQuAD file {source}: {where}.question is empty or whitespace-only, "
            f"got {question!r}"
        )
    answers = _field(qa, "answers", list, where, source)
    if not answers:
        raise DatasetError(
            f"bad SQuAD file {source}: {where}.answers is empty, got []; every question needs "
            "at least one gold answer (SQuAD v2 unanswerable questions are not supported)"
        )
    texts = []
    for n, answer in enumerate(answers):
        answer_where = f"{where}.answers[{n}]"
        text = _field(_as_object(answer, answer_where, source), "text", str, answer_where,
                      source)
        if not text.strip():
            raise DatasetError(
                f"bad SQuAD file {source}: {answer_where}.text is empty or whitespace-only, "
                f"got {text!r}; every gold answer needs text"
            )
        texts.append(text)
    return {"title": title, "context": context, "question": question,
            "answers": {"text": texts}}


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
            f"bad SQuAD file {source}: {where} has no field {key!r} (it has "
            f"{sorted(record)}); {_SQUAD_HINT}"
        )
    value = record[key]
    if not isinstance(value, kind):
        raise DatasetError(
            f"bad SQuAD file {source}: {where}.{key} must be a {_JSON_TYPES[kind]}, got "
            f"{_json_type(value)} {_preview(value)}"
        )
    return value


_JSON_TYPES = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
               float: "number", type(None): "null"}


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
        offline = [var for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
                   if os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")]
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
                "id": _squad_id(*key), "title": key[0], "context": key[1],
                "questions": [], "answers": [],
            }
        passages[key]["questions"].append(row["question"].strip())
        passages[key]["answers"].append(answers)
    return _to_dataset(list(passages.values()))


def _squad_id(title: str, context: str) -> str:
    return "squad-" + hashlib.sha256(f"{title}\n{context}".encode()).hexdigest()[:12]


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
