"""The word-problem templates of `gsm-lite`.

A template's `write(rng, person)` draws its numbers and returns `(question, lines, numbers)`: `lines` is a
list of `(text, value)`, one per operation, each text containing one `calc(a, op, b)`; the last value is
the answer; `numbers` (a tuple) is what identifies the problem apart from names and items.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                               "*": lambda a, b: a * b, "/": lambda a, b: a // b}

NAMES = {"he": ["Ben", "Leo", "Omar", "Sam", "Tom", "Raj", "Ivan", "Noah", "Luis", "Kenji"],
         "she": ["Ava", "Maya", "Zoe", "Lina", "Emma", "Nora", "Sara", "Mia", "Aiko", "Rosa"]}


@dataclass(frozen=True)
class Person:
    name: str
    he: str      # "he" / "she"
    his: str     # "his" / "her"


def draw_person(rng: random.Random) -> Person:
    he = rng.choice(["he", "she"])
    return Person(rng.choice(NAMES[he]), he, "his" if he == "he" else "her")


def calc(a: int, op: str, b: int) -> tuple[str, int]:
    """`"4 * 6 = <<4*6=24>>24"` and 24; division must be exact and results positive."""
    value = _OPS[op](a, b)
    if value <= 0 or (op == "/" and a % b):
        raise ValueError(f"template drew a bad step {a} {op} {b}")
    return f"{a} {op} {b} = <<{a}{op}{b}={value}>>{value}", value


def _step(before: str, a: int, op: str, b: int, after: str) -> tuple[str, int]:
    text, value = calc(a, op, b)
    return f"{before}{text}{after}", value


def _cap(word: str) -> str:
    return word[0].upper() + word[1:]


def boxes(rng: random.Random, p: Person) -> tuple[str, list[tuple[str, int]], tuple[int, ...]]:
    items = rng.choice(["pens", "apples", "cookies", "stickers", "eggs"])
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    c = rng.randint(1, min(30, a * b - 1))
    q = (f"{p.name} buys {a} boxes of {items}. Each box holds {b} {items}. {_cap(p.he)} gives away {c} {items}. "
         f"How many {items} does {p.name} have left?")
    s1 = _step(f"{p.name} buys ", a, "*", b, f" {items}.")
    return q, [s1, _step(f"{_cap(p.he)} has ", s1[1], "-", c, f" {items} left.")], (a, b, c)


def shopping(rng: random.Random, p: Person) -> tuple[str, list[tuple[str, int]], tuple[int, ...]]:
    items, thing = rng.choice(["pencils", "apples", "cups", "socks"]), rng.choice(["bag", "book", "hat", "lamp"])
    a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(5, 60)
    q = (f"{p.name} buys {a} {items} for ${b} each and a {thing} for ${c}. "
         f"How many dollars does {p.name} spend in total?")
    s1 = _step(f"The {items} cost ", a, "*", b, " dollars.")
    return q, [s1, _step(f"In total {p.name} spends ", s1[1], "+", c, " dollars.")], (a, b, c)


def savings(rng: random.Random, p: Person) -> tuple[str, list[tuple[str, int]], tuple[int, ...]]:
    thing = rng.choice(["bike", "game", "coat", "radio"])
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    c = rng.randint(1, a * b - 1)
    q = (f"{p.name} saves ${a} each week for {b} weeks. Then {p.he} spends ${c} on a {thing}. "
         f"How many dollars does {p.name} have left?")
    s1 = _step(f"{p.name} saves ", a, "*", b, " dollars.")
    return q, [s1, _step(f"{_cap(p.he)} has ", s1[1], "-", c, " dollars left.")], (a, b, c)


def share(rng: random.Random, p: Person) -> tuple[str, list[tuple[str, int]], tuple[int, ...]]:
    items = rng.choice(["candies", "cards", "shells", "nuts"])
    c, k = rng.randint(2, 12), rng.randint(2, 12)
    a = rng.randint(1, c * k - 1)
    b = c * k - a
    q = (f"{p.name} has {a} {items} and finds {b} more. {_cap(p.he)} shares them equally among {c} friends. "
         f"How many {items} does each friend get?")
    s1 = _step(f"{p.name} has ", a, "+", b, f" {items}.")
    return q, [s1, _step("Each friend gets ", s1[1], "/", c, f" {items}.")], (a, b, c)


def farm(rng: random.Random, p: Person) -> tuple[str, list[tuple[str, int]], tuple[int, ...]]:
    animal = rng.choice(["chickens", "ducks", "sheep", "goats"])
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    c = rng.randint(1, min(30, a * b - 1))
    q = (f"A farm has {a} cows and {b} times as many {animal}. The farmer sells {c} {animal}. "
         f"How many animals are on the farm now?")
    s1 = _step("There are ", a, "*", b, f" {animal}.")
    s2 = _step("After the sale there are ", s1[1], "-", c, f" {animal}.")
    return q, [s1, s2, _step("There are ", s2[1], "+", a, " animals on the farm.")], (a, b, c)


def book(rng: random.Random, p: Person) -> tuple[str, list[tuple[str, int]], tuple[int, ...]]:
    a, b, r = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 60)
    c = a * b + r
    q = (f"{p.name} reads {a} pages a day for {b} days. The book has {c} pages. "
         f"How many pages are left to read?")
    s1 = _step(f"{p.name} reads ", a, "*", b, " pages.")
    return q, [s1, _step("There are ", c, "-", s1[1], " pages left.")], (a, b, c)


def groups(rng: random.Random, p: Person) -> tuple[str, list[tuple[str, int]], tuple[int, ...]]:
    c, k = rng.randint(2, 12), rng.randint(2, 12)
    a = rng.randint(1, c * k - 1)
    b = c * k - a
    q = (f"There are {a} students in a class. {b} more students join. The teacher splits them into groups "
         f"of {c}. How many groups are there?")
    s1 = _step("There are ", a, "+", b, " students.")
    return q, [s1, _step("There are ", s1[1], "/", c, " groups.")], (a, b, c)


def marbles(rng: random.Random, p: Person) -> tuple[str, list[tuple[str, int]], tuple[int, ...]]:
    items = rng.choice(["marbles", "stickers", "cards", "beads"])
    a, b, c = rng.randint(1, 40), rng.randint(2, 12), rng.randint(2, 12)
    d = rng.randint(1, min(30, a + b * c - 1))
    q = (f"{p.name} has {a} {items}. {_cap(p.he)} buys {b} bags with {c} {items} in each bag, then gives {d} "
         f"{items} to a friend. How many {items} does {p.name} have now?")
    s1 = _step("The bags hold ", b, "*", c, f" {items}.")
    s2 = _step(f"{p.name} then has ", a, "+", s1[1], f" {items}.")
    return q, [s1, s2, _step(f"After giving some away, {p.he} has ", s2[1], "-", d, f" {items}.")], (a, b, c, d)


def ages(rng: random.Random, p: Person) -> tuple[str, list[tuple[str, int]], tuple[int, ...]]:
    a, b, c = rng.randint(2, 12), rng.randint(1, 9), rng.randint(2, 4)
    q = (f"{p.name} is {a} years old. {_cap(p.his)} brother is {b} years older. {_cap(p.his)} mother is {c} "
         f"times as old as {p.his} brother. How old is {p.his} mother?")
    s1 = _step(f"{_cap(p.his)} brother is ", a, "+", b, " years old.")
    return q, [s1, _step(f"{_cap(p.his)} mother is ", s1[1], "*", c, " years old.")], (a, b, c)


def bake(rng: random.Random, p: Person) -> tuple[str, list[tuple[str, int]], tuple[int, ...]]:
    items = rng.choice(["cookies", "muffins", "rolls", "tarts"])
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    c = rng.choice([d for d in range(2, 13) if a * b % d == 0 and d not in (a, b)] or [a])
    q = (f"{p.name} bakes {a} trays of {items} with {b} {items} on each tray. {_cap(p.he)} packs them in bags "
         f"of {c}. How many bags does {p.he} fill?")
    s1 = _step(f"{p.name} bakes ", a, "*", b, f" {items}.")
    return q, [s1, _step(f"{_cap(p.he)} fills ", s1[1], "/", c, " bags.")], (a, b, c)


def trip(rng: random.Random, p: Person) -> tuple[str, list[tuple[str, int]], tuple[int, ...]]:
    vehicle = rng.choice(["bus", "train", "truck", "boat"])
    a, b, c = 10 * rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 60)
    q = (f"A {vehicle} travels {a} km each hour for {b} hours. Then it travels {c} more km. "
         f"How many km does it travel in total?")
    s1 = _step(f"In {b} hours it travels ", a, "*", b, " km.")
    return q, [s1, _step("In total it travels ", s1[1], "+", c, " km.")], (a, b, c)


def change(rng: random.Random, p: Person) -> tuple[str, list[tuple[str, int]], tuple[int, ...]]:
    items, thing = rng.choice(["pens", "mugs", "plates", "toys"]), rng.choice(["card", "map", "cap", "kite"])
    b, c, d, r = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 30), rng.randint(1, 50)
    a = b * c + d + r
    q = (f"{p.name} has ${a}. {_cap(p.he)} buys {b} {items} for ${c} each and a {thing} for ${d}. "
         f"How many dollars does {p.name} have left?")
    s1 = _step(f"The {items} cost ", b, "*", c, " dollars.")
    s2 = _step(f"{_cap(p.he)} spends ", s1[1], "+", d, " dollars.")
    return q, [s1, s2, _step(f"{p.name} has ", a, "-", s2[1], " dollars left.")], (a, b, c, d)


@dataclass(frozen=True)
class Template:
    name: str
    write: Callable[[random.Random, Person], tuple[str, list[tuple[str, int]], tuple[int, ...]]]


TEMPLATES = tuple(Template(f.__name__, f) for f in
                  (boxes, shopping, savings, share, farm, book, groups, marbles, ages, bake, trip, change))
