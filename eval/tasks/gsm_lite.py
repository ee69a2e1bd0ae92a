"""`gsm-lite`: templated two- and three-step word problems in GSM8K's format.

A solution has one line per operation, each with GSM8K's calculator annotation, and ends with `#### N`:

    Maya buys 4 boxes of pens. Each box holds 6 pens. She gives away 5 pens. How many pens does Maya have
    left?
    Maya buys 4 * 6 = <<4*6=24>>24 pens.
    She has 24 - 5 = <<24-5=19>>19 pens left.
    #### 19

Numbers stay small: products come from the 2..12 times table (or tens times a digit), sums and
differences stay under 1000, divisions are exact, every intermediate result is positive. Each line uses
the result of the line before. The split key is the template and its numbers, so a test problem does not
appear in train under other names or items either. Checked by GSM8K's strict `####` extraction.
"""
from __future__ import annotations

import random
import re
from collections.abc import Hashable

from dllm.eval.scoring import extract_strict, is_correct
from dllm.eval.tasks.base import Problem, Task
from dllm.eval.tasks.gsm_templates import TEMPLATES, Person, draw_person

_ANNOTATION = re.compile(r"<<[^>]*>>")


class GsmLiteTask(Task):
    """Word problems from `gsm_templates.TEMPLATES`, each template equally often. `calculator=False`
    drops the `<<a*b=c>>` annotations from the targets (the checker is the same)."""

    name = "gsm-lite"
    id_prefix = "GsmLite"

    def __init__(self, calculator: bool = True) -> None:
        super().__init__()
        self.calculator = calculator

    def draw(self, rng: random.Random) -> Problem:
        template = rng.choice(TEMPLATES)
        person: Person = draw_person(rng)
        question, lines, numbers = template.write(rng, person)
        answer = lines[-1][1]
        target = "\n".join([*(text for text, _ in lines), f"#### {answer}"])
        if not self.calculator:
            target = _ANNOTATION.sub("", target)
        meta = {"template": template.name, "numbers": numbers}
        return Problem("", question, target, str(answer), meta)

    def key(self, problem: Problem) -> Hashable:
        return (problem.meta["template"], problem.meta["numbers"])

    def check(self, problem: Problem, completion: str) -> bool:
        return is_correct(extract_strict(completion), problem.answer)
