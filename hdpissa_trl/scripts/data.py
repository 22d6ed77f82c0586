"""Data mixtures for the recipes: TRL's ``DatasetMixtureConfig`` plus the two things TRL lacks.

TRL's ``get_dataset`` loads each dataset, keeps ``columns`` and concatenates — so datasets whose columns have
different names (MetaMathQA's ``query/response``, CodeFeedback's ``query/answer``) cannot be mixed, and there is
no prompt template for base models. Here each dataset still goes through TRL's own loader (one-entry mixture), then
gets its columns renamed to ``prompt``/``completion`` (or ``messages``/``text``), then the mixture rule of TRL
(``fraction`` shares, no oversampling) and its ``test_split_size`` split are applied to the renamed parts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from datasets import Dataset, DatasetDict, concatenate_datasets

from ..trainer.data_checks import DataError

TEMPLATES = ("none", "alpaca", "chat")
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)
TARGET_COLUMNS = ("prompt", "completion", "messages", "text")


def _load_one(dataset_config, streaming: bool = False) -> Dataset:
    """Load one ``DatasetConfig`` through TRL's loader; offline, a clear error says how to use local files."""
    from trl import DatasetMixtureConfig, get_dataset

    single = type(dataset_config)(**{**vars(dataset_config), "fraction": None})
    try:
        return get_dataset(DatasetMixtureConfig(datasets=[single], streaming=streaming))["train"]
    except Exception as exc:  # datasets raises many types (and a bare StopIteration for an empty json file)
        from datasets import config as datasets_config

        offline = datasets_config.HF_HUB_OFFLINE  # datasets' own rule: HF_DATASETS_OFFLINE, else the Hub's
        local = os.path.exists(dataset_config.path) or dataset_config.path in ("json", "csv", "parquet", "arrow",
                                                                                  "text")
        if local and isinstance(exc, FileNotFoundError):
            raise DataError(f"Data files of dataset {dataset_label(dataset_config)!r} not found: {exc}. Relative "
                            f"paths are resolved from the current directory ({os.getcwd()}).") from exc
        if local and not isinstance(exc, ConnectionError):
            raise DataError(f"Cannot read dataset {dataset_label(dataset_config)!r}: {type(exc).__name__}: {exc} "
                            f"(is the file empty or malformed?).") from exc
        hint = (" The Hub is not reachable (offline)." if offline else "") + (
            " To use local files instead, write the entry as\n"
            "  datasets:\n    - path: json            # or parquet, arrow, csv\n"
            "      data_files: path/to/train.jsonl\n"
            "      split: train"
        )
        raise DataError(f"Cannot load dataset {dataset_config.path!r} "
                        f"(data_files={dataset_config.data_files!r}): {type(exc).__name__}: {exc}.{hint}") from exc


def dataset_label(dataset_config) -> str:
    """How a mixture entry is named in messages and in the model card."""
    if dataset_config.data_files and dataset_config.path in ("json", "csv", "parquet", "arrow", "text"):
        files = dataset_config.data_files
        return str(files if isinstance(files, str) else files[0] if isinstance(files, list) else files)
    return dataset_config.path


def map_columns(ds: Dataset, mapping: Mapping[str, str] | None, name: str) -> Dataset:
    """Rename source columns to TRL's (``prompt``, ``completion``, ``messages``, ``text``) and check the result.

    Raises :class:`DataError` naming the dataset and the columns it has when a mapped or required column is missing.
    """
    mapping = dict(mapping or {})
    missing = [src for src in mapping if src not in ds.column_names]
    if missing:
        raise DataError(f"Dataset {name!r} has no column(s) {missing} named in column_mapping; "
                        f"it has {ds.column_names}.")
    bad = [dst for dst in mapping.values() if dst not in TARGET_COLUMNS]
    if bad:
        raise DataError(f"column_mapping for {name!r} maps to {bad}; targets must be among {TARGET_COLUMNS}.")
    if mapping:
        ds = ds.rename_columns(mapping)
    cols = set(ds.column_names)
    if not ({"prompt", "completion"} <= cols or "messages" in cols or "text" in cols):
        raise DataError(f"Dataset {name!r} needs 'prompt'+'completion', 'messages' or 'text' columns (map yours with "
                        f"column_mapping); it has {ds.column_names}.")
    keep = [c for c in TARGET_COLUMNS if c in cols]
    if "prompt" in keep and "completion" in keep:
        keep = ["prompt", "completion"]
    return ds.select_columns(keep)


def apply_prompt_template(ds: Dataset, template: str) -> Dataset:
    """``alpaca``: wrap prompts in the Alpaca instruction template (base models, as in the paper). ``chat``: turn
    prompt/completion into conversational form so SFTTrainer applies the tokenizer's chat template. ``none``: as is.
    """
    if template not in TEMPLATES:
        raise DataError(f"prompt_template must be one of {TEMPLATES}, got {template!r}.")
    if template == "none" or "prompt" not in ds.column_names:
        return ds
    if template == "alpaca":
        return ds.map(lambda row: {"prompt": ALPACA_TEMPLATE.format(prompt=row["prompt"])}, desc="Alpaca template")
    return ds.map(
        lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}],
                     "completion": [{"role": "assistant", "content": row["completion"]}]},
        desc="Chat template",
    )


def build_mixture(mixture_config, column_mapping: Mapping[str, Mapping[str, str]] | None = None,
                  prompt_template: str = "none", seed: int = 0) -> DatasetDict:
    """Load, map, template and mix the datasets of a TRL ``DatasetMixtureConfig``.

    ``column_mapping`` is keyed by a dataset's ``path`` (or its data file for local json/parquet entries).
    Returns a ``DatasetDict`` with ``train`` (and ``test`` when ``test_split_size`` is set).
    """
    if not mixture_config.datasets:
        raise DataError("No datasets configured: add a `datasets:` list to the YAML (path, data_files, split, ...).")
    column_mapping = dict(column_mapping or {})
    parts, names = [], []
    for dc in mixture_config.datasets:
        name = dataset_label(dc)
        ds = _load_one(dc, mixture_config.streaming)
        if len(ds) == 0:
            raise DataError(f"Dataset {name!r} (split {dc.split!r}) is empty.")
        mapping = column_mapping.get(name, column_mapping.get(dc.path))
        ds = apply_prompt_template(map_columns(ds, mapping, name), prompt_template)
        parts.append(ds)
        names.append(name)
    formats = {tuple(sorted(p.column_names)) for p in parts}
    if len(formats) > 1:
        raise DataError(f"Datasets of one mixture must share a format after column_mapping; got "
                        f"{dict(zip(names, (p.column_names for p in parts)))}.")
    fractions = [dc.fraction for dc in mixture_config.datasets]
    if any(f is not None for f in fractions):
        if any(f is None for f in fractions):
            raise DataError("`fraction` must be set for either all datasets in the mixture or none of them.")
        # TRL's rule: shares normalised to one, total capped so that no dataset is oversampled.
        weights = [f / sum(fractions) for f in fractions]
        total = min(len(p) / w for p, w in zip(parts, weights) if w > 0)
        parts = [p.select(range(round(w * total))) for p, w in zip(parts, weights)]
    mixed = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(mixed) == 0:
        raise DataError("The dataset mixture is empty after applying `fraction`.")
    if mixture_config.test_split_size is not None:
        return mixed.train_test_split(test_size=mixture_config.test_split_size, seed=seed)
    return DatasetDict({"train": mixed})
