"""The task interface: a `Problem` record and a `Task` that generates problems and checks completions.

Contract of `Task.generate(split, n)`:
- deterministic: the same call returns the same list, in every process (string-seeded `random.Random`);
  a longer call extends a shorter one (`generate(s, n)` is a prefix of `generate(s, n + k)`);
- "test" is a fixed pool of `test_pool_size` problems with distinct keys, drawn from the stream seeded by
  `"<name>/test"`; `n` may not exceed the pool;
- "train" is drawn from the stream seeded by `"<name>/train"`, rejecting every problem whose key is a key
  of the test pool, so train and test are disjoint by construction (train problems may repeat).
The key defaults to the prompt; a task may use a coarser one (the numbers of a word problem without the
names) so that a test problem is not in train under another wording either.

A subclass implements `draw(rng)` (one random problem, `task_id` left empty) and `check`. Tasks know
nothing about models or tokenizers.
"""
from __future__ import annotations

import dataclasses
import random
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    """One problem. `prompt`: the question as the user asks it; `target`: the full worked solution a model
    should answer with; `answer`: the gold final answer (a number as text, or for code the canonical
    function body); `meta`: task-specific facts (operands, template, HumanEval fields, ...)."""
    task_id: str
    prompt: str
    target: str
    answer: str
    meta: dict = field(default_factory=dict)


class Task(ABC):
    """Base class of the generated tasks; see the module docstring for the `generate` contract."""

    name: str = ""
    id_prefix: str = ""           # task ids are "<id_prefix>/<i>" (test) and "<id_prefix>/train/<i>"
    test_pool_size: int = 1000

    def __init__(self) -> None:
        self._test_pool: list[Problem] | None = None
        self._test_keys: frozenset | None = None

    @abstractmethod
    def draw(self, rng: random.Random) -> Problem:
        """One random problem drawn with `rng` only (`task_id` may be empty; `generate` sets it)."""

    @abstractmethod
    def check(self, problem: Problem, completion: str) -> bool:
        """True when `completion` (the model's answer to `problem.prompt`) is correct."""

    def key(self, problem: Problem) -> Hashable:
        """What makes two problems the same for the train/test split; the prompt unless overridden."""
        return problem.prompt

    def generate(self, split: str, n: int) -> list[Problem]:
        """The first `n` problems of `split` ("train" or "test"); see the module docstring."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if split == "test":
            if n > self.test_pool_size:
                raise ValueError(f"task {self.name!r} has {self.test_pool_size} test problems; ask for at most "
                                 f"that many (got n={n})")
            return self._pool()[:n]
        return self._train(n)

    def _pool(self) -> list[Problem]:
        if self._test_pool is None:
            rng, keys, pool = random.Random(f"{self.name}/test"), set(), []
            for _ in range(100 * self.test_pool_size):
                if len(pool) == self.test_pool_size:
                    break
                problem = self.draw(rng)
                if self.key(problem) not in keys:
                    keys.add(self.key(problem))
                    pool.append(dataclasses.replace(problem, task_id=f"{self.id_prefix}/{len(pool)}"))
            if len(pool) < self.test_pool_size:
                raise RuntimeError(f"task {self.name!r} could not draw {self.test_pool_size} distinct test problems")
            self._test_pool, self._test_keys = pool, frozenset(keys)
        return self._test_pool

    def _train(self, n: int) -> list[Problem]:
        self._pool()
        rng, problems = random.Random(f"{self.name}/train"), []
        for _ in range(100 * n + 100):
            if len(problems) == n:
                return problems
            problem = self.draw(rng)
            if self.key(problem) not in self._test_keys:
                problems.append(dataclasses.replace(problem, task_id=f"{self.id_prefix}/train/{len(problems)}"))
        raise RuntimeError(f"task {self.name!r}: almost every train draw falls in the test pool")
