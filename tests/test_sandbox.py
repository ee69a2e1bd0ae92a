"""The sandbox for model-generated code (CPU, fast): hostile programs are contained, scored as failures, and
leave the harness (this test process) and the file system alone, with and without namespaces.

Each behaviour runs in every isolation tier: "bwrap" (bubblewrap; CI installs it), "namespaces" (user, network
and pid namespaces through `unshare`, bwrap left out) and "process" (the same sandbox without either).
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from dllm.errors import InvalidParameterError
from dllm.eval import sandbox
from dllm.eval.sandbox import SandboxLimits, run_many, run_sandboxed

FAST = SandboxLimits(timeout_s=5.0)


@pytest.fixture(params=["bwrap", "namespaces", "process"])
def tier(request, monkeypatch):
    if request.param == "bwrap" and not sandbox._bwrap():
        pytest.fail("bwrap (bubblewrap) must be installed for the sandbox tests: apt-get install bubblewrap")
    if request.param == "namespaces" and not sandbox._namespace_prefix():
        pytest.skip("unshare --user --net --pid does not work on this machine")
    if request.param != "bwrap":
        monkeypatch.setattr(sandbox, "_bwrap", lambda: None)
    if request.param == "process":
        monkeypatch.setattr(sandbox, "_namespace_prefix", lambda: ())
    assert sandbox.isolation() == request.param
    return request.param


def run(program: str, limits: SandboxLimits = FAST):
    return run_sandboxed(program, limits)


def test_passing_failing_and_exit_codes(tier):
    ok = run("print('hello')\n")
    assert (ok.status, ok.returncode, ok.passed) == ("passed", 0, True)
    failed = run("assert 1 + 1 == 3, 'arithmetic'\n")
    assert failed.status == "failed" and failed.returncode == 1 and "AssertionError: arithmetic" in failed.stderr_tail
    assert run("raise SystemExit(3)\n").returncode == 3
    assert run("def f(:\n").status == "failed"


@pytest.mark.parametrize("early_exit", ["import sys; sys.exit(0)", "import os; os._exit(0)", "exit()", "quit(0)"])
def test_exit_zero_before_the_end_is_a_failure(tier, early_exit):
    result = run(f"{early_exit}\nraise AssertionError('the checks')\n")
    assert result.status == "failed" and result.returncode == 0


def test_main_guard_does_not_run(tier):
    assert run("if __name__ == '__main__':\n    raise SystemExit(1)\n").passed


def test_infinite_loop_times_out(tier):
    start = time.monotonic()
    result = run("while True:\n    pass\n", SandboxLimits(timeout_s=1.0))
    assert (result.status, result.returncode) == ("timeout", None) and not result.passed
    assert 1.0 <= result.seconds < 3.0 and time.monotonic() - start < 4.0


def test_cpu_limit_kills(tier):
    result = run("while True:\n    pass\n", SandboxLimits(timeout_s=10.0, cpu_s=1))
    assert result.status == "killed" and result.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    assert result.seconds < 5.0


def test_fork_bomb_is_contained(tier):
    for bomb in ("import os\nwhile True:\n    os.fork()\n",
                 "import subprocess\nwhile True:\n    subprocess.Popen(['python3', '-c', 'pass'])\n",
                 "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()\n",
                 "import os\nos.system('sleep 100 &')\n"):
        result = run(bomb)
        assert result.status == "failed" and "PermissionError: sandbox" in result.stderr_tail, result
        assert result.seconds < 3.0


def test_huge_allocation_fails(tier):
    result = run("block = bytearray(8 << 30)\n")
    assert result.status == "failed" and "MemoryError" in result.stderr_tail
    assert run("block = bytearray(64 << 20)\n").passed         # within the default 1 GiB


def test_output_is_truncated_and_file_size_bounded(tier):
    noisy = run("import sys\nsys.stderr.write('x' * 10000 + 'END')\n")
    assert noisy.passed and len(noisy.stderr_tail) == sandbox.STDERR_TAIL_CHARS and noisy.stderr_tail.endswith("END")
    flood = run("while True:\n    print('y' * 100000)\n", SandboxLimits(timeout_s=10.0, file_size_mb=1))
    assert flood.status == "failed" and "File too large" in flood.stderr_tail


def test_writes_outside_the_working_directory_are_refused(tier, tmp_path):
    target = tmp_path / "escaped.txt"
    attempts = [f"open({str(target)!r}, 'w').write('x')",
                f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
                f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
                f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
                f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.mkdir('escaped.txt', dir_fd=fd)",
                f"import shutil\nshutil.copyfile('/etc/hostname', {str(target)!r})"]
    for program in attempts:
        result = run(program)
        assert result.status == "failed", (program, result)
        # bwrap: the host's /tmp is not even visible (an empty read-only /tmp); elsewhere the audit hook refuses
        assert tier == "bwrap" or "PermissionError: sandbox" in result.stderr_tail, (program, result)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    for program in (f"import os\nos.remove({str(keep)!r})", f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                    f"import os\nos.rename({str(keep)!r}, 'stolen.txt')"):
        assert not run(program).passed
    assert keep.read_text() == "mine"


def test_working_directory_is_fresh_writable_and_removed(tier):
    result = run("import os, sys\nassert os.listdir('.') == ['program.py'], os.listdir('.')\n"
                 "open('scratch.txt', 'w').write('ok')\nos.mkdir('sub')\nos.remove('scratch.txt')\n"
                 "sys.stderr.write(os.getcwd())\n")
    assert result.passed, result.stderr_tail
    assert not os.path.exists(result.stderr_tail)


def test_killing_the_parent_cannot_hurt_the_harness(tier):
    result = run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
    assert not result.passed
    harness = os.getpid()
    assert run(f"import os\nassert os.getppid() != {harness}\n").passed       # the parent is the supervisor
    assert not run(f"import os, signal\nos.kill({harness}, signal.SIGKILL)\n").passed
    assert not run("import os, signal\nos.killpg(0, signal.SIGKILL)\n").passed
    killed = run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert (killed.status, killed.returncode) == ("killed", -signal.SIGKILL)


def test_environment_is_minimal_and_secrets_stay_out(tier, monkeypatch):
    monkeypatch.setenv("DLLM_TEST_SECRET", "hunter2")
    result = run("import os, sys\nassert sorted(os.environ) == ['LANG', 'PATH', 'PYTHONHASHSEED'], sorted(os.environ)\n"
                 "assert sys.flags.isolated and sys.stdin.read() == ''\n")
    assert result.passed, result.stderr_tail
    spy = run(f"try:\n    data = open('/proc/{os.getpid()}/environ', 'rb').read()\nexcept PermissionError:\n"
              f"    data = b''\nassert b'hunter2' not in data\n")
    assert spy.passed, spy.stderr_tail


def test_network_is_cut(tier):
    result = run("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert result.status == "failed" and "PermissionError: sandbox: socket" in result.stderr_tail
    if tier in ("namespaces", "bwrap"):  # an empty network namespace (only a loopback that is down) and a pid one
        check = ("import os\ndevices = [l.split(':')[0].strip() for l in open('/proc/self/net/dev').readlines()[2:]]\n"
                 f"assert devices == ['lo'], devices\nassert os.getppid() == {1 if tier == 'namespaces' else 2}, os.getppid()\n")
        assert run(check).passed


def test_ctypes_cannot_reach_libc_but_numpy_style_import_works(tier):
    assert run("import ctypes\nctypes.c_int(3)\n").passed
    for program in ("import ctypes\nctypes.CDLL(None).fork()\n", "import ctypes\nctypes.CDLL('libc.so.6')\n"):
        assert "PermissionError: sandbox: ctypes" in run(program).stderr_tail
    assert "PermissionError" in run("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n").stderr_tail


def test_run_many_keeps_order_and_isolates_runs():
    programs = [f"assert {i} % 3 != 0\n" for i in range(12)] + ["while True:\n    pass\n"]
    results = run_many(programs, SandboxLimits(timeout_s=1.0), workers=4)
    assert [r.passed for r in results[:12]] == [i % 3 != 0 for i in range(12)]
    assert results[12].status == "timeout"


def test_limits_are_validated():
    for bad in ({"timeout_s": 0}, {"memory_mb": -1}, {"max_processes": 0}, {"cpu_s": 0}):
        with pytest.raises(InvalidParameterError):
            SandboxLimits(**bad)
    assert SandboxLimits(timeout_s=2.5).for_prelude()["cpu_s"] == 3
