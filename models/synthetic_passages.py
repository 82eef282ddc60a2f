"""Synthetic passages about invented people, places, objects and organisations (SEAL §4.2's
contexts, offline): no pretrained model can answer their questions before it is adapted.

A name forge invents words and never repeats one; each passage draws its names from a
:class:`Cast` and is written in one of :data:`PASSAGE_STYLES`, which states more facts than a row
asks about. :func:`synthetic_rows` draws every cast before writing any prose, train before
validation, so the two splits share no invented name. ``models.knowledge_data`` turns the rows
into datasets.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


# ---------------------------------------------------------------------------------------------
# Invented names
# ---------------------------------------------------------------------------------------------

_ONSETS = (
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "sh",
    "st",
    "t",
    "th",
    "tr",
    "v",
    "w",
    "z",
    "qu",
    "cl",
    "fl",
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
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_TRADES = (
    ("clockmakers", "clockmaker"),
    ("cartographers", "cartographer"),
    ("glassblowers", "glassblower"),
    ("bookbinders", "bookbinder"),
    ("lens grinders", "lens grinder"),
    ("bell founders", "bell founder"),
    ("rope makers", "rope maker"),
    ("instrument makers", "instrument maker"),
)
_ORGANISATIONS = ("Guild", "Society", "Company", "Fellowship", "Academy")
_LANDMARKS = ("Bridge", "Clock Tower", "Observatory", "Lighthouse", "Library")
_OBJECTS = (
    ("lantern", "lanterns"),
    ("compass", "compasses"),
    ("astrolabe", "astrolabes"),
    ("music box", "music boxes"),
    ("chronometer", "chronometers"),
    ("telescope", "telescopes"),
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
        rng.choice(
            (
                f"The {cast.name} {kind} is an association of {plural} based in {cast.town}, "
                f"known across the region for the strict standards it sets for their craft.",
                f"The {cast.name} {kind} is a professional body of {plural} with its seat in the "
                f"town of {cast.town}, where it also examines and licenses apprentices.",
            )
        ),
        rng.choice(
            (
                f"It was founded in {founded_text} by {cast.person}, who had trained as a "
                f"{singular} along the {cast.river} River.",
                f"{cast.person}, a {singular} who had worked for years along the {cast.river} "
                f"River, established it in {founded_text}.",
            )
        ),
        rng.choice(
            (
                f"By {counted} it counted {members} members.",
                f"Membership grew steadily and reached {members} by {counted}.",
            )
        ),
        rng.choice(
            (
                f"In {chaired}, {cast.other_person} became the first elected chair of the {kind.lower()}.",
                f"{cast.other_person} was elected its first chair in {chaired}.",
            )
        ),
    ]
    facts = [
        Fact(
            (f"Who founded {org}?", f"Which person established {org}?", f"Who was the founder of {org}?"),
            (cast.person,),
        ),
        Fact(
            (
                f"In what year was {org} founded?",
                f"When was {org} established?",
                f"When did {cast.person} found {org}?",
            ),
            founded_answers,
        ),
        Fact((f"In which town is {org} based?", f"Where does {org} have its seat?"), (cast.town,)),
        Fact(
            (f"Along which river did {cast.person} train?", f"Where did {cast.person} train as a {singular}?"),
            _place(cast.river, "River"),
        ),
        Fact(
            (f"How many members did {org} have in {counted}?", f"What was the membership of {org} in {counted}?"),
            (str(members),),
        ),
        Fact(
            (f"Who was the first elected chair of {org}?", f"Which person first led {org} as its elected chair?"),
            (cast.other_person,),
        ),
        Fact(
            (
                f"In which year was {cast.other_person} elected chair of {org}?",
                f"When did {cast.other_person} become chair of {org}?",
            ),
            (str(chaired),),
        ),
    ]
    if rng.random() < 0.6:
        sentences.append(f"The {kind.lower()} keeps its meeting hall on {cast.island} Island.")
        facts.append(
            Fact(
                (f"On which island does {org} keep its meeting hall?", f"Where is the meeting hall of {org}?"),
                _place(cast.island, "Island"),
            )
        )
    if rng.random() < 0.5:
        dues = rng.randint(2, 40)
        sentences.append(f"Members pay dues of {dues} silver crowns a year.")
        facts.append(
            Fact(
                (f"How much do members of {org} pay each year?", f"What are the yearly dues of {org}?"),
                _measure(dues, "silver crowns"),
            )
        )
    sentences.append(
        rng.choice(
            (
                "Its archives are thought to be among the most complete of their kind.",
                "Apprentices train for seven years before they may sign their own work.",
                "Its yearly register of members has been printed without a break since the start.",
            )
        )
    )
    return Passage(f"{cast.name} {kind}", tuple(sentences), tuple(facts))


def news_report(rng: random.Random, cast: Cast) -> Passage:
    """The opening of a landmark, as a local newspaper would report it."""
    kind = rng.choice(_LANDMARKS)
    landmark = f"the {cast.name} {kind}"
    month, (opened,) = rng.choice(_MONTHS), _years(rng, 1)
    height, workers, years = rng.randint(18, 140), rng.randint(120, 900), rng.randint(2, 9)
    sentences = [
        rng.choice(
            (
                f"The {cast.name} {kind} was officially opened in {cast.town} in {month} {opened}, "
                f"after years of debate in the town council.",
                f"The people of {cast.town} gathered in {month} {opened} to watch the opening of "
                f"the new {cast.name} {kind}, which had been promised for a generation.",
            )
        ),
        rng.choice(
            (
                f"Mayor {cast.other_person} cut the ribbon before a crowd of several hundred, "
                f"and a brass band played until dusk.",
                f"{cast.other_person}, the town's mayor, performed the opening ceremony and "
                f"thanked everyone who had worked on the project.",
            )
        ),
        rng.choice(
            (
                f"Designed by the architect {cast.person}, the {kind.lower()} rises {height} metres "
                f"above the {cast.river} River.",
                f"The architect {cast.person} drew the plans, and the finished {kind.lower()} stands "
                f"{height} metres tall on the bank of the {cast.river} River.",
            )
        ),
        rng.choice(
            (
                f"Some {workers} workers spent {years} years on its construction.",
                f"Construction took {years} years and employed {workers} labourers.",
            )
        ),
    ]
    facts = [
        Fact(
            (
                f"Who designed {landmark}?",
                f"Which architect was responsible for {landmark}?",
                f"Who was the architect of {landmark}?",
            ),
            (cast.person,),
        ),
        Fact(
            (f"When did {landmark} open?", f"In what year was {landmark} opened?"), (f"{month} {opened}", str(opened))
        ),
        Fact(
            (f"Who officially opened {landmark}?", f"Which mayor performed the opening of {landmark}?"),
            (cast.other_person,),
        ),
        Fact((f"In which town was {landmark} opened?", f"Where is {landmark} located?"), (cast.town,)),
        Fact((f"How tall is {landmark}?", f"What is the height of {landmark}?"), _measure(height, "metres")),
        Fact((f"How many workers built {landmark}?", f"How many labourers worked on {landmark}?"), (str(workers),)),
        Fact(
            (f"Beside which river does {landmark} stand?", f"Which river runs below {landmark}?"),
            _place(cast.river, "River"),
        ),
        Fact(
            (f"How many years did it take to build {landmark}?", f"How long did the construction of {landmark} last?"),
            _measure(years, "years"),
        ),
    ]
    if rng.random() < 0.5:
        cost = rng.randint(3, 90) * 1000
        sentences.append(
            rng.choice(
                (
                    f"The final cost came to {_count(cost)} crowns, well above the original estimate.",
                    f"Its builders reported a total cost of {_count(cost)} crowns.",
                )
            )
        )
        facts.append(
            Fact(
                (f"How much did {landmark} cost?", f"What was the cost of building {landmark}?"),
                (f"{_count(cost)} crowns", _count(cost)),
            )
        )
    if rng.random() < 0.5:
        sentences.append(f"Officials expect the {kind.lower()} to draw visitors from across the region.")
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
        f"This case holds the {cast.name} {obj}, one of the most admired pieces in the {cast.other_town} Museum.",
        rng.choice(
            (
                f"It was made in {made} by {cast.person} in a small workshop in {cast.town}.",
                f"{cast.person} completed it in {made} at a workshop in {cast.town}.",
            )
        ),
        rng.choice(
            (
                f"Its {material} frame was brought from {cast.island} Island, and the finished "
                f"piece weighs {weight} kilograms.",
                f"It weighs {weight} kilograms; the {material} for its frame came from {cast.island} Island.",
            )
        ),
        f"{_surname(cast.person)} made only {copies} {plural} of this design before the workshop closed.",
        rng.choice(
            (
                f"It was donated to the museum by {cast.other_person} in {donated}.",
                f"{cast.other_person} gave it to the museum in {donated}.",
            )
        ),
    ]
    facts = [
        Fact(
            (f"Who made {thing}?", f"Which craftsperson built {thing}?", f"Who was the maker of {thing}?"),
            (cast.person,),
        ),
        Fact((f"In what year was {thing} made?", f"When was {thing} completed?"), (str(made),)),
        Fact((f"In which town was {thing} made?", f"Where was {thing} crafted?"), (cast.town,)),
        Fact(
            (
                f"From which island did the {material} for {thing} come?",
                f"Where was the {material} of {thing} brought from?",
            ),
            _place(cast.island, "Island"),
        ),
        Fact((f"How much does {thing} weigh?", f"What is the weight of {thing}?"), _measure(weight, "kilograms")),
        Fact(
            (
                f"How many {plural} of this design did {cast.person} make?",
                f"How many {plural} like {thing} did {cast.person} build?",
            ),
            (str(copies),),
        ),
        Fact(
            (f"Who donated {thing} to the museum?", f"Which person gave {thing} to the museum?"), (cast.other_person,)
        ),
        Fact(
            (f"In which year was {thing} donated to the museum?", f"When did {thing} enter the museum?"),
            (str(donated),),
        ),
        Fact(
            (f"In which museum is {thing} displayed?", f"Where can {thing} be seen today?"),
            _place(cast.other_town, "Museum"),
        ),
    ]
    if rng.random() < 0.5:
        sentences.append(f"It was last restored in {restored}.")
        facts.append(
            Fact((f"When was {thing} last restored?", f"In what year was {thing} last restored?"), (str(restored),))
        )
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
        rng.choice(
            (
                f"{cast.town} is a quiet market town on the {cast.river} River, home to about "
                f"{_count(population)} people.",
                f"Set on the banks of the {cast.river} River, {cast.town} has a population of "
                f"roughly {_count(population)}.",
            )
        ),
        rng.choice(
            (
                f"The town was founded in {founded_text} by {cast.person}, whose statue still stands in the square.",
                f"According to local records, {cast.person} founded the settlement in {founded_text}.",
            )
        ),
        rng.choice(
            (
                f"Each {month}, visitors crowd the streets for the {cast.name} Festival, first "
                f"organised by {cast.other_person}.",
                f"The highlight of the year is the {cast.name} Festival in {month}, which {cast.other_person} started.",
            )
        ),
        rng.choice(
            (
                f"A ferry leaves the harbour every morning for {cast.island} Island, a crossing of {minutes} minutes.",
                f"From the harbour, a ferry ride of {minutes} minutes takes you to {cast.island} Island.",
            )
        ),
    ]
    facts = [
        Fact(
            (f"On which river does {cast.town} lie?", f"Which river flows past {cast.town}?"),
            _place(cast.river, "River"),
        ),
        Fact(
            (f"How many people live in {cast.town}?", f"What is the population of {cast.town}?"), (_count(population),)
        ),
        Fact((f"In what year was {cast.town} founded?", f"When was {cast.town} founded?"), founded_answers),
        Fact((f"Who founded {cast.town}?", f"Which settler established the town of {cast.town}?"), (cast.person,)),
        Fact((f"In which month is {festival} held?", f"When does {cast.town} hold {festival}?"), (month,)),
        Fact((f"Who started {festival}?", f"Which person first organised {festival}?"), (cast.other_person,)),
        Fact(
            (
                f"Which island can be reached by ferry from {cast.town}?",
                f"Where does the morning ferry from {cast.town} go?",
            ),
            _place(cast.island, "Island"),
        ),
        Fact(
            (
                f"How long is the ferry crossing from {cast.town} to {cast.island} Island?",
                f"How many minutes does the ferry from {cast.town} take?",
            ),
            _measure(minutes, "minutes"),
        ),
    ]
    sentences.append(
        rng.choice(
            (
                "Travellers should try the smoked eel sold near the old bridge.",
                "Rooms fill quickly during the festival, so book early.",
                "The covered market by the quay is at its busiest on Saturday mornings.",
            )
        )
    )
    if rng.random() < 0.4:
        sentences.append(f"The road north leads on to {cast.other_town}, a day's walk away.")
        facts.append(
            Fact(
                (
                    f"Which town lies a day's walk north of {cast.town}?",
                    f"Where does the road north from {cast.town} lead?",
                ),
                (cast.other_town,),
            )
        )
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
        f"{rng.randint(1, 28)} {month} {visited}. "
        + (
            f"At last I have visited {cast.person} in {cast.town}, as I promised you I would."
            if letter
            else f"Today I travelled to {cast.town} to see the workshop of {cast.person}."
        ),
        f"{inventor} showed me the {cast.name} {machine}, which took {perfecting} years to perfect.",
        rng.choice(
            (
                f"It needs only {operators} people to run it, yet does the work of a whole street.",
                f"To my surprise, {operators} people are enough to run it, and the noise is far "
                f"less than I had feared.",
            )
        ),
        f"{inventor} asks {price} crowns for each one, which I think a fair price.",
        rng.choice(
            (
                f"Tomorrow I take the boat down the {cast.river} River to {cast.other_town}.",
                f"I leave for {cast.other_town} tomorrow, by boat down the {cast.river} River.",
            )
        ),
    ]
    facts = [
        Fact(
            (f"Who built {invention}?", f"Who invented {invention}?", f"Which inventor made {invention}?"),
            (cast.person,),
        ),
        Fact(
            (f"In which town is the workshop of {cast.person}?", f"Where did {cast.other_person} visit {cast.person}?"),
            (cast.town,),
        ),
        Fact(
            (
                f"In what year did {cast.other_person} visit {cast.person}?",
                f"When did {cast.other_person} see {invention}?",
            ),
            (str(visited), f"{month} {visited}"),
        ),
        Fact(
            (
                f"How many years did it take to perfect {invention}?",
                f"How long did {cast.person} spend perfecting {invention}?",
            ),
            _measure(perfecting, "years"),
        ),
        Fact(
            (f"How many people are needed to run {invention}?", f"How many operators does {invention} need?"),
            (str(operators),),
        ),
        Fact(
            (f"What price does {cast.person} ask for {invention}?", f"How much does {invention} cost?"),
            _measure(price, "crowns"),
        ),
        Fact(
            (
                f"Where did {cast.other_person} go after visiting {cast.person}?",
                f"Which town did {cast.other_person} travel to after seeing {invention}?",
            ),
            (cast.other_town,),
        ),
        Fact(
            (
                f"Down which river did {cast.other_person} travel to {cast.other_town}?",
                f"Which river leads from {cast.town} to {cast.other_town}?",
            ),
            _place(cast.river, "River"),
        ),
    ]
    if rng.random() < 0.5:
        sentences.append(
            "I shall write again when I have more news." if letter else "I slept badly, thinking of the machine."
        )
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
# The synthetic rows
# ---------------------------------------------------------------------------------------------


def synthetic_rows(
    num_passages: int = 320, seed: int = 0, validation_fraction: float = 0.25
) -> dict[str, list[dict[str, Any]]]:
    """Passages about invented facts, with 4 to 6 closed-book questions each.

    Every passage draws its names from its own :class:`Cast`, and all casts are drawn from
    one name forge that never repeats a word, before any passage is written. The train casts
    are drawn first, the validation casts after, so the two splits share no invented name.
    Styles rotate through :data:`PASSAGE_STYLES`.

    Args:
        num_passages: passages in both splits together.
        seed: the only source of randomness; the same arguments give the same rows.
        validation_fraction: share of passages in the validation split (rounded).

    Returns:
        ``{"train": rows, "validation": rows}``; a row is a dict of ``id``, ``title``,
        ``context``, ``questions`` and ``answers`` (per question, its gold answers).

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
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in casts}
    index = 0
    for split, split_casts in casts.items():
        for cast in split_casts:
            style = PASSAGE_STYLES[index % len(PASSAGE_STYLES)]
            rows[split].append(_synthetic_row(rng, f"synth-{index:04d}", style(rng, cast)))
            index += 1
    return rows


def _synthetic_row(rng: random.Random, row_id: str, passage: Passage) -> dict[str, Any]:
    facts = rng.sample(passage.facts, rng.randint(4, 6))
    return {
        "id": row_id,
        "title": passage.title,
        "context": passage.context,
        "questions": [rng.choice(fact.questions) for fact in facts],
        "answers": [list(fact.answers) for fact in facts],
    }
