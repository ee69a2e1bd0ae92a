"""The function families of `code-lite`: each `Variant` is one kind of small function with constants.

A variant gives, as format strings over the argument name `{x}` and its constants (`{k}`, `{c}`, `{c2}`,
`{sep}`, `{start}`, `{step}`), the docstring sentence and the returned expression (every canonical body is
the one line `return <expr>`), and an independent Python `oracle(arg, **consts)` that computes the expected
results for the tests. The variant's `stem` and its constants identify a function; its name and argument
name are drawn separately and do not. Every variant has constants, with about 20 values or more, so that the
test pool takes only a few of each variant's functions and train still holds the variant with others.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dllm.eval.tasks import code_inputs as inputs

SEPARATORS = (" ", "-", "_", ",", ", ", "+", "/", ":", ";", "|", ".", "*", " - ", " | ", "--", "->", "=", "#", "~",
              "&", " + ", " / ", "; ", "::")
ARG_NAMES = {"list[int]": ("xs", "nums", "values", "numbers", "data"), "str": ("s", "text", "word", "line"),
             "list[tuple[int, int]]": ("pairs", "items", "points"), "int": ("n", "m", "num")}


def K(lo: int, hi: int) -> Callable[[random.Random], dict]:
    return lambda rng: {"k": rng.randint(lo, hi)}


def C(rng: random.Random) -> dict:
    return {"c": rng.choice(inputs.LETTERS)}


def C2(rng: random.Random) -> dict:
    c, c2 = rng.sample(inputs.LETTERS, 2)
    return {"c": c, "c2": c2}


def SEP(*more: Callable[[random.Random], dict]) -> Callable[[random.Random], dict]:
    return lambda rng: {"sep": rng.choice(SEPARATORS), **{k: v for f in more for k, v in f(rng).items()}}


def SLICE(rng: random.Random) -> dict:
    i = rng.randint(0, 5)
    return {"i": i, "j": i + rng.randint(2, 8)}


def SERIES(rng: random.Random) -> dict:
    return {"start": rng.randint(0, 20), "step": rng.randint(1, 12)}


@dataclass(frozen=True)
class Variant:
    family: str
    stem: str                                   # the function name without its optional prefix
    arg_type: str                               # annotation of the single argument
    returns: str                                # return annotation
    doc: str
    body: str
    oracle: Callable[..., Any]
    make_input: Callable[[random.Random, dict, bool], Any]
    draw_consts: Callable[[random.Random], dict]


def _v(family: str, stem: str, types: str, doc: str, body: str, oracle, make_input, consts) -> Variant:
    arg_type, returns = types.split(" -> ")
    return Variant(family, stem, arg_type, returns, doc, body, oracle, make_input, consts)


_INTS, _INTS_OUT, _TEXT_INT, _WORDS = "list[int] -> int", "list[int] -> list[int]", "str -> int", "str -> str"
_THE_NUMS = "the numbers in {x}"

LIST_SUM = [
    _v("sum", "sum_plus", _INTS, f"Return the sum of {_THE_NUMS} plus {{k}}.", "sum({x}) + {k}",
       lambda xs, k: sum(xs) + k, inputs.ints, K(1, 50)),
    _v("sum", "sum_minus", _INTS, f"Return the sum of {_THE_NUMS} minus {{k}}.", "sum({x}) - {k}",
       lambda xs, k: sum(xs) - k, inputs.ints, K(1, 50)),
    _v("sum", "sum_times", _INTS, f"Return the sum of {_THE_NUMS} times {{k}}.", "sum({x}) * {k}",
       lambda xs, k: sum(xs) * k, inputs.ints, K(2, 30)),
    _v("sum", "sum_above", _INTS, f"Return the sum of {_THE_NUMS} that are greater than {{k}}.",
       "sum(v for v in {x} if v > {k})", lambda xs, k: sum(v for v in xs if v > k), inputs.ints, K(0, 30)),
    _v("sum", "sum_below", _INTS, f"Return the sum of {_THE_NUMS} that are less than {{k}}.",
       "sum(v for v in {x} if v < {k})", lambda xs, k: sum(v for v in xs if v < k), inputs.ints, K(0, 30)),
    _v("sum", "sum_multiples", _INTS, f"Return the sum of {_THE_NUMS} that are multiples of {{k}}.",
       "sum(v for v in {x} if v % {k} == 0)", lambda xs, k: sum(v for v in xs if v % k == 0), inputs.ints, K(2, 20)),
    _v("sum", "sum_non_multiples", _INTS, f"Return the sum of {_THE_NUMS} that are not multiples of {{k}}.",
       "sum(v for v in {x} if v % {k} != 0)", lambda xs, k: sum(xs) - sum(v for v in xs if v % k == 0), inputs.ints,
       K(2, 20)),
    _v("sum", "sum_squares_plus", _INTS, f"Return the sum of the squares of {_THE_NUMS} plus {{k}}.",
       "sum(v * v for v in {x}) + {k}", lambda xs, k: sum(v ** 2 for v in xs) + k, inputs.ints, K(1, 50)),
]

LIST_MAP = [
    _v("map", "add_to_all", _INTS_OUT, f"Return a list with {{k}} added to each of {_THE_NUMS}.",
       "[v + {k} for v in {x}]", lambda xs, k: list(map(lambda v: v + k, xs)), inputs.ints, K(1, 50)),
    _v("map", "scale_all", _INTS_OUT, f"Return a list with each of {_THE_NUMS} multiplied by {{k}}.",
       "[v * {k} for v in {x}]", lambda xs, k: list(map(lambda v: v * k, xs)), inputs.ints, K(2, 30)),
    _v("map", "cap_all", _INTS_OUT, f"Return a list of {_THE_NUMS}, each capped at {{k}}.",
       "[min(v, {k}) for v in {x}]", lambda xs, k: [k if v > k else v for v in xs], inputs.ints, K(0, 30)),
    _v("map", "raise_all", _INTS_OUT, f"Return a list of {_THE_NUMS}, each raised to at least {{k}}.",
       "[max(v, {k}) for v in {x}]", lambda xs, k: [k if v < k else v for v in xs], inputs.ints, K(0, 30)),
    _v("map", "keep_above", _INTS_OUT, f"Return the list of {_THE_NUMS} that are greater than {{k}}.",
       "[v for v in {x} if v > {k}]", lambda xs, k: list(filter(lambda v: v > k, xs)), inputs.ints, K(0, 30)),
    _v("map", "keep_below", _INTS_OUT, f"Return the list of {_THE_NUMS} that are less than {{k}}.",
       "[v for v in {x} if v < {k}]", lambda xs, k: list(filter(lambda v: v < k, xs)), inputs.ints, K(0, 30)),
    _v("map", "count_above", _INTS, f"Return how many of {_THE_NUMS} are greater than {{k}}.",
       "sum(1 for v in {x} if v > {k})", lambda xs, k: len([v for v in xs if v > k]), inputs.ints, K(0, 30)),
]

COUNT_CHAR = [
    _v("count", "count_char", _TEXT_INT, "Return how many times '{c}' occurs in {x}.", "{x}.count('{c}')",
       lambda s, c: sum(ch == c for ch in s), inputs.text, C),
    _v("count", "count_other", _TEXT_INT, "Return how many characters of {x} are not '{c}'.",
       "len({x}) - {x}.count('{c}')", lambda s, c: sum(ch != c for ch in s), inputs.text, C),
    _v("count", "count_either", _TEXT_INT, "Return how many characters of {x} are '{c}' or '{c2}'.",
       "{x}.count('{c}') + {x}.count('{c2}')", lambda s, c, c2: sum(ch in (c, c2) for ch in s), inputs.text, C2),
    _v("count", "count_nocase", _TEXT_INT, "Return how many times '{c}' occurs in {x}, ignoring case.",
       "{x}.lower().count('{c}')", lambda s, c: sum(ch in (c, c.upper()) for ch in s), inputs.mixed_case, C),
    _v("count", "count_before", _TEXT_INT, "Return how many characters of {x} come before '{c}' in the alphabet.",
       "sum(1 for ch in {x} if ch < '{c}')", lambda s, c: sum(ord(ch) < ord(c) for ch in s), inputs.text,
       lambda rng: {"c": rng.choice(inputs.LETTERS[1:])}),
]

WORDS = [
    _v("words", "reverse_words", _WORDS, "Return the words of {x} in reverse order, joined by '{sep}'.",
       "'{sep}'.join({x}.split()[::-1])", lambda s, sep: sep.join(reversed(s.split())), inputs.sentence, SEP()),
    _v("words", "flip_words", _WORDS, "Return the words of {x}, each reversed, joined by '{sep}'.",
       "'{sep}'.join(w[::-1] for w in {x}.split())", lambda s, sep: sep.join("".join(reversed(w)) for w in s.split()),
       inputs.sentence, SEP()),
    _v("words", "initials", _WORDS, "Return the first letter of each word of {x}, joined by '{sep}'.",
       "'{sep}'.join(w[0] for w in {x}.split())", lambda s, sep: sep.join(w[:1] for w in s.split()),
       inputs.sentence, SEP()),
    _v("words", "shout_words", _WORDS, "Return the words of {x} in upper case, joined by '{sep}'.",
       "'{sep}'.join(w.upper() for w in {x}.split())", lambda s, sep: sep.join(s.split()).upper(),
       inputs.sentence, SEP()),
    _v("words", "long_words", _WORDS, "Return the words of {x} longer than {k} letters, joined by '{sep}'.",
       "'{sep}'.join(w for w in {x}.split() if len(w) > {k})",
       lambda s, sep, k: sep.join(filter(lambda w: len(w) > k, s.split())), inputs.sentence, SEP(K(1, 5))),
    _v("words", "words_from", _WORDS, "Return the words of {x} that start with '{c}', joined by '{sep}'.",
       "'{sep}'.join(w for w in {x}.split() if w.startswith('{c}'))",
       lambda s, sep, c: sep.join(w for w in s.split() if w[0] == c), inputs.sentence, SEP(C)),
    _v("words", "words_with", _WORDS, "Return the words of {x} that contain '{c}', joined by '{sep}'.",
       "'{sep}'.join(w for w in {x}.split() if '{c}' in w)",
       lambda s, sep, c: sep.join(w for w in s.split() if w.find(c) >= 0), inputs.sentence, SEP(C)),
]

_PAIR_EXPRS = {   # expression over a pair (a, b) -> its independent oracle
    "rdiff_plus": ("b - a + {k}", lambda a, b, k: k - (a - b)),
    "scaled_minus": ("a * {k} - b", lambda a, b, k: k * a - b),
    "weighted": ("a + {k} * b", lambda a, b, k: a + b * k), "scaled": ("{k} * a + b", lambda a, b, k: a * k + b),
    "product_plus": ("a * b + {k}", lambda a, b, k: a * b + k),
    "product_minus": ("a * b - {k}", lambda a, b, k: a * b - k),
    "sum_plus": ("a + b + {k}", lambda a, b, k: a + b + k), "diff_plus": ("a - b + {k}", lambda a, b, k: a - b + k),
}


def _pair_variant(agg: str, name: str) -> Variant:
    expr, value = _PAIR_EXPRS[name]
    pick = max if agg == "max" else min
    return _v("pairs", f"{agg}_pair_{name}", "list[tuple[int, int]] -> int",
              f"Return the {'largest' if agg == 'max' else 'smallest'} value of {expr} over the pairs (a, b) in {{x}}.",
              f"{agg}({expr} for a, b in {{x}})",
              lambda ps, k: pick(value(a, b, k) for a, b in ps), inputs.pairs, K(2, 30))


PAIRS = [_pair_variant(agg, name) for agg in ("max", "min") for name in _PAIR_EXPRS]

_PAL, _PAL_S, _PAL_N = " read the same forwards and backwards.", "str -> bool", "int -> bool"


def _is_pal(s: str) -> bool:
    return all(s[i] == s[-1 - i] for i in range(len(s) // 2))


PALINDROME = [
    _v("palindrome", "is_palindrome_slice", _PAL_S,
       "Return True if the characters of {x} from index {i} up to index {j}" + _PAL,
       "{x}[{i}:{j}] == {x}[{i}:{j}][::-1]", lambda s, i, j: _is_pal(s[i:j]), inputs.palindrome_text("slice"),
       SLICE),
    _v("palindrome", "is_palindrome_without", _PAL_S, "Return True if {x} is a palindrome after removing every '{c}'.",
       "{x}.replace('{c}', '') == {x}.replace('{c}', '')[::-1]", lambda s, c: _is_pal("".join(s.split(c))),
       inputs.palindrome_text("without"), C),
    _v("palindrome", "is_palindrome_with", _PAL_S, "Return True if {x} followed by '{c}' is a palindrome.",
       "{x} + '{c}' == ({x} + '{c}')[::-1]", lambda s, c: _is_pal(s + c), inputs.palindrome_text("with"), C),
    _v("palindrome", "is_palindrome_plus", _PAL_N, "Return True if the digits of {x} + {k}" + _PAL,
       "str({x} + {k}) == str({x} + {k})[::-1]", lambda n, k: _is_pal(str(n + k)), inputs.palindrome_number("plus"),
       K(1, 200)),
    _v("palindrome", "is_palindrome_times", _PAL_N, "Return True if the digits of {x} * {k}" + _PAL,
       "str({x} * {k}) == str({x} * {k})[::-1]", lambda n, k: _is_pal(str(n * k)), inputs.palindrome_number("times"),
       lambda rng: {"k": rng.choice([k for k in range(2, 31) if k % 10])}),   # no palindrome ends in 0
]

_SERIES = " of the arithmetic series that starts at {start} and grows by {step}."

SERIES_FAMILY = [
    _v("series", "series_sum", "int -> int", "Return the sum of the first {x} terms" + _SERIES,
       "sum({start} + {step} * i for i in range({x}))", lambda n, start, step: n * start + step * n * (n - 1) // 2,
       inputs.count, SERIES),
    _v("series", "series_term", "int -> int", "Return term {x} (counting from 0)" + _SERIES, "{start} + {step} * {x}",
       lambda n, start, step: start + sum([step] * n), inputs.count, SERIES),
    _v("series", "series_terms", "int -> list[int]", "Return the list of the first {x} terms" + _SERIES,
       "[{start} + {step} * i for i in range({x})]", lambda n, start, step: list(range(start, start + n * step, step)),
       inputs.count, SERIES),
]

FAMILIES: dict[str, list[Variant]] = {
    "sum": LIST_SUM, "map": LIST_MAP, "count": COUNT_CHAR, "words": WORDS, "pairs": PAIRS,
    "palindrome": PALINDROME, "series": SERIES_FAMILY,
}
