"""Generated tasks with checkers (arith, gsm-lite, code-lite), looked up by name. See `base.py` for the
`Problem` record and the `Task` interface (deterministic, disjoint train/test generation; `check`)."""
from dllm.eval.tasks.arith import ArithTask
from dllm.eval.tasks.base import Problem, Task
from dllm.eval.tasks.chat import to_messages
from dllm.eval.tasks.code_lite import CodeLiteTask, humaneval_record
from dllm.eval.tasks.gsm_lite import GsmLiteTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (ArithTask, GsmLiteTask, CodeLiteTask)}


def get_task(name: str, **options) -> Task:
    """A new instance of the task called `name`, built with `options` (its constructor's arguments)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name](**options)


__all__ = ["TASKS", "Problem", "Task", "get_task", "humaneval_record", "to_messages"]
