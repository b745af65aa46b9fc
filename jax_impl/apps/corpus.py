"""The demo's data, generated from a seed: a small world's pretraining corpus and a task.

The world has people, towns, things, numbers and dates. Its documents (diary entries, news
items, letters, shipping logs, calendar notes, counting drills) write dates two ways: in
words (``March 5, 2021`` or ``5 March 2021``) in prose, and as ISO dates (``2021-03-05``) in
diary headers and logs. No document ever writes the same date both ways, so a model
pretrained on the corpus knows both forms and every month, but has never seen one turned into
the other.

The task is that conversion: a sentence with a date in words, and the date as YYYY-MM-DD::

    Nora moved to Port Ellis on 5 March 2021.
    Date as YYYY-MM-DD: 2021-03-05

A completion is exactly right or wrong, so the metric is exact match. Everything here is a
pure function of its seed: ``corpus(seed=0)`` and ``task(...)`` return the same text on every
machine, which is how the shipped base model and task files are reproduced.
"""

from __future__ import annotations

import calendar
import datetime
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

MONTHS = list(calendar.month_name)[1:]  # January .. December
PEOPLE = (
    "Ada Alma Anton Bea Bruno Cora Dag Edda Elio Fern Gus Hana Ivo Iris Jule Kai Lena Lio "
    "Mara Milo Nora Odo Pia Quin Rhea Sami Tova Ugo Vera Wim Xena Yara Zeno"
).split()
TOWNS = (
    "Ashford|Brightwater|Cold Harbor|Dunmore|Eastfield|Fernhill|Glenrock|Highgate|Ironbridge|"
    "Kestrel Bay|Lowmoor|Millbrook|Northwick|Oakvale|Port Ellis|Queensmere|Redcliff|"
    "Stonehaven|Thornbury|Westmarch"
).split("|")
THINGS = "apples books candles chairs jars lamps maps pears plates ropes shoes tiles".split()
PLACES = "market library harbor school bakery museum station garden mill theater".split()
WEATHER = "cold warm windy rainy bright quiet grey mild".split()
EVENTS = (
    "opened a new hall|held a fair|repaired the old bridge|planted a row of trees|"
    "hosted a concert|closed for repairs|welcomed a new teacher|painted the front gate"
).split("|")
MOVES = ("moved to|arrived in|left for|returned to|opened a shop in|started work in|visited").split(
    "|"
)

T = TypeVar("T")
FIRST_YEAR, LAST_YEAR = 1950, 2049
QUESTION = "Date as YYYY-MM-DD:"


def _date(rng: random.Random) -> datetime.date:
    start = datetime.date(FIRST_YEAR, 1, 1).toordinal()
    end = datetime.date(LAST_YEAR, 12, 31).toordinal()
    return datetime.date.fromordinal(rng.randint(start, end))


def in_words(d: datetime.date, style: int) -> str:
    """``March 5, 2021`` (style 0) or ``5 March 2021`` (style 1)."""
    month = MONTHS[d.month - 1]
    return f"{month} {d.day}, {d.year}" if style == 0 else f"{d.day} {month} {d.year}"


def _pick(rng: random.Random, xs: Sequence[T]) -> T:
    return xs[rng.randrange(len(xs))]


# --- documents of the corpus ----------------------------------------------------------------


def _diary(rng: random.Random) -> str:
    who, town = _pick(rng, PEOPLE), _pick(rng, TOWNS)
    n = rng.randint(2, 19)
    day = _date(rng).isoformat()
    lines = [
        day,
        f"Today I walked to the {_pick(rng, PLACES)} in {town}.",
        f"I bought {n} {_pick(rng, THINGS)} and met {who} on the way home.",
        f"The day was {_pick(rng, WEATHER)}.",
    ]
    lines = lines[: rng.randint(2, 4)]
    if rng.random() < 0.5:
        lines.append(f"I will remember {day}.")
    return "\n".join(lines)


def _news(rng: random.Random) -> str:
    town, who = _pick(rng, TOWNS), _pick(rng, PEOPLE)
    when = in_words(_date(rng), rng.randrange(2))
    text = (
        f"On {when}, the {_pick(rng, PLACES)} in {town} {_pick(rng, EVENTS)}. "
        f"About {rng.randint(12, 480)} people came, and {who} spoke first."
    )
    if rng.random() < 0.5:
        text += f" People in {town} will remember {when}."
    return text


def _letter(rng: random.Random) -> str:
    a, b = rng.sample(PEOPLE, 2)
    town = _pick(rng, TOWNS)
    when = in_words(_date(rng), rng.randrange(2))
    since = f" I have been here since {when}." if rng.random() < 0.5 else ""
    return (
        f"Dear {b},\nI {_pick(rng, MOVES)} {town} on {when}.{since} "
        f"The weather is {_pick(rng, WEATHER)} and the {_pick(rng, PLACES)} is close by.\n"
        f"Yours, {a}"
    )


def _log(rng: random.Random) -> str:
    rows = []
    for _ in range(rng.randint(1, 3)):
        order, day, who = rng.randint(1000, 9999), _date(rng).isoformat(), _pick(rng, PEOPLE)
        rows.append(
            f"Order {order} shipped {day} to {who} in {_pick(rng, TOWNS)}: "
            f"{rng.randint(1, 60)} {_pick(rng, THINGS)}."
        )
        if rng.random() < 0.5:
            rows.append(f"{who} signed for order {order} on {day}.")
    return "\n".join(rows)


def _calendar(rng: random.Random) -> str:
    m = rng.randrange(12)
    days = calendar.monthrange(2001, m + 1)[1]
    nxt = MONTHS[(m + 1) % 12]
    return (
        f"{MONTHS[m]} is month {m + 1} of the year. {MONTHS[m]} has {days} days. "
        f"After {MONTHS[m]} comes {nxt}."
    )


def _move(rng: random.Random) -> str:
    """A task-style sentence: someone went somewhere on a date in words."""
    return _move_sentence(rng, _date(rng), rng.randrange(2))


def _move_sentence(rng: random.Random, d: datetime.date, style: int) -> str:
    return f"{_pick(rng, PEOPLE)} {_pick(rng, MOVES)} {_pick(rng, TOWNS)} on {in_words(d, style)}."


def _count(rng: random.Random) -> str:
    start, step = rng.randint(0, 90), rng.randint(1, 3)
    seq = ", ".join(str(start + i * step) for i in range(rng.randint(4, 8)))
    return f"{_pick(rng, PEOPLE)} counted: {seq}."


DOCUMENTS: tuple[Callable[[random.Random], str], ...] = (
    _diary,
    _news,
    _letter,
    _log,
    _calendar,
    _move,
    _count,
)


def corpus(n_docs: int, seed: int = 0) -> Iterator[str]:
    """``n_docs`` documents of the world, each a few lines; the same for the same seed."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        yield _pick(rng, DOCUMENTS)(rng)


# --- the task -------------------------------------------------------------------------------


def prompt(sentence: str) -> str:
    """The zero-shot (and fine-tuning) prompt for one sentence; the answer follows it."""
    return f"{sentence}\n{QUESTION}"


def few_shot_prompt(shots: list[dict[str, str]], sentence: str) -> str:
    """Solved examples, then the question (prompt engineering)."""
    solved = "".join(f"{prompt(s['sentence'])}{s['completion']}\n\n" for s in shots)
    return solved + prompt(sentence)


def task(
    n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()
) -> list[dict[str, str]]:
    """``n`` task examples ``{"prompt", "completion", "sentence"}`` (prompt/completion JSONL
    format; ``sentence`` is ignored by the trainer), none of whose dates is in ``exclude``."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    seen = set(exclude)
    while len(out) < n:
        d = _date(rng)
        if d.isoformat() in seen:
            continue
        seen.add(d.isoformat())
        sentence = _move_sentence(rng, d, rng.randrange(2))
        out.append(
            {"prompt": prompt(sentence), "completion": f" {d.isoformat()}", "sentence": sentence}
        )
    return out


def task_splits(
    n_train: int = 2000, n_heldout: int = 200, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and held-out examples; no held-out date appears in the train split."""
    held = task(n_heldout, seed=seed + 1)
    train = task(n_train, seed=seed + 2, exclude={e["completion"].strip() for e in held})
    return train, held


# --- a preference task ------------------------------------------------------------------------


def date_as_written(sentence: str) -> str:
    """The date of a task sentence as the sentence writes it, in words: ``"16 March 1950"``
    of ``"Odo arrived in Lowmoor on 16 March 1950."``."""
    return sentence.rsplit(" on ", 1)[1].rstrip(".")


def preference_pairs(examples: list[dict[str, str]]) -> list[dict[str, str]]:
    """The task as preference pairs ``{"prompt", "chosen", "rejected"}``: the ISO date is
    chosen, the date copied as the sentence writes it (the wrong format) is rejected."""
    return [
        {
            "prompt": e["prompt"],
            "chosen": e["completion"],
            "rejected": f" {date_as_written(e['sentence'])}",
        }
        for e in examples
    ]
