"""`code-lite`: small Python functions from a signature and docstring, in HumanEval's record format.

A problem's `prompt` is the `def` line and a docstring (one sentence and one `>>>` example); its `target`
and `answer` are the canonical body, always the single line `    return <expr>\\n`; `meta` holds the rest of
the HumanEval record (`entry_point`, `test` = a `def check(candidate):` block of asserts whose expected
values come from an independent oracle, `canonical_solution`) and the function's identity (`family`,
`variant`, `consts`). The functions come from `code_families.FAMILIES`, each family equally often; the split
key is the variant and its constants, so a test function is not in train under another name either.

`check` scores `prompt + completion + test + check(entry_point)` (`program`) as HumanEval is scored: the
completion and the test in two sandboxes (`eval/sandbox.py`, `run_checked`), the asserts seeing plain values
only; it does not truncate the completion (stop sequences are the harness's business).
"""
from __future__ import annotations

import random
from collections.abc import Hashable

from dllm.eval.tasks.base import Problem, Task
from dllm.eval.tasks.code_families import ARG_NAMES, FAMILIES, Variant
from dllm.eval.sandbox import SandboxLimits, run_checked

NAME_PREFIXES = ("", "get_", "find_", "compute_")


def render_prompt(name: str, arg: str, variant: Variant, consts: dict, example) -> str:
    """The `def` line and the docstring with one example call and its result."""
    doc = variant.doc.format(x=arg, **consts)
    result = variant.oracle(example, **consts)
    return (f"def {name}({arg}: {variant.arg_type}) -> {variant.returns}:\n"
            f'    """{doc}\n    >>> {name}({example!r})\n    {result!r}\n    """\n')


def render_test(variant: Variant, consts: dict, args: list) -> str:
    lines = [f"    assert candidate({a!r}) == {variant.oracle(a, **consts)!r}\n" for a in args]
    return "def check(candidate):\n" + "".join(lines)


class CodeLiteTask(Task):
    """See the module docstring. `num_asserts` test inputs per function, `timeout_s` per check."""

    name = "code-lite"
    id_prefix = "CodeLite"
    test_pool_size = 200

    def __init__(self, num_asserts: int = 5, timeout_s: float = 5.0) -> None:
        super().__init__()
        if num_asserts < 1:
            raise ValueError(f"num_asserts must be at least 1, got {num_asserts}")
        self.num_asserts, self.timeout_s = num_asserts, timeout_s

    def draw(self, rng: random.Random) -> Problem:
        variant = rng.choice(FAMILIES[rng.choice(sorted(FAMILIES))])
        consts = variant.draw_consts(rng)
        name, arg = rng.choice(NAME_PREFIXES) + variant.stem, rng.choice(ARG_NAMES[variant.arg_type])
        prompt = render_prompt(name, arg, variant, consts, variant.make_input(rng, consts, True))
        test = render_test(variant, consts, [variant.make_input(rng, consts, False) for _ in range(self.num_asserts)])
        body = f"    return {variant.body.format(x=arg, **consts)}\n"
        meta = {"entry_point": name, "test": test, "canonical_solution": body, "family": variant.family,
                "variant": variant.stem, "consts": tuple(sorted(consts.items()))}
        return Problem("", prompt, body, body, meta)

    def key(self, problem: Problem) -> Hashable:
        return (problem.meta["variant"], problem.meta["consts"])

    def program(self, problem: Problem, completion: str) -> str:
        """The script HumanEval's harness runs: prompt, completion, the check block and its call."""
        return f"{problem.prompt}{completion}\n\n{problem.meta['test']}\ncheck({problem.meta['entry_point']})\n"

    def check(self, problem: Problem, completion: str) -> bool:
        # as HumanEval is scored: the completion and the test in two sandboxes (sandbox.run_checked)
        solution = f"{problem.prompt}{completion}\n"
        checker = f"{problem.prompt}\n\n{problem.meta['test']}\n"
        return run_checked(solution, checker, problem.meta["entry_point"], SandboxLimits(timeout_s=self.timeout_s)).passed


def humaneval_record(problem: Problem) -> dict[str, str]:
    """The problem as a HumanEval record: task_id, prompt, canonical_solution, test, entry_point."""
    return {"task_id": problem.task_id, "prompt": problem.prompt,
            "canonical_solution": problem.meta["canonical_solution"], "test": problem.meta["test"],
            "entry_point": problem.meta["entry_point"]}
