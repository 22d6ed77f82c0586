"""Load evaluation rows from the Hub or from local json/jsonl/parquet/csv files, with an actionable offline error.

Everything goes through ``datasets.load_dataset`` so hub datasets, the local cache and local files behave alike.
When a dataset is neither reachable nor cached (offline machines, CI), the error says how to point the task at
local files instead of surfacing a bare ``ConnectionError``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DatasetUnavailableError(RuntimeError):
    """The dataset could not be loaded (typically: offline and not cached)."""


def builder_for(path: str) -> str:
    """``datasets`` builder name for a local file, from its extension (``.jsonl.gz`` counts as ``.jsonl``)."""
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    for ext, builder in _BUILDERS.items():
        if name.endswith(ext):
            return builder
    raise ValueError(f"Cannot tell the format of {path!r}: use a .json, .jsonl, .parquet or .csv file.")


def _first_file(data_files: str | Sequence[str] | dict) -> str:
    if isinstance(data_files, str):
        return data_files
    if isinstance(data_files, dict):
        return _first_file(next(iter(data_files.values())))
    return data_files[0]


def load_rows(dataset: str, config: str | None = None, split: str = "test",
              data_files: str | Sequence[str] | dict | None = None, task: str = "TASK",
              fields: Sequence[str] = ()) -> list[dict]:
    """Rows of one split as plain dicts.

    ``data_files`` (a path, a list of paths, or a ``{split: path}`` dict) takes precedence over the hub id; a single
    path or list is read as the requested split whatever its name.
    """
    from datasets import load_dataset

    if data_files:
        missing = [p for p in ([data_files] if isinstance(data_files, str) else
                               list(data_files.values()) if isinstance(data_files, dict) else list(data_files))
                   if isinstance(p, str) and not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"Data file(s) for task {task!r} not found: {missing}")
        builder = builder_for(_first_file(data_files))
        if isinstance(data_files, dict):
            if split not in data_files:
                raise KeyError(f"Task {task!r}: split {split!r} not in data_files (has {sorted(data_files)})")
            ds = load_dataset(builder, data_files=data_files, split=split)
        else:
            ds = load_dataset(builder, data_files=data_files, split="train")
        return [dict(row) for row in ds]
    try:
        ds = load_dataset(dataset, config, split=split)
    except Exception as err:  # any failure gets the same actionable advice
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE  # the Hub client's own reading of HF_HUB_OFFLINE
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "it could not be loaded"
        wanted = f" with fields {', '.join(fields)}" if fields else ""
        raise DatasetUnavailableError(
            f"Task {task!r}: dataset {dataset!r} (config={config!r}, split={split!r}) is unavailable: {why} "
            f"({type(err).__name__}: {err}).\nPoint the task at local files instead: "
            f"`python -m evaluation.run ... --data_files {task}=path/to/{split}.jsonl` "
            f"(a .json/.jsonl/.parquet/.csv file{wanted}), or in Python "
            f"`get_task({task!r}, data_files='path/to/{split}.jsonl')`."
        ) from err
    return [dict(row) for row in ds]
