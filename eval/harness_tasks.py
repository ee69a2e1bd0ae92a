"""The tasks the evaluation runner runs, behind one small interface (`EvalTask`), looked up by name.

A task lists its documents (`docs`, in a fixed order with stable ids), turns one into a prompt (plain text
for completion mode, a list of chat messages for chat mode), names the strings that end a completion
(the runner cuts the completion at the first), scores one completion (a dict: `correct`, `extracted`
and more numeric or boolean fields) and aggregates the score dicts of a run (each with `doc_id`, and
`sample` when there are several samples per document) into metrics. `score` may be called from several
threads at once.

Tasks: "gsm8k" (`eval/gsm8k.py`), "humaneval" (`eval/humaneval.py`), and the generated zoo tasks "arith",
"gsm-lite" and "code-lite" (`eval/tasks/`, their test split) through `ZooEvalTask`. This module knows
nothing about models, tokenizers or decoding.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass
from typing import Protocol

from dllm.errors import InvalidParameterError
from dllm.eval.scoring import extract_strict
from dllm.eval.tasks import TASKS, Problem, Task, get_task, to_messages
from dllm.eval.tasks.code_lite import CodeLiteTask

EVAL_TASKS: tuple[str, ...] = ("gsm8k", "humaneval", "arith", "gsm-lite", "code-lite")
# Imported on first use, so that loading one task never needs another one's packages.
_TASK_CLASSES = {"gsm8k": "dllm.eval.gsm8k:Gsm8kTask", "humaneval": "dllm.eval.humaneval:HumanEvalTask"}


@dataclass(frozen=True)
class Doc:
    """One evaluation document: a stable id ("gsm8k/17", "HumanEval/3", "Arith/5") and the task's data."""
    doc_id: str
    data: dict


class EvalTask(Protocol):
    """What the runner needs from a task; see the module docstring."""
    name: str
    primary_metric: str
    default_chat: bool

    def docs(self, limit: int | None = None) -> list[Doc]: ...

    def prompt(self, doc: Doc, chat: bool) -> str | list[dict]: ...

    def stop_sequences(self, chat: bool) -> list[str]: ...

    def score(self, doc: Doc, completion: str) -> dict: ...

    def aggregate(self, records: list[dict]) -> dict: ...


def mean_of(records: list[dict], field: str) -> float:
    """The mean of `field` over `records` (booleans count as 0 and 1)."""
    if not records:
        raise ValueError("aggregate needs at least one record")
    return sum(float(r[field]) for r in records) / len(records)


class ZooEvalTask:
    """A generated task of `eval/tasks` (its test split) as an `EvalTask`. Chat mode, the default (the zoo
    models are trained on chat messages), asks `to_messages(problem)`; completion mode gives the bare
    problem prompt, with HumanEval's stop sequences for code-lite. Scored by the task's own checker;
    `extracted` is the strict `####` answer (None for code-lite)."""

    primary_metric = "accuracy"
    default_chat = True

    def __init__(self, task: Task) -> None:
        self.task, self.name = task, task.name
        self.uses_sandbox = isinstance(task, CodeLiteTask)   # code-lite runs the programs: summary.json says how

    def docs(self, limit: int | None = None) -> list[Doc]:
        n = self.task.test_pool_size if limit is None else min(limit, self.task.test_pool_size)
        return [Doc(p.task_id, {f.name: getattr(p, f.name) for f in dataclasses.fields(p)})
                for p in self.task.generate("test", n)]

    def prompt(self, doc: Doc, chat: bool) -> str | list[dict]:
        problem = Problem(**doc.data)
        return to_messages(problem) if chat else problem.prompt

    def stop_sequences(self, chat: bool) -> list[str]:
        from dllm.eval.humaneval import BASE_STOP_SEQUENCES  # here, not on top: eval.humaneval imports this module
        return list(BASE_STOP_SEQUENCES) if isinstance(self.task, CodeLiteTask) and not chat else []

    def score(self, doc: Doc, completion: str) -> dict:
        extracted = None if isinstance(self.task, CodeLiteTask) else extract_strict(completion)
        return {"correct": self.task.check(Problem(**doc.data), completion), "extracted": extracted}

    def aggregate(self, records: list[dict]) -> dict:
        return {"accuracy": mean_of(records, "correct")}


def _check_options(name: str, cls: type, options: dict) -> None:
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InvalidParameterError(f"task {name!r} has no option {unknown[0]!r}; its options are: "
                                    f"{', '.join(accepted) or 'none'}")


def get_eval_task(name: str, **options) -> EvalTask:
    """The task called `name` (one of `EVAL_TASKS`), built with `options`:
    gsm8k: data_file, train_file, num_fewshot (5), cot_zeroshot (False), fewshot_as_multiturn (False), seed;
    humaneval: data_file, timeout_s; arith, gsm-lite, code-lite: their task constructor's arguments."""
    if name not in EVAL_TASKS:
        raise InvalidParameterError(f"unknown eval task {name!r}; choose one of: {', '.join(EVAL_TASKS)}")
    if name in TASKS:
        _check_options(name, TASKS[name], options)
        return ZooEvalTask(get_task(name, **options))
    module, cls_name = _TASK_CLASSES[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    _check_options(name, cls, options)
    return cls(**options)
