"""Running a generated Python program for code-lite's checker: `eval/sandbox.py` with a code-lite timeout.

`run_program(program, timeout_s)` runs `program` in the sandbox (a fresh temporary directory, `python -I`,
a minimal environment, no stdin, resource limits, an audit hook, namespaces where the machine allows; see
`eval/sandbox.py`) and reports the outcome as an `ExecutionResult`.
"""
from __future__ import annotations

from dataclasses import dataclass

from dllm.eval.sandbox import SandboxLimits, run_sandboxed


@dataclass(frozen=True)
class ExecutionResult:
    """`passed`: the program ran to its end and exited 0 within the time limit; `returncode`: its exit
    status (negative for a signal, None after a timeout); `stderr_tail`: the last 2000 characters of stderr."""
    passed: bool
    returncode: int | None
    timed_out: bool
    stderr_tail: str


def run_program(program: str, timeout_s: float = 5.0) -> ExecutionResult:
    """Run `program` in the sandbox with a wall-clock limit of `timeout_s` seconds (and default limits)."""
    result = run_sandboxed(program, SandboxLimits(timeout_s=timeout_s))
    return ExecutionResult(result.passed, result.returncode, result.status == "timeout", result.stderr_tail)
