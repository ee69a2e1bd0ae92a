"""Running untrusted, model-generated Python: one sandboxed process per program (two for scoring).

`run_sandboxed(program, limits)` writes `program` to `program.py` in a fresh temporary directory (deleted
afterwards) and runs it there through `sandbox_prelude.py` (`python -I -B`: no user site, no `PYTHON*`
variables, no bytecode files). It returns a `SandboxResult` whose status is

- "passed": the program ran to its end (the prelude printed the run's nonce after it) and exited 0;
- "failed": an exception, a failed assert, a non-zero exit, or an early exit (`sys.exit(0)`, `os._exit(0)`)
  before the end. Python turns two of the limits into exceptions, so they are "failed" too: the memory
  limit raises `MemoryError`, the file-size limit `OSError` (EFBIG; Python ignores SIGXFSZ);
- "timeout": still running after `limits.timeout_s` of wall-clock time; its whole process group was killed;
- "killed": ended by a signal (the CPU limit: SIGXCPU, then SIGKILL; the kernel's OOM killer; a crash; the
  program signalling itself). A program that exits with a status above 128 is reported as "killed" too.

The nonce guards against early exits, not against a program that reads it from its own process.

Scoring: `run_checked(solution, checker, entry_point, limits)` runs the untrusted solution (HumanEval's prompt
and completion) and the trusted checker (the prompt's helpers and the test's `check`) in two sandboxes joined
only by two pipes. The checker's `candidate` sends each call's arguments to the solution and parses the reply
with `ast.literal_eval`, so `check`'s asserts see plain built-in values only (a permissive `__eq__` never
reaches them); "passed" is the checker's exit status 0 after `check` returned. There is no nonce to forge, and
the solution cannot reach the checker: under bwrap it lives in another pid namespace; in the fallback the
seccomp filter refuses signals, pidfds, ptrace and process_vm_* towards it.

`run_many(programs, limits, workers)` runs a list of programs on a thread pool, each in its own process.

Layers, from the outside in:
1. bwrap (bubblewrap), when installed and working (probed once; otherwise one warning line and the layers
   below): the host's root read-only, fresh read-only /dev, a /proc of the sandbox's own pid namespace, an
   empty read-only /tmp holding the program's directory at /tmp/sandbox (the only writable path), fresh
   user, pid, network, IPC and UTS namespaces, uid 65534, a cleared environment, a new session, and
   `--die-with-parent`: when the harness kills it, every process of the sandbox dies.
2. Without bwrap, namespaces when `unshare --user --net --pid --fork` works here (probed once): no network,
   no capabilities outside, a pid namespace.
3. Process: a new session and process group (killed as a whole at the timeout and after every run), an
   environment of PATH, LANG and PYTHONHASHSEED only, stdin at EOF, stdout and stderr in files of which only
   the tail is read, a fresh working directory, and a supervisor process between the harness and the program.
4. Resource limits set in the program's process before any of its code runs: RLIMIT_AS (memory),
   RLIMIT_CPU (`cpu_s`, default the timeout + 1 s), RLIMIT_FSIZE (also bounds stdout/stderr),
   RLIMIT_NPROC and RLIMIT_CORE = 0. They are set by the prelude rather than in a `preexec_fn`, because
   `preexec_fn` is not safe in a process with threads and the runner calls us from a thread pool.
5. A seccomp filter (x86-64, arm64): no process creation but threads, no exec, no signals to other
   processes, no pidfds, ptrace or process_vm_*, no FIFOs or device nodes. Kernel-enforced in every tier.
6. An audit hook (`sandbox_prelude.make_guard`): no writes outside the working directory, no sockets, no
   process creation, no loading libraries through ctypes, no sqlite files outside, no raising limits, no
   signals to other processes, no reading other processes' /proc entries. Not a security boundary.

`isolation()` names the outermost active layer: "bwrap", "namespaces" or "process".
Platform: Linux (other systems are not supported); waiting uses a pidfd (Linux >= 5.3), else polling.
Not guaranteed: reading files the user can read (outside /tmp under bwrap); in the fallback tiers, file-system
confinement and other processes' /proc entries are protected by the audit hook alone (see README, "The sandbox").
"""
from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dllm.errors import InvalidParameterError

logger = logging.getLogger(__name__)

STDERR_TAIL_CHARS = 2000
SANDBOX_DIR = "/tmp/sandbox"  # the program's working directory inside bwrap
_PRELUDE = Path(__file__).with_name("sandbox_prelude.py")
_ENV = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
_NAMESPACE_FLAGS = ("--user", "--net", "--pid", "--fork", "--kill-child")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits: wall-clock seconds; address space and file size in MiB; RLIMIT_NPROC, which the
    kernel counts over every process and thread of the user (of the sandbox's user namespace when
    namespaces are on) and does not apply to root, so without namespaces a user who already runs more
    than `max_processes` tasks leaves programs unable to start a thread; CPU seconds, by default the
    timeout plus one second."""
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 64
    cpu_s: int | None = None

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "file_size_mb", "max_processes"):
            if not getattr(self, name) > 0:
                raise InvalidParameterError(f"sandbox {name} must be positive, got {getattr(self, name)}")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise InvalidParameterError(f"sandbox cpu_s must be at least 1 (or None), got {self.cpu_s}")

    def for_prelude(self) -> dict[str, int]:
        cpu_s = self.cpu_s if self.cpu_s is not None else int(self.timeout_s) + 1
        return {"memory_bytes": self.memory_mb << 20, "cpu_s": cpu_s, "file_size_bytes": self.file_size_mb << 20,
                "max_processes": self.max_processes}


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended; see the module docstring for the four statuses."""
    status: str
    returncode: int | None      # the program's exit status, negative for a signal; None after a timeout
    seconds: float
    stderr_tail: str            # the last STDERR_TAIL_CHARS characters of stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def _namespace_prefix() -> tuple[str, ...]:
    """The `unshare` command line that puts a process in fresh user, network and pid namespaces, or ()
    when this machine does not allow it (no `unshare`, not Linux, user namespaces disabled or filtered)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    prefix = (unshare, *_NAMESPACE_FLAGS)
    try:
        probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], env=_ENV, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if probe.returncode == 0 else ()


@functools.cache
def _bwrap() -> str | None:
    """The path of a working `bwrap` (bubblewrap), or None (not installed, or user namespaces refused here);
    without it the sandbox falls back to the layers below, with a one-line warning."""
    bwrap = shutil.which("bwrap")
    if bwrap is not None:
        with tempfile.TemporaryDirectory(prefix="dllm-sandbox-") as probe_dir:
            try:
                probe = subprocess.run([*_bwrap_prefix(bwrap, probe_dir), sys.executable, "-I", "-c", "pass"],
                                       env=_ENV, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
                if probe.returncode == 0:
                    return bwrap
                reason = probe.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
                reason = f"bwrap does not work here ({reason[0]})"
            except (OSError, subprocess.TimeoutExpired) as exc:
                reason = f"bwrap does not work here ({exc})"
    else:
        reason = "bwrap (bubblewrap) is not installed"
    logger.warning("sandbox: %s; untrusted programs run with the weaker fallback layers (%s): install "
                   "bubblewrap (apt-get install bubblewrap) before running untrusted code", reason,
                   "namespaces" if _namespace_prefix() else "process")
    return None


def _bwrap_prefix(bwrap: str, workdir: str) -> list[str]:
    """bwrap's command line: the host's root read-only, a fresh /dev (read-only) and /proc (of the new pid
    namespace, not the host's), an empty read-only /tmp holding the program's directory `workdir` at
    SANDBOX_DIR (the only writable path), fresh user, pid, network, IPC and UTS namespaces, an unprivileged uid,
    no environment, a new session, and death with the harness."""
    keep = []  # the interpreter and this package, when they live under /tmp (which the sandbox hides)
    for path in {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), str(_PRELUDE.parent)}:
        real = os.path.realpath(path)
        if real == "/tmp" or real.startswith("/tmp/"):
            keep += ["--ro-bind", real, real]
    env = [arg for name, value in _ENV.items() for arg in ("--setenv", name, value)]
    return [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", *keep, "--bind", workdir, SANDBOX_DIR, "--remount-ro", "/tmp", "--chdir", SANDBOX_DIR,
            "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--hostname", "sandbox", "--uid", "65534", "--gid", "65534", "--die-with-parent", "--new-session",
            "--clearenv", *env, "--"]


def isolation() -> str:
    """The outermost layer active here: "bwrap" (bubblewrap: read-only root, private temp directory, fresh
    user/pid/net/ipc/uts namespaces), "namespaces" (`unshare`: user, network and pid namespaces) or "process"
    (a process group, rlimits and the audit hook only)."""
    if _bwrap():
        return "bwrap"
    return "namespaces" if _namespace_prefix() else "process"


def _command(workdir: str) -> list[str]:
    bwrap = _bwrap()
    if bwrap:
        return [*_bwrap_prefix(bwrap, workdir), sys.executable, "-I", "-B", str(_PRELUDE)]
    return [*_namespace_prefix(), sys.executable, "-I", "-B", str(_PRELUDE)]


def _tail(f, num_bytes: int) -> bytes:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - num_bytes))
    return f.read()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):     # the group is already gone
        pass


def _exits_within(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `proc` to exit. A pidfd (Linux >= 5.3) wakes us the moment it does;
    elsewhere `Popen.wait` polls, with sleeps of up to 50 ms."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(pidfd)


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for `proc`; at the timeout kill its process group. Also kills what it left behind in the group.
    True when it timed out."""
    timed_out = not _exits_within(proc, timeout_s)
    _kill_group(proc.pid)
    proc.wait()
    return timed_out


def _status(returncode: int, completed: bool) -> tuple[str, int]:
    """(status, returncode with signals negative) from the supervisor's exit status (128 + N for signal N)."""
    if returncode < 0 or returncode > 128:
        return "killed", returncode if returncode < 0 else 128 - returncode
    return ("passed" if returncode == 0 and completed else "failed"), returncode


def _start(workdir: str, config: dict, out, err, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """The prelude in `workdir` under the active layers, its configuration written to its stdin."""
    proc = subprocess.Popen(_command(workdir), cwd=workdir, env=_ENV, stdin=subprocess.PIPE, stdout=out, stderr=err,
                            start_new_session=True, pass_fds=pass_fds)
    try:
        proc.stdin.write((json.dumps(config) + "\n").encode())
        proc.stdin.close()
    except BrokenPipeError:         # it died before reading its configuration; the exit status says why
        pass
    return proc


def run_sandboxed(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `program` in a sandbox under `limits`; see the module docstring. Thread-safe.

    "passed" here means the program ran to its end: a guard against early exits, not against a program that
    forges the end marker (it lives in the program's own process). Scoring uses `run_checked`."""
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dllm-sandbox-", ignore_cleanup_errors=True) as workdir, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        proc = _start(workdir, {"mode": "program", "nonce": nonce, "limits": limits.for_prelude()}, out, err)
        timed_out = _wait(proc, limits.timeout_s)
        seconds = time.monotonic() - start
        completed = _tail(out, 64).endswith(f"\n{nonce}\n".encode())
        stderr_tail = _tail(err, 4 * STDERR_TAIL_CHARS).decode("utf-8", "replace")[-STDERR_TAIL_CHARS:]
    if timed_out:
        return SandboxResult("timeout", None, seconds, stderr_tail)
    status, returncode = _status(proc.returncode, completed)
    return SandboxResult(status, returncode, seconds, stderr_tail)


def run_checked(solution: str, checker: str, entry_point: str,
                limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Score `solution` (untrusted: it defines `entry_point`) against `checker` (trusted test code that defines
    `check(candidate)`) in two sandboxes that cannot reach each other; see "Scoring" in the module docstring.
    "passed" is decided by the checker's process alone: its `check` returned. Thread-safe."""
    start = time.monotonic()
    ask_r, ask_w = os.pipe()        # checker -> solution: the arguments of each call
    reply_r, reply_w = os.pipe()    # solution -> checker: each result, as a Python literal
    fds = {"solution": (ask_r, reply_w), "checker": (reply_r, ask_w)}  # (read, write) ends
    procs = {}
    with tempfile.TemporaryDirectory(prefix="dllm-sandbox-", ignore_cleanup_errors=True) as solution_dir, \
            tempfile.TemporaryDirectory(prefix="dllm-sandbox-", ignore_cleanup_errors=True) as checker_dir, \
            tempfile.TemporaryFile() as sol_out, tempfile.TemporaryFile() as sol_err, \
            tempfile.TemporaryFile() as chk_out, tempfile.TemporaryFile() as chk_err:
        try:
            for role, workdir, code, out, err in (("solution", solution_dir, solution, sol_out, sol_err),
                                                  ("checker", checker_dir, checker, chk_out, chk_err)):
                Path(workdir, "program.py").write_text(code, encoding="utf-8")
                read_fd, write_fd = fds[role]
                config = {"mode": role, "entry_point": entry_point, "limits": limits.for_prelude(),
                          "read_fd": read_fd, "write_fd": write_fd}
                procs[role] = _start(workdir, config, out, err, pass_fds=(read_fd, write_fd))
        finally:
            for fd in (ask_r, ask_w, reply_r, reply_w):
                os.close(fd)
        checker_proc = procs["checker"]
        timed_out = _wait(checker_proc, limits.timeout_s)
        _wait(procs["solution"], 0.0)  # every call was answered (or never will be): its work is over
        seconds = time.monotonic() - start
        tails = [_tail(f, 4 * STDERR_TAIL_CHARS).decode("utf-8", "replace") for f in (sol_err, chk_err)]
        stderr_tail = "".join(t for t in tails if t)[-STDERR_TAIL_CHARS:]
    if timed_out:
        return SandboxResult("timeout", None, seconds, stderr_tail)
    status, returncode = _status(checker_proc.returncode, True)
    return SandboxResult(status, returncode, seconds, stderr_tail)


def run_many(programs: list[str], limits: SandboxLimits = SandboxLimits(),
             workers: int | None = None) -> list[SandboxResult]:
    """`run_sandboxed` for each program, `workers` at a time (default: one per CPU); results in input order."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_sandboxed(p, limits), programs))
