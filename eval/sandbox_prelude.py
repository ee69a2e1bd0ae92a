"""The trusted code that runs inside a sandbox process before and around the untrusted program.

`eval/sandbox.py` starts `python -I -B sandbox_prelude.py` in the sandbox's temporary directory and writes
one JSON line to its stdin: `{"nonce": str, "limits": {...}}`. The harness never imports this
script, and it uses the standard library only.

1. It reads that line, then points stdin at /dev/null: the program sees a closed input.
2. It forks. The parent stays a *supervisor*: it waits for the child and exits with the child's exit
   code, or with 128 + N when the child died of signal N. The program's `os.getppid()` is therefore this
   supervisor (pid 1 of the sandbox's pid namespace where there is one), never the harness.
3. The child sets its resource limits (address space, CPU seconds, file size, process count, no core
   files), compiles `program.py`, installs `guard` as an audit hook (PEP 578) and runs the program in a
   fresh module namespace named `__sandbox__`. Not `__main__`: HumanEval's harness `exec`s the program
   into a fresh dict, where an `if __name__ == "__main__":` block does not run either.
4. Only when the program returns normally does the child print the nonce as the last line of stdout.
   A `sys.exit(0)`, `os._exit(0)` or a signal before the end leaves it out, and the harness counts the
   run as failed: exit status 0 alone does not mean the checks ran. (A program that dug the nonce out of
   this process's memory could forge the line; the nonce guards against early exits, not adversaries.)

The audit hook refuses (PermissionError) what generated code has no business doing: writing, deleting,
renaming or linking anything outside the working directory, opening a directory outside it (a `dir_fd`
escape), reading another process's /proc entries (its environment), creating sockets, creating processes
(fork, exec, spawn, system, `subprocess`, and importing `_posixsubprocess` whose `fork_exec` has no audit
event), loading libraries or looking up symbols through `ctypes` (importing it, as numpy does, still
works), raising resource limits and signalling any other process.
Audit hooks are not a security boundary on their own (CPython says so); the kernel-side limits and, where
available, the namespaces of `sandbox.py` are the other layers.
"""
from __future__ import annotations

import builtins
import json
import os
import resource
import sys
import traceback

_REFUSED_EVENTS = frozenset({
    "socket.__new__", "socket.sethostname", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
    "os.system", "os.startfile", "subprocess.Popen", "pty.spawn", "ctypes.dlsym", "ctypes.dlsym/handle",
    "resource.setrlimit", "resource.prlimit", "os.killpg", "os.chroot",
})
# Mutating events: (positions of path arguments, which must lie inside the working directory; positions of
# `dir_fd` arguments, which must be unset (-1 or None), since a path relative to a descriptor cannot be checked).
_MUTATING = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)), "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)), "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)),
    "os.symlink": ((1,), (2,)), "os.truncate": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
    "shutil.rmtree": ((0,), (1,)), "shutil.copyfile": ((1,), ()), "shutil.copymode": ((1,), ()),
    "shutil.copystat": ((1,), ()), "shutil.copytree": ((1,), ()), "shutil.move": ((0, 1), ()),
    "shutil.chown": ((0,), ()),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _refuse(event: str) -> None:
    raise PermissionError(f"sandbox: {event} is not allowed")


def _inside(path, root: str) -> bool:
    real = os.path.realpath(os.fsdecode(os.fspath(path)))
    return real == root or real.startswith(root + os.sep) or real == os.devnull


def _is_write(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _foreign_proc(path) -> bool:
    """True for /proc/<pid>/... of another process (its environ, cmdline, memory)."""
    text = os.path.abspath(os.fsdecode(os.fspath(path)))
    if text.startswith(("/proc/self/", "/proc/thread-self/")) or text in ("/proc/self", "/proc/thread-self"):
        return False
    parts = os.path.realpath(text).split(os.sep)
    return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != str(os.getpid())


def make_guard(root: str):
    """The audit hook for a program confined to the directory `root` (see the module docstring)."""
    own_pid = os.getpid()

    def guard(event: str, args: tuple) -> None:
        if event in _REFUSED_EVENTS:
            _refuse(event)
        if event == "import" and args[0] == "_posixsubprocess":
            _refuse("import _posixsubprocess")
        if event == "ctypes.dlopen" and args[0] is not None:    # `import ctypes` itself opens the main program
            _refuse(event)
        if event == "os.kill" and args[0] != own_pid:
            _refuse("signalling another process")
        if event == "open" and not isinstance(args[0], int):
            path, mode, flags = args
            outside = not _inside(path, root)
            if outside and (_is_write(mode, flags) or os.path.isdir(path)):
                _refuse(f"opening {os.fsdecode(path)!r} for writing (or as a directory) outside the sandbox")
            if _foreign_proc(path):
                _refuse(f"reading {os.fsdecode(path)!r}")
        if event in _MUTATING:
            paths, dir_fds = _MUTATING[event]
            if any(args[i] not in (None, -1) for i in dir_fds):
                _refuse(f"{event} relative to a directory descriptor")
            for i in paths:
                if not isinstance(args[i], int) and not _inside(args[i], root):
                    _refuse(f"{event} on {os.fsdecode(args[i])!r} outside the sandbox")
    return guard


def set_limits(limits: dict) -> None:
    """Address space, CPU seconds (soft; the hard limit one second later kills), file size, processes, core."""
    memory, cpu = limits["memory_bytes"], limits["cpu_s"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - the program closed or replaced the stream: nothing to flush
            pass


def _exit_code(value) -> int:
    """`sys.exit(value)` semantics: None is 0, an int is itself, anything else is printed and is 1."""
    if value is None or isinstance(value, int):
        return (value or 0) & 0xFF
    print(value, file=sys.stderr)
    return 1


def run_program(nonce: str, limits: dict) -> None:
    """The child: limits, guard, the program, and the nonce line when it returned normally. Never returns."""
    code = 1
    try:
        set_limits(limits)
        with open("program.py", encoding="utf-8") as f:
            program = compile(f.read(), "program.py", "exec")
        sys.addaudithook(make_guard(os.path.realpath(os.getcwd())))
        exec(program, {"__name__": "__sandbox__", "__builtins__": builtins})  # noqa: S102 - the point
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:  # noqa: BLE001 - the program's own failure: report it as the interpreter would
        traceback.print_exc()
    else:
        _flush()
        os.write(1, f"\n{nonce}\n".encode())
        os._exit(0)
    _flush()
    os._exit(code)


def main() -> None:
    config = json.loads(sys.stdin.readline())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    pid = os.fork()
    if pid == 0:
        run_program(config["nonce"], config["limits"])
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os._exit(status if status >= 0 else 128 - status)


if __name__ == "__main__":
    main()
