"""`arith`: multi-digit addition, subtraction and multiplication, worked column by column.

Every column, right to left, is one line that names its digits, the carry (or borrow) coming in, the
result, the carry going out, and after the colon the answer digits written so far:

    What is 347 + 589?
    7 + 9 + 0 = 16, carry 1: 6
    4 + 8 + 1 = 13, carry 1: 36
    3 + 5 + 1 = 9, carry 0: 936
    #### 936

A carry left after the last column gets its own line with zero digits (`0 + 0 + 1 = 1, carry 0: 1036`).
Subtraction (`a >= b`) shows a borrowed column as its top digit plus ten (`12 - 8 - 0 = 4, borrow 1: 4`).
Multiplication by a one-digit number is one row of lines `7 * 8 + 0 = 56, carry 5: 6`; by a two-digit
number, the ones row, then the tens row with the ones row added into it column by column
(`47 * 60 + 376:` then `7 * 6 + 7 + 0 = 49, carry 4: 96`, ...), so no separate addition is needed.
Each line depends on the line before through its carry and its written digits, so the last digits of the
answer depend on the first ones.
"""
from __future__ import annotations

import random
from collections.abc import Hashable

from dllm.eval.scoring import extract_strict, is_correct
from dllm.eval.tasks.base import Problem, Task


def _digit(n: int, i: int) -> int:
    return n // 10 ** i % 10


def add_lines(a: int, b: int) -> list[str]:
    """Column addition of `a + b`: one line per column, a last one for a final carry."""
    lines, written, carry, i = [], "", 0, 0
    while i < max(len(str(a)), len(str(b))) or carry:
        x, y = _digit(a, i), _digit(b, i)
        total = x + y + carry
        written = str(total % 10) + written
        lines.append(f"{x} + {y} + {carry} = {total}, carry {total // 10}: {written}")
        carry, i = total // 10, i + 1
    return lines


def sub_lines(a: int, b: int) -> list[str]:
    """Column subtraction of `a - b` (`a >= b`); written digits keep their leading zeros."""
    lines, written, borrow = [], "", 0
    for i in range(len(str(a))):
        x, y = _digit(a, i), _digit(b, i)
        next_borrow = int(x < y + borrow)
        top = x + 10 * next_borrow
        written = str(top - y - borrow) + written
        lines.append(f"{top} - {y} - {borrow} = {top - y - borrow}, borrow {next_borrow}: {written}")
        borrow = next_borrow
    return lines


def mul_row_lines(a: int, d: int) -> list[str]:
    """`a * d` for one digit `d`: one line per digit of `a`, then one for a carry left over."""
    lines, written, carry, i = [], "", 0, 0
    while i < len(str(a)) or carry:
        x = _digit(a, i)
        total = x * d + carry
        written = str(total % 10) + written
        lines.append(f"{x} * {d} + {carry} = {total}, carry {total // 10}: {written}")
        carry, i = total // 10, i + 1
    return lines


def mul_add_row_lines(a: int, d: int, row: int) -> list[str]:
    """`a * d * 10 + row`: the tens row of a two-digit product added column by column to the ones row
    `row`, whose units digit is already final; each line names the digit of `row` it adds."""
    lines, written, carry, i = [], str(row % 10), 0, 0
    while i < len(str(a)) or carry:
        x, r = _digit(a, i), _digit(row, i + 1)
        total = x * d + r + carry
        written = str(total % 10) + written
        lines.append(f"{x} * {d} + {r} + {carry} = {total}, carry {total // 10}: {written}")
        carry, i = total // 10, i + 1
    return lines


def mul_lines(a: int, b: int) -> list[str]:
    """`a * b` for a one-digit `b`: one row; for a two-digit `b`, the ones row and then the tens row
    folded into it."""
    if b < 10:
        return mul_row_lines(a, b)
    ones, tens = b % 10, b // 10
    row = a * ones
    return [f"{a} * {ones}:", *mul_row_lines(a, ones), f"{a} * {tens}0 + {row}:", *mul_add_row_lines(a, tens, row)]


_WORKERS = {"+": (add_lines, lambda a, b: a + b), "-": (sub_lines, lambda a, b: a - b),
            "*": (mul_lines, lambda a, b: a * b)}


def _number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    num_digits = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (num_digits - 1), 10 ** num_digits - 1)


class ArithTask(Task):
    """Addition and subtraction of 2-4 digit numbers; multiplication of 2-3 digits by 1 digit and of 2 by 2
    digits; the three operations equally often. Checked by GSM8K's strict `####` extraction."""

    name = "arith"
    id_prefix = "Arith"

    def draw(self, rng: random.Random) -> Problem:
        op = rng.choice("+-*")
        if op == "*":
            a = _number(rng, 2, 3)
            b = _number(rng, 1, 1 if a >= 100 else 2)    # 3 by 2 digits would run past 170 tokens
        else:
            a, b = _number(rng, 2, 4), _number(rng, 2, 4)
            if op == "-" and a < b:
                a, b = b, a
        work, compute = _WORKERS[op]
        answer = str(compute(a, b))
        target = "\n".join([*work(a, b), f"#### {answer}"])
        return Problem("", f"What is {a} {op} {b}?", target, answer, {"op": op, "a": a, "b": b})

    def key(self, problem: Problem) -> Hashable:
        op, a, b = problem.meta["op"], problem.meta["a"], problem.meta["b"]
        return (op, a, b) if op == "-" else (op, min(a, b), max(a, b))   # a + b is b + a

    def check(self, problem: Problem, completion: str) -> bool:
        return is_correct(extract_strict(completion), problem.answer)
