"""The tests' launch helpers: :mod:`hdpissa_trl.launch`, with ``tests/`` also on the children's ``PYTHONPATH`` (the
workers import ``workers.*``), and a hard timeout so a hang fails instead of blocking."""

from __future__ import annotations

import os
import subprocess

from hdpissa_trl import launch
from hdpissa_trl.launch import free_port

__all__ = ["child_env", "free_port", "torchrun"]

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def child_env(**extra: str) -> dict[str, str]:
    return launch.child_env(TESTS_DIR, **extra)


def torchrun(script: str, nproc: int, args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``torch.distributed.run`` with ``nproc`` CPU processes; raises with the output if it fails."""
    return launch.torchrun(script, nproc, args, timeout=timeout, env=child_env(**env))
