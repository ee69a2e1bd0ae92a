"""Running a generated Python program in a separate process: the one place code-lite executes code.

`run_program(program, timeout_s)` writes `program` to a fresh temporary directory and runs it there with
this interpreter in isolated mode (`python -I`: no user site, no `PYTHON*` variables, no script directory
on `sys.path`), a minimal environment, no stdin, in its own session so a timeout kills every child it
started. It is a process boundary, not a sandbox: the eval harness replaces this function with one before
running untrusted model output at scale.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_ENV = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


@dataclass(frozen=True)
class ExecutionResult:
    """`passed`: exit status 0 within the time limit; `stderr_tail`: the last 2000 characters of stderr."""
    passed: bool
    returncode: int | None
    timed_out: bool
    stderr_tail: str


def run_program(program: str, timeout_s: float = 5.0) -> ExecutionResult:
    """Run `program` as a script in a fresh temporary directory; see the module docstring."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    with tempfile.TemporaryDirectory(prefix="dllm-exec-") as workdir:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with open(os.path.join(workdir, "stderr.txt"), "w+", encoding="utf-8", errors="replace") as err:
            proc = subprocess.Popen([sys.executable, "-I", "program.py"], cwd=workdir, env=_ENV,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            try:
                returncode, timed_out = proc.wait(timeout=timeout_s), False
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:      # it ended between the timeout and the kill
                    pass
                returncode, timed_out = proc.wait(), True
            err.seek(0)
            tail = err.read()[-2000:]
    return ExecutionResult(returncode == 0 and not timed_out, None if timed_out else returncode, timed_out, tail)
