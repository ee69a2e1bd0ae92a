"""Random arguments for the `code-lite` functions, by argument kind, plus the palindrome makers.

Every maker takes `(rng, consts, small)`: `consts` are the function's constants (a character `c` that the
input should contain now and then, a number `k`), `small` asks for a short argument for the docstring
example. Makers draw with `rng` only, so problems stay deterministic.
"""
from __future__ import annotations

import random
import string
from collections.abc import Callable
from typing import Any

LETTERS = string.ascii_lowercase


def _alphabet(rng: random.Random, consts: dict) -> str:
    extra = "".join(v for key, v in consts.items() if key in ("c", "c2"))
    return "".join(rng.sample(LETTERS, 3)) + extra


def ints(rng: random.Random, consts: dict, small: bool) -> list[int]:
    """Numbers in 0..20 (small) or -5..30; in tests, near the constant `k` now and then, so that a
    threshold off by one is caught."""
    near = [consts["k"] - 1, consts["k"], consts["k"] + 1] if "k" in consts and not small else []

    def one() -> int:
        return rng.choice(near) if near and rng.random() < 0.3 else rng.randint(0 if small else -5, 20 if small else 30)
    return [one() for _ in range(rng.randint(1 if small else 0, 3 if small else 6))]


def pairs(rng: random.Random, consts: dict, small: bool) -> list[tuple[int, int]]:
    return [(rng.randint(0, 20), rng.randint(0, 20)) for _ in range(rng.randint(1, 3 if small else 5))]


def text(rng: random.Random, consts: dict, small: bool) -> str:
    alphabet = _alphabet(rng, consts)
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1 if small else 0, 6 if small else 10)))


def mixed_case(rng: random.Random, consts: dict, small: bool) -> str:
    return "".join(ch.upper() if rng.random() < 0.4 else ch for ch in text(rng, consts, small))


def sentence(rng: random.Random, consts: dict, small: bool) -> str:
    alphabet = _alphabet(rng, consts)
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5 if small else 6)))
             for _ in range(rng.randint(1, 3 if small else 5))]
    return " ".join(words)


def count(rng: random.Random, consts: dict, small: bool) -> int:
    return rng.randint(1 if small else 0, 4 if small else 8)


def number(rng: random.Random, consts: dict, small: bool) -> int:
    return rng.randint(0, 999 if small else 99999)


def _palindrome(rng: random.Random, alphabet: str, length: int) -> str:
    half = "".join(rng.choice(alphabet) for _ in range(length // 2))
    return half + (rng.choice(alphabet) if length % 2 else "") + half[::-1]


def _insert(rng: random.Random, s: str, ch: str, times: int) -> str:
    for _ in range(times):
        i = rng.randint(0, len(s))
        s = s[:i] + ch + s[i:]
    return s


def _random_letters(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(length))


def _palindrome_text(rng: random.Random, consts: dict, how: str) -> str:
    """A string for which the palindrome test of kind `how` ("slice", "without", "with") holds."""
    if how == "slice":                    # s[i:j] is a palindrome
        i, j = consts["i"], consts["j"]
        return _random_letters(rng, i) + _palindrome(rng, _alphabet(rng, {}), j - i) + _random_letters(rng, 2)
    c = consts["c"]
    if how == "with":                     # s + c is a palindrome: c + palindrome + c without its last c
        return (c + _palindrome(rng, _alphabet(rng, {}), rng.randint(0, 6)) + c)[:-1]
    pal = _palindrome(rng, _alphabet(rng, {}).replace(c, ""), rng.randint(2, 7))
    return _insert(rng, pal, c, rng.randint(1, 2))


def palindrome_text(how: str) -> Callable[[random.Random, dict, bool], str]:
    """Maker of strings: half of them satisfy the palindrome test of kind `how`, half are random."""
    def make(rng: random.Random, consts: dict, small: bool) -> str:
        return _palindrome_text(rng, consts, how) if rng.random() < 0.5 else text(rng, consts, small)
    return make


def palindrome_number(how: str) -> Callable[[random.Random, dict, bool], int]:
    """Maker of ints n: half of them make `str(n + k)` (how="plus") or `str(n * k)` ("times") a
    palindrome, half are random."""
    def make(rng: random.Random, consts: dict, small: bool) -> Any:
        if rng.random() < 0.5:
            return number(rng, consts, small)
        k = consts["k"]
        for _ in range(10_000):
            p = int(_palindrome(rng, "123456789", rng.randint(1, 5 if small else 9)))
            if how == "plus" and p >= k:
                return p - k
            if how == "times" and p % k == 0:
                return p // k
        raise ValueError(f"no palindrome found for how={how!r}, k={k}")
    return make
