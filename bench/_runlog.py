"""One JSON file per benchmark run: atomic writes, per-run peak memory, provenance.

A sweep of many short runs is written as it goes (``write_run``), so a killed sweep resumes by skipping every run
whose file exists (``run_exists``); nothing is lost but the run in flight.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_id(task: str, label: str, r: int, alpha: float, lr: float, steps: int, seed: int) -> str:
    """The file stem of one run, e.g. ``multitask__hdpissa2__r4_a4__lr0.003__steps150__s0``."""
    return f"{task}__{label}__r{r}_a{alpha:g}__lr{lr:g}__steps{steps}__s{seed}"


def run_path(results_dir: str, rid: str) -> str:
    return os.path.join(results_dir, rid + ".json")


def run_exists(results_dir: str, rid: str) -> bool:
    return os.path.exists(run_path(results_dir, rid))


def write_run(results_dir: str, rid: str, record: dict) -> str:
    """Write ``record`` as ``results_dir/rid.json`` atomically (temp file + rename): a file that exists is complete."""
    os.makedirs(results_dir, exist_ok=True)
    path = run_path(results_dir, rid)
    fd, tmp = tempfile.mkstemp(dir=results_dir, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def load_runs(results_dir: str) -> list[dict]:
    """Every run record in ``results_dir`` (files named by :func:`run_id`, sorted by name)."""
    if not os.path.isdir(results_dir):
        return []
    out = []
    for name in sorted(os.listdir(results_dir)):
        if name.endswith(".json") and "__" in name and not name.startswith("."):
            with open(os.path.join(results_dir, name), encoding="utf-8") as f:
                out.append(json.load(f))
    return out


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux ``clear_refs`` 5), so the next :func:`peak_rss` is the peak
    of what runs from now on. Returns False where the kernel does not allow it (the peak then spans earlier work)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size of this process (``VmHWM``) in bytes, 0 where unknown."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def git_commit() -> str | None:
    """The repository's commit (with ``+dirty`` when the working tree differs), for provenance."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None
