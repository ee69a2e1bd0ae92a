"""Chat messages for a problem, so training and evaluation render prompts with the tokenizer's chat template.

`to_messages(problem)` is the single user turn with the problem's prompt (what a model is asked at
evaluation time, with `add_generation_prompt=True`); `to_messages(problem, include_target=True)` adds the
assistant turn with the worked solution (a training example).
"""
from __future__ import annotations

from dllm.eval.tasks.base import Problem


def to_messages(problem: Problem, include_target: bool = False) -> list[dict[str, str]]:
    """`[{"role": "user", "content": prompt}]`, plus `{"role": "assistant", "content": target}` if asked."""
    messages = [{"role": "user", "content": problem.prompt}]
    if include_target:
        messages.append({"role": "assistant", "content": problem.target})
    return messages
