"""The code sandbox: every hostile program ends as a FAILED sample within its limits, never a hang or a leak.

Most cases run twice: ``isolation="prelude"`` (process + rlimits + Python guards only, what every machine gets) and
``"auto"`` (plus namespaces / the ``nobody`` user where this machine allows them). Cases that deliberately bypass
the Python guards check the OS-level layers and are skipped where those layers are unavailable.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from evaluation.metrics import load_metric
from evaluation.metrics.code_pass_at_k import sandbox

MODES = ["prelude", "auto"]
ISOLATION = sandbox.describe_isolation()


def run(program: str, mode: str, timeout: float = 5.0, **kwargs) -> dict:
    started = time.monotonic()
    result = sandbox.run_program(program, timeout=timeout, memory_mb=512, isolation=mode, **kwargs)
    assert time.monotonic() - started < timeout + 10, "the sandbox must never hang past its deadline"
    return result


def _leftover_sandbox_processes(grace: float = 3.0) -> list[str]:
    """Sandbox runners still alive after ``grace`` seconds (a SIGKILLed process needs a moment to disappear)."""
    deadline = time.monotonic() + grace
    while True:
        found = _sandbox_processes()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _sandbox_processes() -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "code_sandbox_" in cmd and "runner.py" in cmd:
            found.append(f"{pid}: {cmd}")
    return found


@pytest.mark.parametrize("mode", MODES)
def test_correct_program_passes(mode):
    assert run("def f(x):\n    return 2 * x\n\nassert f(21) == 42\n", mode) == {"passed": True, "result": "passed"}


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_times_out(mode):
    started = time.monotonic()
    assert run("while True:\n    pass\n", mode, timeout=2.0) == {"passed": False, "result": "timed out"}
    assert time.monotonic() - started < 6
    assert _leftover_sandbox_processes() == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("program", ["x = bytearray(64 * 2**30)\n",
                                     "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 2**20))\n"])
def test_huge_allocation_fails_with_memory_error(mode, program):
    result = run(program, mode)
    assert not result["passed"] and result["result"].startswith("failed: MemoryError")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()\n",
    "import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])\n",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()\n",
    "import os\nos.system('echo escaped')\n",
])
def test_fork_bomb_and_process_creation_fail(mode, program):
    result = run(program, mode)
    assert not result["passed"] and "PermissionError" in result["result"], result
    assert _leftover_sandbox_processes() == []


@pytest.fixture()
def listening_server():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.3)
    yield server
    server.close()


def _assert_nobody_connected(server: socket.socket) -> None:
    with pytest.raises(socket.timeout):
        server.accept()[0].close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("template", [
    "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
    "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
])
def test_network_connection_fails(mode, template, listening_server):
    port = listening_server.getsockname()[1]
    result = run(template.format(port=port), mode)
    assert not result["passed"] and result["result"].startswith("failed:"), result
    _assert_nobody_connected(listening_server)


@pytest.mark.skipif(not ISOLATION["network_namespace"], reason="no network namespace (unshare) on this machine")
def test_network_namespace_holds_when_python_guard_is_bypassed(listening_server):
    port = listening_server.getsockname()[1]
    program = ("import socket\nreal_socket = socket.socket.__mro__[1]  # the class the guard subclassed\n"
               "s = real_socket(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(2)\n"
               f"s.connect(('127.0.0.1', {port}))\n")
    result = run(program, "auto")
    assert not result["passed"] and "unreachable" in result["result"].lower(), result
    _assert_nobody_connected(listening_server)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("template", [
    "open({target!r}, 'w').write('escaped')\n",
    "import pathlib\npathlib.Path({target!r}).write_text('escaped')\n",
    "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))\n",
    "import shutil\nopen('inside.txt', 'w').write('x')\nshutil.copy('inside.txt', {target!r})\n",
    "import os\nos.symlink({target!r}, 'link.txt')\nopen('link.txt', 'w').write('escaped')\n",
])
def test_writing_outside_the_sandbox_fails(mode, template, tmp_path):
    target = tmp_path / "escaped.txt"
    result = run(template.format(target=str(target)), mode)
    assert not result["passed"] and "PermissionError" in result["result"], result
    assert not target.exists()


@pytest.mark.parametrize("mode", MODES)
def test_writing_inside_the_sandbox_works(mode):
    program = ("import tempfile, os\nopen('out.txt', 'w').write('ok')\nassert open('out.txt').read() == 'ok'\n"
               "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'1')\n"
               "os.makedirs('a/b')\nos.remove('out.txt')\n")
    assert run(program, mode)["passed"]


@pytest.mark.skipif(not ISOLATION["runs_as"].startswith("nobody"), reason="no privilege drop on this machine")
def test_kernel_refuses_writes_when_python_guard_is_bypassed(tmp_path):
    target = tmp_path / "escaped.txt"
    program = ("import sys\ndel sys.modules['posix']\nimport posix  # a fresh copy: the real, unguarded open\n"
               f"posix.close(posix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT))\n")
    result = run(program, "auto")
    assert not result["passed"] and "Permission denied" in result["result"], result
    assert not target.exists()


@pytest.mark.skipif(not ISOLATION["runs_as"].startswith("nobody"), reason="RLIMIT_NPROC is not enforced for root")
def test_process_limit_holds_when_python_guard_is_bypassed():
    program = ("import sys, time\ndel sys.modules['posix']\nimport posix\nn = 0\nfor _ in range(200):\n"
               "    try:\n        pid = posix.fork()\n    except OSError:\n        break\n"
               "    if pid == 0:\n        time.sleep(60)\n    n += 1\nassert n == 200, f'forked {n}'\n")
    result = sandbox.run_program(program, timeout=10, max_processes=16)
    assert not result["passed"] and "forked" in result["result"], result
    assert int(result["result"].rsplit(" ", 1)[1]) < 16
    assert _leftover_sandbox_processes() == []  # the sleeping children died with the sandbox


@pytest.mark.parametrize("mode", MODES)
def test_parent_secrets_are_not_in_the_environment(mode, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_do_not_leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws_secret_do_not_leak")
    for program in ("import os\nprint(os.environ['HF_TOKEN'])\n",
                    "import os\nassert any('do_not_leak' in v for v in os.environ.values())\n"):
        result = run(program, mode)
        assert not result["passed"] and result["result"].startswith("failed:"), result


@pytest.mark.skipif(not ISOLATION["pid_namespace"], reason="no PID namespace (unshare) on this machine")
def test_host_processes_are_invisible():
    program = f"print(open('/proc/{os.getpid()}/environ', 'rb').read()[:10])\n"  # our own environment
    result = run(program, "auto")
    assert not result["passed"] and "FileNotFoundError" in result["result"], result


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("program", ["import sys\nsys.exit(0)\n", "exit()\n", "import os\nos._exit(0)\n"])
def test_leaving_early_is_not_a_pass(mode, program):
    assert not run(program + "assert False\n", mode)["passed"]


@pytest.mark.parametrize("mode", MODES)
def test_runaway_output_is_cut_by_the_file_size_limit(mode):
    result = run("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)\n", mode)
    assert not result["passed"] and "File too large" in result["result"], result


def test_code_eval_refuses_without_opt_in(monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    metric = load_metric("code_pass_at_k")
    with pytest.raises(ValueError, match="HF_ALLOW_CODE_EVAL") as err:
        metric.compute(predictions=[["x = 1"]], references=["assert x == 1"], k=[1])
    assert "untrusted" in str(err.value)
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "0")
    with pytest.raises(ValueError, match="HF_ALLOW_CODE_EVAL"):
        metric.compute(predictions=[["x = 1"]], references=["assert x == 1"], k=[1])


def test_hostile_candidates_through_the_metric(monkeypatch, tmp_path):
    """The metric path (thread pool, several sandboxes at once) turns each hostile candidate into a failure."""
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    target = tmp_path / "escaped.txt"
    candidates = ["def f():\n    return 1\n", "while True:\n    pass\n", "x = bytearray(64 * 2**30)\n",
                  "import os\nwhile True:\n    os.fork()\n", f"open({str(target)!r}, 'w').write('x')\n"]
    started = time.monotonic()
    pass_at_k, results = load_metric("code_pass_at_k").compute(
        predictions=[candidates], references=["pass"], k=[1], num_workers=2,
        timeout=2, memory_mb=512)
    assert time.monotonic() - started < 30
    assert [r["passed"] for _, r in results[0]] == [True, False, False, False, False]
    reasons = [r["result"] for _, r in results[0]]
    assert reasons[1] == "timed out"
    assert reasons[2].startswith("failed: MemoryError")
    assert "PermissionError" in reasons[3] and "PermissionError" in reasons[4]
    assert pass_at_k["pass@1"] == pytest.approx(1 / 5, abs=1e-12)
    assert not target.exists()
