"""The SFT dataset checks of the trainer: clear errors for a dataset ``SFTTrainer`` cannot train on, before the model
is loaded (:func:`check_sft_dataset`) and after TRL's tokenization and truncation (:func:`check_after_truncation`).

The recipes' data mixtures (:mod:`hdpissa_trl.scripts.data`) raise the same :class:`DataError`.
"""

from __future__ import annotations

from collections.abc import Mapping

from datasets import Dataset


class DataError(ValueError):
    """A dataset cannot be used as configured (missing columns, empty, unavailable offline)."""


def check_sft_dataset(dataset, name: str = "train", text_field: str = "text", needs_columns: bool = True) -> None:
    """Clear errors, before any model is loaded, for a dataset ``SFTTrainer`` cannot train on.

    Raises :class:`DataError` when ``dataset`` (a ``Dataset``, or a dict of them for evaluation) is empty, or, when
    ``needs_columns``, has none of the column sets SFT reads: ``prompt`` + ``completion``, ``messages``, ShareGPT
    ``conversations`` (from/value), ``text_field`` or pre-tokenized ``input_ids``: never stricter than SFTTrainer.
    (Without these checks TRL fails with a bare ``StopIteration`` or ``KeyError: 'text'``.) Streaming datasets are not
    inspected.
    """
    if dataset is None:
        return
    if isinstance(dataset, Mapping):
        for key, part in dataset.items():
            check_sft_dataset(part, key, text_field, needs_columns)
        return
    if not isinstance(dataset, Dataset):
        return
    if len(dataset) == 0:
        raise DataError(f"The {name} dataset is empty (0 rows): nothing to train on. Check its split and filters.")
    cols = set(dataset.column_names)
    if not needs_columns or {"prompt", "completion"} <= cols or cols & {"messages", text_field, "input_ids"}:
        return
    from trl.data_utils import is_conversational_from_value

    if "conversations" in cols and is_conversational_from_value(dataset[0]):
        return  # ShareGPT-style from/value turns: SFTTrainer converts them to messages
    raise DataError(f"The {name} dataset has columns {dataset.column_names}; SFT needs 'prompt'+'completion', "
                    f"'messages', 'conversations' (ShareGPT from/value) or {text_field!r} (dataset_text_field). "
                    f"Rename yours, e.g. with hdpissa_trl.scripts.data.map_columns, or pass a formatting_func.")


def check_after_truncation(before, after, name: str, max_length: int | None) -> None:
    """After ``SFTTrainer`` tokenized and truncated a dataset: fail clearly if truncation left nothing to learn.

    TRL silently drops every example whose completion was cut away entirely by ``max_length`` (e.g. prompts longer
    than ``max_length``); when that is every example the trainer would stop later with ``num_samples=0``.
    """
    if not isinstance(before, Dataset) or not isinstance(after, Dataset):
        return
    if len(before) and len(after) == 0:
        raise DataError(f"All {len(before)} examples of the {name} dataset have no completion token left after "
                        f"truncation to max_length={max_length} (prompts at least that long?). Raise max_length, "
                        f"shorten the prompts, or set truncation_mode='keep_end'.")
