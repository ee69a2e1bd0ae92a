"""CPU threads: the count torch gets is what the machine can give (OMP_NUM_THREADS wins), checked through the
real `dllm` entry point's log line and on the rule itself."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from dllm.threads import _cgroup_quota, available_cores, choose_threads


def generate_log(tiny_llada, omp: str | None) -> str:
    exe = shutil.which("dllm")
    cmd = [exe] if exe else [sys.executable, "-m", "dllm.cli"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    r = subprocess.run([*cmd, "-v", "generate", "--model", str(tiny_llada), "-p", "hi", "--max-tokens", "8",
                        "--block-length", "8", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       env={**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    return next(line for line in r.stderr.splitlines() if "CPU thread" in line)


def test_omp_num_threads_is_honoured(tiny_llada):
    assert "using 1 CPU thread(s) (OMP_NUM_THREADS)" in generate_log(tiny_llada, "1")


def test_without_omp_num_threads_the_count_fits_the_machine(tiny_llada):
    line = generate_log(tiny_llada, None)
    threads = int(line.split("using ")[1].split()[0])
    assert 1 <= threads <= available_cores() and "usable core(s), load" in line


@pytest.mark.parametrize("cores,busy,default,want", [
    (2, 0.0, 2, 2),       # an idle machine: every core
    (2, 1.2, 2, 1),       # another engine holds a core
    (2, 7.0, 2, 1),       # overloaded: still one
    (16, 3.4, 8, 8),      # never above torch's own default (physical cores)
    (16, 3.6, 16, 12),
])
def test_choose_threads(cores, busy, default, want):
    assert choose_threads(cores, busy, default) == want


def test_cgroup_quota(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("max 100000\n")
    assert _cgroup_quota(f) is None
    f.write_text("250000 100000\n")
    assert _cgroup_quota(f) == 2
    assert _cgroup_quota(tmp_path / "missing") is None
