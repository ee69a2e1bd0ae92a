"""The trusted code that runs inside a sandbox process before and around the untrusted program.

`eval/sandbox.py` starts `python -I -B sandbox_prelude.py` in the sandbox's temporary directory and writes
one JSON line to its stdin: `{"mode", "limits", ...}`. The harness never imports this script, and it uses the
standard library only.

1. It reads that line, then points stdin at /dev/null: the program sees a closed input.
2. It forks. The parent stays a *supervisor*: it waits for the child and exits with the child's exit
   code, or with 128 + N when the child died of signal N. The program's `os.getppid()` is therefore this
   supervisor, never the harness.
3. The child sets its resource limits (address space, CPU seconds, file size, process count, no core
   files), installs a seccomp filter (x86-64 and arm64; see `install_seccomp`), compiles `program.py`,
   installs `guard` as an audit hook (PEP 578) and runs the program in a fresh module namespace named
   `__sandbox__`. Not `__main__`: HumanEval's harness `exec`s the program into a fresh dict, where an
   `if __name__ == "__main__":` block does not run either.

Modes:
- "program": run `program.py`; only when it returns normally does the child print the run's nonce as the last
  line of stdout (a `sys.exit(0)` or `os._exit(0)` before the end leaves it out). This guards against early
  exits, not against a program that reads the nonce from its own process: it is not used for scoring.
- "solution" (untrusted): run `program.py` (the prompt and the completion), then answer calls of its
  `entry_point`: each request on `read_fd` is a Python literal `(args, kwargs)`; each reply on `write_fd` is
  `repr(("ok", result))` or `repr(("error", "TypeName: message"))`. Frames are an 8-byte length, then UTF-8.
- "checker" (trusted: the dataset's prompt and test): run `program.py`, then `check(candidate)` where
  `candidate` sends each call to the solution and parses the reply with `ast.literal_eval`, so results are
  plain built-in values (int, float, str, bytes, bool, None, tuple, list, dict, set): an object with a
  permissive `__eq__` cannot reach the asserts. Exit 0 means `check` returned; nothing the solution can
  write changes that, and the solution's process cannot reach this one (see sandbox.py, "Scoring").

The audit hook refuses (PermissionError) what generated code has no business doing: writing, deleting,
renaming or linking anything outside the working directory, opening a directory outside it (a `dir_fd`
escape), opening an sqlite database outside it, reading another process's /proc entries (its environment,
also through /proc/self/root/...), creating sockets, creating processes (fork, exec, spawn, system,
`subprocess`, and importing `_posixsubprocess` whose `fork_exec` has no audit event), loading libraries or
looking up symbols through `ctypes` (importing it, as numpy does, still works), raising resource limits and
signalling any other process. Audit hooks are not a security boundary on their own (CPython says so; a module
loaded under another name slips past the import check); the seccomp filter, the rlimits and, where available,
bwrap or namespaces (`sandbox.py`) are the kernel-side layers.
"""
from __future__ import annotations

import ast
import builtins
import ctypes
import json
import os
import platform
import resource
import struct
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


def _foreign_proc(path, own: frozenset) -> bool:
    """True for /proc/<pid>/... of another process (its environ, cmdline, memory), however the path is spelt
    (/proc/self/root/proc/<pid>/environ resolves to /proc/<pid>/environ). `own`: this process's pid as
    /proc names it (the host's pid where /proc is the host's and the process is in a pid namespace)."""
    parts = os.path.realpath(os.path.abspath(os.fsdecode(os.fspath(path)))).split(os.sep)
    return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] not in own


def make_guard(root: str):
    """The audit hook for a program confined to the directory `root` (see the module docstring)."""
    own_pid = os.getpid()
    try:
        own = frozenset({str(own_pid), os.readlink("/proc/self")})
    except OSError:
        own = frozenset({str(own_pid)})

    def guard(event: str, args: tuple) -> None:
        if event in _REFUSED_EVENTS:
            _refuse(event)
        if event == "import" and str(args[0]).rpartition(".")[2] == "_posixsubprocess":  # also as "x._posixsubprocess"
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
            if _foreign_proc(path, own):
                _refuse(f"reading {os.fsdecode(path)!r}")
        if event == "sqlite3.connect" and isinstance(args[0], (str, bytes, os.PathLike)):
            database = os.fsdecode(os.fspath(args[0]))
            if database != ":memory:" and not database.startswith("file:") and database and not _inside(database, root):
                _refuse(f"sqlite3.connect to {database!r} outside the sandbox")
            if database.startswith("file:"):
                _refuse("sqlite3.connect with a URI")
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


# seccomp: syscall numbers (x86-64, arm64) of what a sandboxed program never needs. Refused with EPERM:
# process creation other than threads, exec, signals to other processes, pidfds, ptrace and cross-process
# memory access, FIFOs and device nodes. clone3 answers ENOSYS, so that glibc falls back to clone, whose
# flags a filter can read (threads pass CLONE_THREAD).
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_DENIED = {
    "x86_64": {"fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "tkill": 200, "ptrace": 101,
               "process_vm_readv": 310, "process_vm_writev": 311, "mknod": 133, "mknodat": 259,
               "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438, "setsid": 112},
    "aarch64": {"execve": 221, "execveat": 281, "tkill": 130, "ptrace": 117, "process_vm_readv": 270,
                "process_vm_writev": 271, "mknodat": 33, "pidfd_open": 434, "pidfd_send_signal": 424,
                "pidfd_getfd": 438, "setsid": 157},
}
_CLONE = {"x86_64": 56, "aarch64": 220}
_KILL = {"x86_64": (62, 234), "aarch64": (129, 131)}  # kill, tgkill: allowed on this process only
_CLONE3 = 435
_CLONE_THREAD = 0x00010000


def _seccomp_program(arch: str, own_pid: int) -> bytes:
    """The BPF program of the filter (struct sock_filter[]), as bytes."""
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    code = []

    def op(c, k, jt=0, jf=0):
        code.append((c, jt, jf, k))

    op(ld, 4)                                                  # seccomp_data.arch
    op(jeq, _AUDIT_ARCH[arch], 1, 0)
    op(ret, allow)                                             # a foreign ABI (x32): left to the other layers
    op(ld, 0)                                                  # seccomp_data.nr
    denied = list(_DENIED[arch].values())
    for i, nr in enumerate(denied):                            # each: to the EPERM return at the end
        op(jeq, nr, 0, 0)
    op(jeq, _CLONE3, 0, 0)
    op(jeq, _CLONE[arch], 0, 0)
    op(jeq, _KILL[arch][0], 0, 0)
    op(jeq, _KILL[arch][1], 0, 0)
    op(ret, allow)
    tail = len(code)
    op(ret, eperm)                                             # tail + 0
    op(ret, enosys)                                            # tail + 1
    op(ld, 16)                                                 # tail + 2: clone's flags (low word of args[0])
    op(jset, _CLONE_THREAD, 0, 1)
    op(ret, allow)
    op(ret, eperm)
    op(ld, 16)                                                 # tail + 6: kill / tgkill's pid
    op(jeq, own_pid, 0, 1)
    op(ret, allow)
    op(ret, eperm)
    targets = [tail] * len(denied) + [tail + 1, tail + 2, tail + 6, tail + 6]
    first = 4
    for i, target in enumerate(targets):
        at = first + i
        c, _, jf, k = code[at]
        code[at] = (c, target - at - 1, jf, k)
    return b"".join(struct.pack("HBBI", *ins) for ins in code)


def install_seccomp() -> bool:
    """Install the filter in this process (and its threads); False where the kernel or the architecture does not
    allow it (the other layers then stand alone)."""
    arch = platform.machine()
    if arch not in _AUDIT_ARCH or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        program = _seccomp_program(arch, os.getpid())
        buffer = ctypes.create_string_buffer(program, len(program))

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        fprog = SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
        if libc.prctl(38, 1, 0, 0, 0) != 0:                   # PR_SET_NO_NEW_PRIVS
            return False
        return libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    except (OSError, AttributeError):
        return False


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


def _read_frame(fd: int, limit: int) -> bytes | None:
    head = _read_exact(fd, 8)
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if size > limit:
        raise ValueError(f"a frame of {size} bytes is over the limit of {limit}")
    return _read_exact(fd, size)


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write_frame(fd: int, payload: bytes) -> None:
    data = len(payload).to_bytes(8, "big") + payload
    while data:
        data = data[os.write(fd, data):]


def _serve(config: dict, namespace: dict) -> None:
    """Solution mode: answer the checker's calls of the entry point until it closes its end."""
    read_fd, write_fd, limit = config["read_fd"], config["write_fd"], config["limits"]["memory_bytes"]
    while (frame := _read_frame(read_fd, limit)) is not None:
        try:
            args, kwargs = ast.literal_eval(frame.decode("utf-8"))
            reply = ("ok", namespace[config["entry_point"]](*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - the program's failure is the checker's to judge
            reply = ("error", f"{type(exc).__name__}: {str(exc)[:500]}")
        try:
            text = repr(reply)
        except Exception as exc:  # noqa: BLE001
            text = repr(("error", f"the result cannot be written out: {type(exc).__name__}"))
        _write_frame(write_fd, text.encode("utf-8", "backslashreplace"))


class CandidateError(Exception):
    """The solution raised, returned something that is not a plain literal, or went away."""


def _candidate(config: dict):
    """Checker mode: the `candidate` that `check` calls; each call runs in the solution's sandbox."""
    read_fd, write_fd, limit = config["read_fd"], config["write_fd"], config["limits"]["memory_bytes"] // 4
    literal_eval, write, read = ast.literal_eval, _write_frame, _read_frame

    def candidate(*args, **kwargs):
        request = repr((args, kwargs))
        if literal_eval(request) != (args, kwargs):
            raise CandidateError("the test passes arguments that are not plain literals")
        try:
            write(write_fd, request.encode("utf-8", "backslashreplace"))
            frame = read(read_fd, limit)
        except OSError as exc:
            raise CandidateError(f"the solution went away ({exc})") from None
        if frame is None:
            raise CandidateError("the solution ended before answering (it crashed, exited or was killed)")
        try:
            status, value = literal_eval(frame.decode("utf-8"))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError):
            raise CandidateError("the solution returned something that is not a plain built-in value") from None
        if status != "ok":
            raise CandidateError(f"the solution raised {value}")
        return value

    candidate.__name__ = config["entry_point"]
    return candidate


def run_program(config: dict) -> None:
    """The child: limits, seccomp, guard, the program (and the mode's work after it). Never returns."""
    code = 1
    mode, limits = config.get("mode", "program"), config["limits"]
    try:
        set_limits(limits)
        with open("program.py", encoding="utf-8") as f:
            program = compile(f.read(), "program.py", "exec")
        install_seccomp()
        if mode == "checker":
            candidate = _candidate(config)
        sys.addaudithook(make_guard(os.path.realpath(os.getcwd())))
        namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
        exec(program, namespace)  # noqa: S102 - the point
        if mode == "solution":
            _serve(config, namespace)
        elif mode == "checker":  # the test may also call the entry point by its name (HumanEval/33 does)
            namespace[config["entry_point"]] = candidate
            namespace["check"](candidate)
    except SystemExit as exc:
        code = _exit_code(exc.code)
        if mode == "checker" and code == 0:
            code = 1  # a checker exits 0 only after `check` returned
    except BaseException:  # noqa: BLE001 - the program's own failure: report it as the interpreter would
        traceback.print_exc()
    else:
        _flush()
        if mode == "program":
            os.write(1, f"\n{config['nonce']}\n".encode())
        os._exit(0)
    _flush()
    os._exit(code)


def main() -> None:
    config = json.loads(sys.stdin.readline())
    os.environ.pop("PWD", None)  # bwrap sets it; the environment is PATH, LANG and PYTHONHASHSEED only
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    pid = os.fork()
    if pid == 0:
        run_program(config)
    for key in ("read_fd", "write_fd"):  # only the child talks: its end of a pipe closes when it does
        if key in config:
            os.close(config[key])
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os._exit(status if status >= 0 else 128 - status)


if __name__ == "__main__":
    main()
