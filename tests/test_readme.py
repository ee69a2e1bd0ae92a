"""The README's examples, run as printed on the default model, give the answers the README claims."""
from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_first_command_answers():
    command = re.search(r'&& (dllm generate "[^"]+")\n', README).group(1)
    assert command == 'dllm generate "What is 17 + 25?"'
    exe = shutil.which("dllm")
    args = [exe] if exe else [sys.executable, "-m", "dllm.cli"]
    r = subprocess.run([*args, "generate", "What is 17 + 25?"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "#### 42" in r.stdout and "tokens/s" in r.stderr     # "printing the answer (#### 42 ...) and its tokens/s"


def test_python_api_example_runs_as_printed():
    section = README.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "LLM()" in code                                   # the default model, as the README says
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    lines = printed.getvalue()
    assert "#### 84 stop" in lines and lines.rstrip().endswith("#### 42")


def test_step_by_step_example_runs_as_printed():
    section = README.split("### Step by step", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = io.StringIO()
    scope = {}
    with contextlib.redirect_stdout(printed):
        exec(compile("from dllm import LLM, SamplingParams\n" + code, "README.md", "exec"), scope)
    finished = [e.request_id for e in scope["events"] if e.output is not None]
    assert sorted(finished) == sorted([scope["first"], scope["second"]])
    assert "#### 84" in printed.getvalue() and "#### 42" in printed.getvalue()
    assert not scope["llm"].has_unfinished_requests()
