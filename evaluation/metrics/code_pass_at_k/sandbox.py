"""Run one untrusted Python program in a sandboxed subprocess and report pass/fail.

Model-generated code can loop forever, eat all memory, fork-bomb, open sockets, read secrets from the environment
or delete files, so it never runs in the evaluating process. This file has two halves:

* the **parent** half (:func:`run_program`) makes a fresh temporary directory, writes the program and a copy of this
  file there, and starts ``python -I -B <copy of this file> config.json`` in its own session (process group), with a
  minimal environment, under ``unshare`` namespaces when the system allows them; it kills the whole process group
  (``os.killpg``) at the wall-clock deadline;
* the **child** half (:func:`_child_main`, run when this file is ``__main__``; started through ``setpriv`` as
  ``nobody`` when we are root) sets resource limits, installs Python-level guards, then ``exec``'s the program.

Layers, from always-on to best-available (see README.md for what is and is not guaranteed):

1. Always: own process and session, fresh temp cwd, environment with no parent variables (no ``HF_TOKEN`` ...),
   wall-clock timeout (whole process group killed), ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (file size),
   ``RLIMIT_CPU``, ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``, ``RLIMIT_CORE=0``; Python guards replacing fork/exec/spawn/
   subprocess/kill/``os._exit``, socket creation, ``ctypes``, ``resource.setrlimit`` and every file-writing call
   outside the sandbox directory.
2. When ``unshare`` works: a new network namespace (no interface is up: no network at the OS level, 127.0.0.1
   included) and, where possible, a PID namespace with its own /proc (host processes and their environments are
   invisible; everything started inside dies with the sandbox).
3. When running as root and ``setpriv`` exists: the child runs as ``nobody`` (keeping only CAP_DAC_READ_SEARCH if
   the interpreter is otherwise unreadable), so the kernel refuses writes outside world-writable directories and
   enforces RLIMIT_NPROC (root ignores it).

Resource limits are set by the child itself before the program runs, not in a ``preexec_fn``: several sandboxes run
from worker threads, and ``preexec_fn`` is documented as unsafe (can deadlock) in a multi-threaded parent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial

RESULT_MARK = "@@SANDBOX_RESULT@@ "
_UNSHARE_FLAGS = (
    ["--net", "--pid", "--fork", "--kill-child", "--mount-proc"],
    ["--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"],
    ["--net"],
    ["--user", "--map-root-user", "--net"],
)
_probe_lock = threading.Lock()
_probe_cache: dict[tuple[str, str], object] = {}


# --------------------------------------------------------------------------------------------------- parent side
def _minimal_env(root: str) -> dict[str, str]:
    """Only what a Python program needs; nothing inherited from the parent (tokens, credentials, proxies)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": root,
        "TMPDIR": os.path.join(root, "tmp"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _namespace_prefix(python: str) -> list[str]:
    """The strongest ``unshare`` invocation that works here (probed once per interpreter), else ``[]``."""
    key = ("unshare", python)
    with _probe_lock:
        if key not in _probe_cache:
            prefix: list[str] = []
            unshare = shutil.which("unshare")
            for flags in _UNSHARE_FLAGS if unshare else ():
                cmd = [unshare, *flags, "--", python, "-I", "-B", "-c", "pass"]
                try:
                    ok = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, timeout=30, env=_minimal_env("/")).returncode == 0
                except (OSError, subprocess.SubprocessError):
                    ok = False
                if ok:
                    prefix = [unshare, *flags, "--"]
                    break
            _probe_cache[key] = prefix
        return list(_probe_cache[key])  # type: ignore[arg-type]


def _privilege_drop(python: str) -> tuple[list[str], tuple[int, int] | None]:
    """As root: a ``setpriv`` prefix running the child as ``nobody``, and nobody's ids; else ``([], None)``.

    Plain ``nobody`` is preferred. If the interpreter is unreadable for ``nobody`` (e.g. a pyenv under /root), the
    child keeps exactly one capability, CAP_DAC_READ_SEARCH (read any file): still far less than root -- it cannot
    write outside world-writable directories, signal other users' processes or exceed RLIMIT_NPROC.
    """
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("setpriv") is None:
        return [], None
    key = ("drop", python)
    with _probe_lock:
        if key not in _probe_cache:
            found: tuple[list[str], tuple[int, int] | None] = ([], None)
            try:
                import pwd

                entry = pwd.getpwnam("nobody")
                base = [shutil.which("setpriv"), f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                        "--clear-groups", "--no-new-privs"]
                read_cap = ["--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search",
                            "--bounding-set=-all,+dac_read_search"]
                code = "import json, math, resource, traceback, socket, subprocess, sys; print(sys.version)"
                probe = [python, "-I", "-B", "-c", code]
                run = partial(subprocess.run, cwd="/", stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=_minimal_env("/"), timeout=30)
                expected = run(probe).stdout
                for flags in (base, base + read_cap):
                    done = run([*flags, "--", *probe])
                    # same version string: the very interpreter we probed ran, not some fallback found on the way
                    if done.returncode == 0 and done.stdout == expected:
                        found = ([*flags, "--"], (entry.pw_uid, entry.pw_gid))
                        break
            except (KeyError, OSError, subprocess.SubprocessError):
                found = ([], None)
            _probe_cache[key] = found
        prefix, ids = _probe_cache[key]  # type: ignore[misc]
        return list(prefix), ids


def describe_isolation(python: str | None = None) -> dict:
    """Which optional layers are active on this machine (for logs and the README's guarantees)."""
    python = python or sys.executable
    prefix, (drop, ids) = _namespace_prefix(python), _privilege_drop(python)
    runs_as = "root" if os.geteuid() == 0 else "current user"
    if ids:
        runs_as = "nobody" + (" + CAP_DAC_READ_SEARCH" if any("dac_read_search" in f for f in drop) else "")
    return {"namespaces": prefix[1:-1], "network_namespace": "--net" in prefix, "pid_namespace": "--pid" in prefix,
            "runs_as": runs_as}


def _kill_group(pgid: int) -> None:
    """SIGKILL the sandbox's whole process group (it leads its own session); a vanished group is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, limit: float = 1.0) -> None:
    """After a SIGKILL, give the group's processes a moment to actually die (bounded: zombies that nobody reaps
    still count as members, so this never waits longer than ``limit``)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def _tail(path: str, limit: int = 65536) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - limit))
        return f.read().decode("utf-8", errors="replace")


def _verdict(returncode: int, timed_out: bool, stderr: str) -> dict:
    """Map the child's fate to code_eval's result strings: ``passed`` / ``timed out`` / ``failed: ...``."""
    if timed_out:
        return {"passed": False, "result": "timed out"}
    if returncode == 0:
        return {"passed": True, "result": "passed"}
    marked = [line[len(RESULT_MARK):] for line in stderr.splitlines() if line.startswith(RESULT_MARK)]
    if marked:
        return {"passed": False, "result": f"failed: {marked[-1]}"}
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return {"passed": False, "result": f"failed: killed by {name}"}
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    return {"passed": False, "result": f"failed: exit code {returncode}" + (f" ({last.strip()})" if last else "")}


def run_program(program: str, timeout: float = 3.0, memory_mb: int = 2048, max_file_mb: int = 16,
                max_processes: int = 64, isolation: str = "auto", python: str | None = None) -> dict:
    """Run ``program`` (source text) in the sandbox; ``{"passed": bool, "result": str}``.

    ``passed`` means the program ran to its end (exit status 0) within the limits; any exception, ``SystemExit``
    (leaving early is not passing), signal or timeout is a failure. ``isolation="prelude"`` skips the namespace and
    privilege-drop layers (process, limits and Python guards only) -- used by tests to check the guards alone.
    """
    if isolation not in ("auto", "prelude"):
        raise ValueError(f"isolation must be 'auto' or 'prelude', got {isolation!r}")
    python = python or sys.executable
    prefix = _namespace_prefix(python) if isolation == "auto" else []
    drop, ids = _privilege_drop(python) if isolation == "auto" else ([], None)
    workdir = tempfile.mkdtemp(prefix="code_sandbox_")
    try:
        root = os.path.join(workdir, "sandbox")
        os.makedirs(os.path.join(root, "tmp"))
        program_path = os.path.join(workdir, "program.py")
        runner_path = os.path.join(workdir, "runner.py")
        config_path = os.path.join(workdir, "config.json")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        shutil.copyfile(os.path.abspath(__file__), runner_path)
        config = {"root": root, "program": program_path, "memory_bytes": int(memory_mb) << 20,
                  "file_bytes": int(max_file_mb) << 20, "max_processes": int(max_processes),
                  "cpu_seconds": int(timeout) + 2}
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f)
        os.chmod(workdir, 0o755)  # the child may run as `nobody`: it must read runner/config/program
        for path in (program_path, runner_path, config_path):
            os.chmod(path, 0o644)
        if ids:
            for path in (root, os.path.join(root, "tmp")):
                os.chown(path, *ids)
        cmd = [*prefix, *drop, python, "-I", "-B", runner_path, config_path]
        out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=root, env=_minimal_env(root), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also ends anything the program left running in its group
                proc.wait()
                if timed_out:  # the namespace's init may be dying in parallel with the unshare wrapper
                    _wait_group_gone(proc.pid)
        return _verdict(proc.returncode, timed_out, _tail(err_path))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- child side
def _apply_limits(config: dict) -> None:
    import resource

    limits = {"RLIMIT_AS": config["memory_bytes"], "RLIMIT_FSIZE": config["file_bytes"],
              "RLIMIT_CPU": config["cpu_seconds"], "RLIMIT_CORE": 0, "RLIMIT_NOFILE": 256,
              "RLIMIT_NPROC": config["max_processes"]}
    for name, value in limits.items():
        if hasattr(resource, name):
            which = getattr(resource, name)
            hard = resource.getrlimit(which)[1]
            if hard != resource.RLIM_INFINITY:  # an unprivileged process can only lower its hard limit
                value = min(value, hard)
            resource.setrlimit(which, (value, value))


def _denied(what: str):
    def blocked(*args, **kwargs):
        raise PermissionError(f"{what} is disabled in the code-evaluation sandbox")

    return blocked


def _make_path_guard(root: str):
    """``inside(path, dir_fd)``: does ``path`` resolve into the sandbox directory (or /dev/null)?"""
    realpath, join, readlink = os.path.realpath, os.path.join, os.readlink

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor: opening it was checked
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = realpath(path)
        return real == root or real.startswith(root + os.sep) or real == "/dev/null"

    return inside


def _install_write_guards(root: str) -> None:
    """Every Python-level way to create, change or delete a file checks that the target is inside ``root``."""
    import builtins
    import io
    import posix

    inside = _make_path_guard(os.path.realpath(root))
    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def check(path, dir_fd=None) -> None:
        if not inside(path, dir_fd):
            raise PermissionError(f"writing outside the sandbox directory is not allowed: {path!r}")

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def one_path(func):
        def wrapper(path, *args, **kwargs):
            check(path, kwargs.get("dir_fd"))
            return func(path, *args, **kwargs)

        return wrapper

    def two_paths(func, check_src: bool = True):
        def wrapper(src, dst, *args, **kwargs):
            if check_src:
                check(src, kwargs.get("src_dir_fd"))
            check(dst, kwargs.get("dst_dir_fd", kwargs.get("dir_fd")))
            return func(src, dst, *args, **kwargs)

        return wrapper

    builtins.open = io.open = guarded_open
    for module in (os, posix):
        module.open = guarded_os_open
        for name in ("mkdir", "rmdir", "remove", "unlink", "chmod", "chown", "lchown", "truncate", "utime",
                     "mkfifo", "mknod", "setxattr", "removexattr", "chroot"):
            if hasattr(module, name):
                setattr(module, name, one_path(getattr(module, name)))
        for name in ("rename", "replace", "link"):
            if hasattr(module, name):
                setattr(module, name, two_paths(getattr(module, name)))
        if hasattr(module, "symlink"):  # the link's target may be anywhere; writing through it is checked anyway
            module.symlink = two_paths(module.symlink, check_src=False)


def _install_process_and_network_guards() -> None:
    """No new processes, signals to others, early hard exits, sockets, ctypes or raised limits."""
    import _posixsubprocess
    import _socket
    import posix
    import resource
    import socket
    import subprocess as subprocess_module

    process_calls = ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                     "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
                     "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "_exit", "setsid", "setuid",
                     "setgid", "setreuid", "setresuid")
    for module in (os, posix):
        for name in process_calls:
            if hasattr(module, name):
                setattr(module, name, _denied(f"os.{name}"))
    subprocess_module.Popen = _denied("subprocess")
    _posixsubprocess.fork_exec = _denied("subprocess")
    resource.setrlimit = _denied("resource.setrlimit")
    if hasattr(resource, "prlimit"):
        resource.prlimit = _denied("resource.prlimit")

    real_socketpair = _socket.socketpair

    class BlockedSocket(socket.socket):
        """Only wraps descriptors that already exist (e.g. from ``socketpair``); never opens a new socket."""

        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:
                raise PermissionError("network access is disabled in the code-evaluation sandbox")
            super().__init__(family, type, proto, fileno)

    def local_socketpair(family=socket.AF_UNIX, *args, **kwargs):
        """asyncio's event loop needs an AF_UNIX pair to wake itself; that reaches no network."""
        if family != socket.AF_UNIX:
            raise PermissionError("only AF_UNIX socket pairs are allowed in the code-evaluation sandbox")
        return real_socketpair(family, *args, **kwargs)

    socket.socket = socket.SocketType = BlockedSocket  # not _socket.socket: the real class __init__ uses it
    _socket.socketpair = local_socketpair
    for name in ("fromfd", "create_connection", "create_server", "getaddrinfo", "gethostbyname",
                 "gethostbyname_ex", "gethostbyaddr"):
        for module in (socket, _socket):
            if hasattr(module, name):
                setattr(module, name, _denied(f"socket.{name}"))
    for name in ("ctypes", "_ctypes", "_posixsubprocess"):
        sys.modules[name] = None  # type: ignore[assignment]  # `import ctypes` now raises ImportError


def _child_main(config_path: str) -> None:
    """Limits -> guards -> run the program; exit 0 only if it ran to its end."""
    import builtins
    import traceback

    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    with open(config["program"], encoding="utf-8") as f:
        source = f.read()
    hard_exit, write_fd = os._exit, os.write
    _apply_limits(config)
    _install_write_guards(config["root"])
    _install_process_and_network_guards()
    namespace = {"__name__": "__main__", "__file__": config["program"], "__builtins__": builtins}
    try:
        exec(compile(source, config["program"], "exec"), namespace)
    except BaseException as exc:  # SystemExit too: leaving before the tests ran is not a pass
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
        summary = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
        write_fd(2, f"\n{RESULT_MARK}{summary}\n".encode("utf-8", errors="replace"))
        hard_exit(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        hard_exit(0)  # skip atexit hooks and non-daemon threads the program may have left behind


if __name__ == "__main__":
    _child_main(sys.argv[1])
