"""What ``recipes/dpo.py`` and ``recipes/grpo.py`` need beyond TRL: script arguments, data, and the end of a run.

The scripts stay thin (parse, build the trainer, call :func:`finish_run`). Model sources, the HD-PiSSA config from
TRL's ``ModelConfig`` and the evaluation before/after are the SFT recipe's (:mod:`hdpissa_trl.scripts.recipe`); the
data is TRL's ``DatasetMixtureConfig`` as it is (preference pairs ``prompt``/``chosen``/``rejected`` for DPO, prompts
plus the columns the reward functions read for GRPO), with the same ``prompt_template`` choices as SFT.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, DatasetDict

from .data import ALPACA_TEMPLATE, TEMPLATES, DataError, dataset_label
from .recipe import HDPiSSAScriptArguments, evaluate_before, finish_run, hdpissa_config_from_args, resolve_model


def _refuse_column_mapping(args: HDPiSSAScriptArguments, columns: str) -> None:
    if args.column_mapping:
        raise ValueError(f"column_mapping is an option of the SFT recipe; this recipe reads the columns {columns} "
                         f"as they are (select them per dataset with `columns:`).")


@dataclass
class DPOScriptArguments(HDPiSSAScriptArguments):
    """Script arguments of ``recipes/dpo.py``: those of the SFT recipe (method, model source, ``hdpissa_*``,
    evaluation), applied to preference pairs. ``column_mapping`` is SFT-only."""

    prompt_template: str = field(
        default="none",
        metadata={"help": "'chat' (prompt as the user turn, chosen/rejected as the assistant turn, through the "
                          "tokenizer's chat template), 'alpaca' (instruction template around the prompt) or 'none'."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _refuse_column_mapping(self, "prompt, chosen, rejected")


@dataclass
class GRPOScriptArguments(HDPiSSAScriptArguments):
    """Script arguments of ``recipes/grpo.py``: those of the SFT recipe plus the rewards. ``column_mapping`` is
    SFT-only."""

    prompt_template: str = field(
        default="none",
        metadata={"help": "'chat' (prompt as the user turn through the tokenizer's chat template), 'alpaca' or 'none'."},
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions: answer_reward, format_reward, digit_reward (hdpissa_trl.rewards), TRL's "
                          "(accuracy_reward, think_format_reward, ...) or import paths (my_pkg.rewards.fn)."},
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A sequence-classification reward model (path or Hub id), added to the rewards."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _refuse_column_mapping(self, "prompt (+ the columns your rewards read)")
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [r.strip() for r in self.reward_funcs.split(",") if r.strip()]
        if not self.reward_funcs and not self.reward_model_name_or_path:
            raise ValueError("GRPO needs a reward: set reward_funcs (e.g. [answer_reward, format_reward]) and/or "
                             "reward_model_name_or_path.")

    def rewards(self) -> list:
        from ..rewards import get_reward_funcs

        funcs: list = [self.reward_model_name_or_path] if self.reward_model_name_or_path else []
        return funcs + (get_reward_funcs(self.reward_funcs) if self.reward_funcs else [])


def apply_template(ds: Dataset, template: str) -> Dataset:
    """``chat``: the conversational form TRL's DPO/GRPO trainers put through the chat template (prompt → user
    turn; chosen/rejected → assistant turn). ``alpaca``: the instruction template around the prompt. ``none``: as is."""
    if template not in TEMPLATES:
        raise DataError(f"prompt_template must be one of {TEMPLATES}, got {template!r}.")
    if template == "none":
        return ds
    if template == "alpaca":
        return ds.map(lambda row: {"prompt": ALPACA_TEMPLATE.format(prompt=row["prompt"])}, desc="Alpaca template")
    answers = [c for c in ("chosen", "rejected") if c in ds.column_names]
    return ds.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}],
                               **{c: [{"role": "assistant", "content": row[c]}] for c in answers}},
                  desc="Chat template")


def load_data(dataset_args, columns: tuple[str, ...], template: str, seed: int = 0) -> DatasetDict:
    """TRL's dataset mixture, checked for ``columns`` (a clear error naming the dataset), then templated.

    ``test_split_size`` is split here with ``seed``, not by ``get_dataset``: its ``train_test_split`` takes no seed and
    draws one from NumPy's global state, so every process of a launch held another train set in another order (with
    precomputed DPO reference log-probabilities, rows got another row's reference value).
    """
    import dataclasses

    from trl import get_dataset

    if not dataset_args.datasets:
        raise DataError("No datasets configured: add a `datasets:` list to the YAML (path, data_files, split, ...).")
    for dc in dataset_args.datasets:
        if dc.path in ("json", "csv", "parquet") and isinstance(dc.data_files, str) and not os.path.exists(
                dc.data_files):
            raise DataError(f"Data file {dc.data_files!r} of dataset {dataset_label(dc)!r} not found (relative paths "
                            f"are resolved from {os.getcwd()}).")
    dataset = get_dataset(dataclasses.replace(dataset_args, test_split_size=None))
    if dataset_args.test_split_size is not None:
        dataset = dataset["train"].train_test_split(test_size=dataset_args.test_split_size, seed=seed)
    for split, ds in dataset.items():
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise DataError(f"The {split} data has no column(s) {missing}; it has {ds.column_names}. Give each dataset "
                            f"the columns {list(columns)}.")
        if len(ds) == 0:
            raise DataError(f"The {split} data is empty.")
    return DatasetDict({split: apply_template(ds, template) for split, ds in dataset.items()})


def run_recipe(trainer_cls, columns: tuple[str, ...], script_args, training_args, model_args, dataset_args,
               **trainer_kwargs) -> None:
    """The whole DPO / GRPO recipe: model source, data with ``columns``, scores before, train, save, card, push.

    ``trainer_kwargs``: what the trainer needs beyond the shared arguments (GRPO's ``reward_funcs``)."""
    import torch

    model_path, gguf = resolve_model(script_args, training_args, model_args)
    dataset = load_data(dataset_args, columns, script_args.prompt_template, seed=training_args.seed)
    before = evaluate_before(model_path, script_args, training_args)
    trainer = trainer_cls(
        model=model_path,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"] if "test" in dataset and training_args.eval_strategy != "no" else None,
        hdpissa_config=hdpissa_config_from_args(script_args, model_args, seed=training_args.seed),
        method=script_args.method,
        save_dtype=getattr(torch, script_args.save_dtype) if script_args.save_dtype else None,
        **trainer_kwargs,
    )
    finish_run(trainer, script_args, training_args, model_args, dataset_args, gguf, before,
               extra_info=_extra_info(trainer, script_args))


def _extra_info(trainer, script_args) -> dict[str, Any]:
    """Card lines that say how the run's reference and rewards were set up."""
    args = trainer.args
    info: dict[str, Any] = {}
    if hasattr(args, "precompute_ref_log_probs"):
        info["DPO beta"] = args.beta
        if args.precompute_ref_log_probs:
            info["reference"] = "precomputed log-probabilities of the starting model"
        elif trainer.method == "pissa":
            info["reference"] = "frozen copy of the initial PiSSA adapter"
        else:
            info["reference"] = "frozen copy of the starting model" + (" (synced)" if args.sync_ref_model else "")
    if isinstance(script_args, GRPOScriptArguments):
        info["rewards"] = ", ".join(([script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path
                                     else []) + list(script_args.reward_funcs or []))
        info["generations per prompt"] = args.num_generations
        info["KL beta"] = args.beta
    return info
