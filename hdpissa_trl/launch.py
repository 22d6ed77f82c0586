"""Start real multi-process runs on this machine (tests and benchmarks): a free port, a child's environment, torchrun.

Every multi-process check of this project runs real processes (gloo on CPU) rather than mocks; these three helpers
are what the test suite and the benchmark scripts share to start them. Children run offline with one BLAS thread
each unless told otherwise, and import this checkout (its root first on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import NoReturn

# The checkout holding this package (tests/, bench/ and recipes/ sit beside it in a source tree).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``--master_port`` / ``--main_process_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(*extra_paths: str, threads: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment for a child: the checkout (then ``extra_paths``) first on ``PYTHONPATH``, the Hub
    offline, ``threads`` OpenMP/MKL threads, a loopback master address; ``extra`` variables set last."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, *extra_paths, env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1")
    env.update(extra)
    return env


def torchrun(target: str, nproc: int, args: list[str], timeout: float = 300, echo: bool = False,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``target`` (a ``.py`` file, or a module name run with ``-m``) as ``nproc`` local processes under
    ``torch.distributed.run``; raise with the tail of its output if it fails or outlives ``timeout`` seconds."""
    script = [target] if target.endswith(".py") or os.path.isfile(target) else ["-m", target]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *script, *args]
    proc = subprocess.run(cmd, env=env if env is not None else child_env(), capture_output=True, text=True,
                          timeout=timeout)
    if echo and proc.stdout:
        print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun of {target} with {nproc} processes failed ({proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def end_worker() -> NoReturn:
    """End a ``torchrun`` child whose work is done: wait for the other ranks, destroy the process group if one is
    still up, flush stdout/stderr and exit with status 0 through ``os._exit``. Call it from a worker's entry point
    only (never from a function a test also calls in-process).

    Why not a normal return: once in a while (seen once in CI, after every result file had been written) gloo's C++
    threads abort a process while the interpreter is being finalised ("terminate called without an active
    exception"), and torchrun then fails the whole launch: a worker thread still releasing a finished collective's
    Python tensors needs the GIL while the interpreter goes away (the same race that can hang a run whose DDP module
    outlives the group, see :func:`hdpissa_trl.engine.distributed.shutdown_distributed`). ``os._exit`` skips that
    teardown; what the worker wrote is on disk by then (its files are closed), and only this process's exit status is
    decided here.
    """
    import torch.distributed as dist

    from .engine.distributed import is_distributed, shutdown_distributed

    if is_distributed():
        dist.barrier()
    shutdown_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
