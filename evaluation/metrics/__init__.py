"""Local ``evaluate`` modules: ``evaluate.load(metric_path(name))`` works offline (no Hub lookup for a local dir).

Each sub-directory is a self-contained metric (``<name>/<name>.py`` + a ``README.md`` card) that could be pushed to
the Hub as is; this package only knows where they live.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("math_accuracy", "code_pass_at_k", "multiple_choice")


def metric_path(name: str) -> str:
    """Directory of a bundled metric, suitable for ``evaluate.load``."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; bundled metrics: {METRIC_NAMES}")
    return str(METRICS_DIR / name)


def load_metric(name: str):
    """``evaluate.load`` of a bundled metric, kept in memory (no cache files for a one-shot compute)."""
    import evaluate

    return evaluate.load(metric_path(name), keep_in_memory=True)
