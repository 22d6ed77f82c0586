"""What ``recipes/dpo.py`` and ``recipes/grpo.py`` need beyond TRL: script arguments, data, and the end of a run.

The scripts stay thin (parse, build the trainer, call :func:`finish_run`). Model sources, the HD-PiSSA config from
TRL's ``ModelConfig`` and the evaluation before/after are the SFT recipe's (:mod:`hdpissa_trl.recipe`); the data is
TRL's ``DatasetMixtureConfig`` as it is (preference pairs ``prompt``/``chosen``/``rejected`` for DPO, prompts plus
the columns the reward functions read for GRPO), with the same ``prompt_template`` choices as SFT.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, DatasetDict

from .data import ALPACA_TEMPLATE, TEMPLATES, DataError, dataset_label
from .recipe import HDPiSSAScriptArguments, resolve_model_source


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
        from .rewards import get_reward_funcs

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


def load_data(dataset_args, columns: tuple[str, ...], template: str) -> DatasetDict:
    """TRL's dataset mixture, checked for ``columns`` (a clear error naming the dataset), then templated."""
    from trl import get_dataset

    if not dataset_args.datasets:
        raise DataError("No datasets configured: add a `datasets:` list to the YAML (path, data_files, split, ...).")
    for dc in dataset_args.datasets:
        if dc.path in ("json", "csv", "parquet") and isinstance(dc.data_files, str) and not os.path.exists(
                dc.data_files):
            raise DataError(f"Data file {dc.data_files!r} of dataset {dataset_label(dc)!r} not found (relative paths "
                            f"are resolved from {os.getcwd()}).")
    dataset = get_dataset(dataset_args)
    for split, ds in dataset.items():
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise DataError(f"The {split} data has no column(s) {missing}; it has {ds.column_names}. Give each dataset "
                            f"the columns {list(columns)}.")
        if len(ds) == 0:
            raise DataError(f"The {split} data is empty.")
    return DatasetDict({split: apply_template(ds, template) for split, ds in dataset.items()})


def resolve_model(script_args, training_args, model_args) -> tuple[str, dict | None]:
    """The plain checkpoint to train from (as the SFT recipe) and TRL's ``model_init_kwargs`` from ``ModelConfig``."""
    with training_args.main_process_first(local=False, desc="resolving the model source"):
        model_path, gguf = resolve_model_source(model_args.model_name_or_path, script_args.gguf_file,
                                                script_args.build_tiny_model)
    kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                  attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = kwargs
    return model_path, gguf


def evaluate(model_or_dir, tokenizer, script_args, desc: str, dtype: str, trust_remote_code: bool = False):
    """Score ``model_or_dir`` (loaded in ``dtype``) on the configured tasks (main process only); None without tasks."""
    if not script_args.eval_tasks:
        return None
    from evaluation import evaluate_model

    print(f"Evaluating the {desc} model on {', '.join(script_args.eval_tasks)} (limit {script_args.eval_limit})")
    return evaluate_model(model_or_dir, tokenizer, tasks=script_args.eval_tasks, limit=script_args.eval_limit,
                          batch_size=script_args.eval_batch_size, max_new_tokens=script_args.eval_max_new_tokens,
                          chat=script_args.eval_chat, dtype=dtype, trust_remote_code=trust_remote_code)


def evaluate_before(model_path: str, script_args, training_args) -> dict | None:
    """The base model's scores (fp32, main process), for the before/after table; None when not configured."""
    if training_args.process_index != 0 or not (script_args.eval_tasks and script_args.eval_before):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=training_args.trust_remote_code)
    return evaluate(model_path, tokenizer, script_args, "base", "float32", training_args.trust_remote_code)


def finish_run(trainer, script_args, training_args, model_args, dataset_args, gguf: dict | None,
               before: dict | None) -> None:
    """Train, save the merged plain model and state, evaluate after, write the card, push; print where it all is."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    out = training_args.output_dir
    trainer.save_model(out)
    trainer.save_state()
    card: dict[str, Any] = {"run_info": {
        "base model": model_args.model_name_or_path,
        "GGUF source": f"{gguf['gguf_file']} ({gguf.get('quantization')}, sha256 {gguf['sha256'][:12]})"
        if gguf else None,
        "prompt template": script_args.prompt_template,
        "datasets": [dataset_label(d) for d in dataset_args.datasets],
        **_extra_info(trainer, script_args),
    }}
    if training_args.process_index == 0 and script_args.eval_tasks:
        from evaluation import save_report

        after = evaluate(out, trainer.processing_class, script_args, "fine-tuned", "auto",
                         training_args.trust_remote_code)
        after["before"] = before
        save_report(after, os.path.join(out, "eval_results.json"))
        card.update(eval_report=after, eval_before=before)
    model_name = training_args.hub_model_id.split("/")[-1] if training_args.hub_model_id else os.path.basename(
        os.path.abspath(out))
    trainer.create_model_card(model_name=model_name, **card)
    trainer.accelerator.wait_for_everyone()
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
        trainer.accelerator.print(f"Pushed the merged model and its card to {trainer.hub_model_id}.")
    trainer.accelerator.print(
        f"Merged model: {os.path.join(out, 'model.safetensors')}\nModel card:   {os.path.join(out, 'README.md')}\n"
        + (f"Metrics:      {os.path.join(out, 'eval_results.json')}\n" if script_args.eval_tasks else "")
        + f"Train state:  {os.path.join(out, 'trainer_state.json')}"
    )
    if hasattr(trainer, "end"):
        trainer.end()


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
