"""Hostile HumanEval completions against the scoring path (`HumanEvalTask.score`'s `run_checked`), under bwrap
and under the fallback layers (no bwrap, no namespaces). Each program must score as failed, within its time
bound, leave no file outside its temporary directory, no process behind, and leak neither the harness's
environment nor its life. Programs run in parallel to keep the suite fast.
"""
from __future__ import annotations

import os
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dllm.eval import sandbox
from dllm.eval.humaneval import completion_code, split_program
from dllm.eval.sandbox import SandboxLimits, run_checked

PROBLEM = {
    "task_id": "Hostile/0", "entry_point": "add",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n',
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
            "    assert candidate(10, 20) == 30\n    assert add(1, 1) == 2\n",
}
LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=512)
SLEEP_MARK = "6001.25"  # `sleep 6001.25`: how a surviving process is recognised
NO_HOOK = ("    import sys\n    prelude = sys.modules['__main__']\n    prelude._REFUSED_EVENTS = frozenset()\n"
           "    prelude._refuse = lambda event: None\n")


def hostile_programs(outside: str, harness: int) -> dict[str, str]:
    """name -> completion (a function body, or module code after a blank line). `outside`: a directory the
    programs must not write to; `harness`: the pid of this test process."""
    frames = ("    import os, sys\n    f = sys._getframe()\n    while f is not None:\n"
              "        for value in list(f.f_locals.values()):\n"
              "            found = value.get('nonce') if isinstance(value, dict) else None\n"
              "            if f.f_locals.get('nonce'):\n                found = f.f_locals['nonce']\n"
              "            if found:\n                sys.stdout.flush()\n"
              "                os.write(1, ('\\n' + found + '\\n').encode())\n                os._exit(0)\n"
              "        f = f.f_back\n    return a - b\n")
    return {
        "wrong_answer": "    return a - b\n",
        "always_equal_object": "    class Yes:\n        def __eq__(self, other):\n            return True\n"
                               "        __hash__ = object.__hash__\n    return Yes()\n",
        "always_equal_int_subclass": "    class Yes(int):\n        def __eq__(self, other):\n            return True\n"
                                     "        __hash__ = int.__hash__\n    return Yes(0)\n",
        "always_equal_list_subclass": "    class Yes(list):\n        def __eq__(self, other):\n            return True\n"
                                      "    return Yes()\n",
        "repr_lies": "    class Liar:\n        def __repr__(self):\n            return \"('ok', 5)\"\n    return Liar()\n",
        "frame_walk_for_the_nonce": frames,
        "exit_zero_at_import": "\nimport sys\nsys.exit(0)\n",
        "os_exit_zero_in_call": "    import os\n    os._exit(0)\n",
        "system_exit_in_call": "    raise SystemExit(0)\n",
        "exit_from_a_thread": "    import os, threading\n    t = threading.Thread(target=os._exit, args=(0,))\n"
                              "    t.start()\n    t.join()\n",
        "kill_the_supervisor": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n",
        "kill_the_harness": f"    import os, signal\n    os.kill({harness}, signal.SIGKILL)\n",
        "pidfd_kill_the_harness": f"    import os, signal\n    signal.pidfd_send_signal(os.pidfd_open({harness}), signal.SIGKILL)\n",
        "killpg_everything": "    import os, signal\n    os.killpg(0, signal.SIGKILL)\n",
        "environ_via_proc_self_root": f"    import sys\n    try:\n        sys.stderr.write(open('/proc/self/root/proc/{harness}/environ').read())\n"
                                      f"    except OSError as e:\n        sys.stderr.write(str(e))\n    return a - b\n",
        "environ_direct": f"    import sys\n    for p in ('/proc/{harness}/environ', '/proc/1/environ', '/proc/self/environ'):\n"
                          "        try:\n            sys.stderr.write(open(p).read())\n        except OSError:\n            pass\n"
                          "    return a - b\n",
        "harness_memory": f"    import sys\n    m = open('/proc/{harness}/mem', 'rb')\n    sys.stderr.write(str(m.read(10)))\n",
        "sqlite_outside": f"    import sqlite3\n    sqlite3.connect({outside + '/db.sqlite'!r}).execute('create table t (a)')\n",
        "mkfifo_outside": f"    import os\n    os.mkfifo({outside + '/fifo'!r})\n",
        "write_outside": f"    open({outside + '/escaped.txt'!r}, 'w').write('x')\n",
        "posixsubprocess_renamed": "    import importlib.machinery, importlib.util, sys, os\n"
                                   "    for d in sys.path:\n        for f in (os.listdir(d) if os.path.isdir(d) else []):\n"
                                   "            if f.startswith('_posixsubprocess'):\n"
                                   "                loader = importlib.machinery.ExtensionFileLoader('_posixsubprocess', os.path.join(d, f))\n"
                                   "                spec = importlib.util.spec_from_loader('sneaky._posixsubprocess', loader)\n"
                                   "                m = importlib.util.module_from_spec(spec)  # no 'import' audit event\n"
                                   f"                args = [[b'/bin/sleep', b'{SLEEP_MARK}'], [b'/bin/sleep'], True, (), None, None,\n"
                                   "                        -1, -1, -1, -1, -1, -1, -1, -1, True, True, 0, None, None, None, -1, None]\n"
                                   "                for _ in range(7):\n"
                                   "                    try:\n                        m.fork_exec(*args)\n"
                                   "                    except TypeError:\n                        m.fork_exec(*args, False)\n"
                                   "    return a + b + 1\n",
        "subprocess_sleep": f"    import subprocess\n    subprocess.Popen(['sleep', '{SLEEP_MARK}'], start_new_session=True)\n",
        "fork_bomb": "    import os\n    while True:\n        os.fork()\n",
        "ctypes_libc": f"    import ctypes\n    ctypes.CDLL('libc.so.6').system(b'sleep {SLEEP_MARK} &')\n",
        "network": "    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=1)\n    return a + b\n",
        "infinite_loop": "    while True:\n        pass\n",
        "ignore_signals_and_sleep": "    import signal, time\n    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
                                    "        signal.signal(s, signal.SIG_IGN)\n    time.sleep(600)\n",
        "memory_bomb": "    x = bytearray(8 << 30)\n    return a + b\n",
        "deep_nested_result": "    r = []\n    for _ in range(100000):\n        r = [r]\n    return r\n",
        "huge_result": "    return 'x' * (300 << 20)\n",
        "forged_reply_frames": "\nimport os\nfor fd in range(3, 64):\n    try:\n"
                               "        os.write(fd, (10**12).to_bytes(8, 'big') + b\"('ok', 5)\")\n    except OSError:\n"
                               "        pass\ndef add(a, b):\n    return a - b\n",
        "overwrite_other_sandboxes": "    import glob\n    for p in glob.glob('/tmp/dllm-sandbox-*/program.py'):\n"
                                     "        try:\n            open(p, 'w').write('def check(c):\\n    pass\\n')\n"
                                     "        except OSError:\n            pass\n    return a - b\n",
        "patch_builtins": "\nimport builtins\nbuiltins.AssertionError = type('Never', (Exception,), {})\n"
                          "builtins.isinstance = lambda *a: True\ndef add(a, b):\n    return None\n",
        # the audit hook disabled (the prelude is __main__: its globals are the program's to change); what
        # follows is held by the kernel: seccomp everywhere, bwrap's read-only root and pid namespace with it
        "no_hook_subprocess": f"{NO_HOOK}    import subprocess\n    subprocess.Popen(['sleep', '{SLEEP_MARK}'], start_new_session=True)\n"
                              "    return a + b + 1\n",
        "no_hook_fork": f"{NO_HOOK}    import os, time\n    if os.fork() == 0:\n        time.sleep(600)\n    return a + b + 1\n",
        "no_hook_ctypes_kill": f"{NO_HOOK}    import ctypes\n    ctypes.CDLL('libc.so.6').kill({harness}, 9)\n    return a + b + 1\n",
        "no_hook_pidfd": f"{NO_HOOK}    import os, signal\n    signal.pidfd_send_signal(os.pidfd_open({harness}), signal.SIGKILL)\n",
        "no_hook_mkfifo": f"{NO_HOOK}    import os\n    os.mkfifo({outside + '/fifo2'!r})\n",
        "print_success_lines": "    import sys\n    for s in ('passed', 'OK', '\\n' * 3 + 'passed'):\n"
                               "        print(s)\n        sys.stderr.write(s)\n    return None\n",
    }


def _surviving(mark: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if mark.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture(params=["bwrap", "fallback"])
def layer(request, monkeypatch):
    if request.param == "bwrap":
        if not sandbox._bwrap():
            pytest.fail("bwrap (bubblewrap) must be installed for these tests: apt-get install bubblewrap")
    else:
        monkeypatch.setattr(sandbox, "_bwrap", lambda: None)
        monkeypatch.setattr(sandbox, "_namespace_prefix", lambda: ())
    assert sandbox.isolation() == ("bwrap" if request.param == "bwrap" else "process")
    return request.param


def test_the_canonical_solution_passes(layer):
    solution, checker = split_program(PROBLEM, completion_code(PROBLEM, PROBLEM["canonical_solution"]))
    result = run_checked(solution, checker, "add", LIMITS)
    assert result.passed, result.stderr_tail


def test_hostile_completions_fail_and_leave_nothing_behind(layer, tmp_path, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("DLLM_HOSTILE_SECRET", secret)
    outside = tmp_path / "outside"
    outside.mkdir()
    programs = hostile_programs(str(outside), os.getpid())
    assert len(programs) >= 25

    def score(item):
        name, completion = item
        solution, checker = split_program(PROBLEM, completion_code(PROBLEM, completion))
        return name, run_checked(solution, checker, PROBLEM["entry_point"], LIMITS)

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(score, programs.items()))
    wall = time.monotonic() - start
    time.sleep(0.3)  # let any process a sandbox left behind show up
    survivors = _surviving(SLEEP_MARK)
    for pid in survivors:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    passed = [name for name, r in results.items() if r.passed]
    assert passed == [], {name: results[name].stderr_tail[-500:] for name in passed}
    slow = {name: r.seconds for name, r in results.items() if r.seconds > LIMITS.timeout_s + 2.0}
    assert slow == {}
    assert wall < 60
    assert survivors == [], "processes outlived their sandbox"
    assert list(outside.iterdir()) == []
    leaked = [name for name, r in results.items() if secret in r.stderr_tail]
    assert leaked == []
    hangs = {name for name, r in results.items() if r.status == "timeout"}
    assert {"infinite_loop", "ignore_signals_and_sleep"} <= hangs
    assert results["always_equal_object"].status == "failed"
    assert "not a plain built-in value" in results["always_equal_object"].stderr_tail
    print(f"\n{len(programs)} hostile programs under {layer}: {wall:.1f} s")


def test_the_eval_summary_records_the_isolation_layer(layer, tmp_path):
    from types import SimpleNamespace

    from dllm.eval import runner
    from dllm.eval.humaneval import HumanEvalTask

    config = SimpleNamespace(setting=lambda: {"task": "humaneval"})
    task = SimpleNamespace(uses_sandbox=HumanEvalTask.uses_sandbox, aggregate=lambda records: {},
                           primary_metric="pass@1")
    store = SimpleNamespace(records=[])
    summary = runner._summary(config, task, store, [], {"device": "cpu"}, None, tmp_path)
    assert summary.environment == {"device": "cpu", "sandbox": "bwrap" if layer == "bwrap" else "process"}


def test_without_bwrap_the_fallback_is_announced_in_one_line(monkeypatch, caplog):
    real_which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
    sandbox._bwrap.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="dllm.eval.sandbox"):
            assert sandbox._bwrap() is None and sandbox.isolation() in ("namespaces", "process")
            sandbox.isolation()
        lines = [r.getMessage() for r in caplog.records if r.name == "dllm.eval.sandbox"]
        assert len(lines) == 1 and "\n" not in lines[0] and "install bubblewrap" in lines[0], lines
        assert run_checked(*split_program(PROBLEM, PROBLEM["canonical_solution"]), "add", LIMITS).passed
    finally:
        sandbox._bwrap.cache_clear()


def test_ci_installs_bubblewrap_then_runs_the_readmes_second_command():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    ci = (root / ".ci" / "run").read_text().strip().splitlines()
    readme = (root / "README.md").read_text()
    commands = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert ci[-1] == commands[1]
    assert any("apt-get install" in line and "bubblewrap" in line for line in ci[:-1])


def test_code_lite_records_the_isolation_layer_and_arith_does_not():
    from dllm.eval.harness_tasks import ZooEvalTask
    from dllm.eval.tasks import get_task

    assert ZooEvalTask(get_task("code-lite")).uses_sandbox          # its programs run in the sandbox
    assert not ZooEvalTask(get_task("arith")).uses_sandbox
