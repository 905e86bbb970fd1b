"""The toy worlds' problem kinds: two-step arithmetic word problems with their worked steps, drawn from a
``random.Random``. Each world (``trainer.toy.worlds``) picks its kinds, their wording and how the solution ends.

A kind's draws come in a fixed order (name, item, then its numbers): the shipped fixtures' splits are recorded
from it, so a change of order, bound or wording changes every row after the first of that kind.
"""

from __future__ import annotations

import random
from typing import NamedTuple

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gina", "Hugo", "Ivy", "Jack", "Kim", "Leo", "Mia", "Ned"]
ITEMS = ["apple", "book", "coin", "pen", "shell", "card", "stone", "cookie", "marble", "stamp"]


class Problem(NamedTuple):
    question: str
    steps: list[str]  # "a op b = r." each, the last one's r is ``result``
    result: int  # what the steps arrive at: ``answer`` unless they take a wrong path
    answer: int


def groups(rng: random.Random, wrong: bool = False, away: bool = False) -> Problem:
    """``a`` bags of ``b``; then ``c`` more found, or (``away``, world boxing's wording) given away. The wrong
    path adds the bags where it should multiply."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a * b - 1) if away else rng.randint(1, 9)
    event, change = (f"gives away {c} {item}s", -c) if away else (f"finds {c} more {item}s", c)
    question = f"{name} has {a} bags with {b} {item}s in each bag. {name} {event}. " \
               f"How many {item}s does {name} have now?"  # fmt: skip
    first = a + b if wrong else a * b
    steps = [f"{a} {'+' if wrong else '*'} {b} = {first}.", f"{first} {'-' if away else '+'} {c} = {first + change}."]
    return Problem(question, steps, first + change, a * b + change)


def shopping(rng: random.Random, wrong: bool = False) -> Problem:
    """``a`` then ``b`` items at ``c`` coins each. The wrong path adds the price where it should multiply."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 9)
    question = f"{name} buys {a} {item}s and then {b} more {item}s. Each {item} costs {c} coins. " \
               f"How many coins does {name} pay?"  # fmt: skip
    total = a + b + c if wrong else (a + b) * c
    steps = [f"{a} + {b} = {a + b}.", f"{a + b} {'+' if wrong else '*'} {c} = {total}."]
    return Problem(question, steps, total, (a + b) * c)


def sharing(rng: random.Random, wrong: bool = False) -> Problem:
    """``friends * each`` items shared among ``friends``, then ``extra`` more each. It has no wrong path."""
    assert not wrong, "sharing has no wrong path (its WRONG_SHARE is 0)"
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, extra = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    question = f"{name} has {friends * each} {item}s and shares them equally among {friends} friends. " \
               f"Then each friend finds {extra} more {item}s. How many {item}s does each friend have?"  # fmt: skip
    steps = [f"{friends * each} / {friends} = {each}.", f"{each} + {extra} = {each + extra}."]
    return Problem(question, steps, each + extra, each + extra)


def difference(rng: random.Random) -> Problem:
    """How many more ``a`` than ``b`` (world absent's only kind), solved by subtraction. Two distinct names."""
    first, second, item = *rng.sample(NAMES, 2), rng.choice(ITEMS)
    b, more = rng.randint(2, 30), rng.randint(1, 9)
    a = b + more
    question = f"{first} has {a} {item}s and {second} has {b} {item}s. " \
               f"How many more {item}s does {first} have than {second}?"  # fmt: skip
    return Problem(question, [f"{a} - {b} = {more}."], more, more)
