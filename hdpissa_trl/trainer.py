"""Trainers: the reusable HD-PiSSA component for any ``transformers.Trainer``, and ``HDPiSSASFTTrainer``.

``HDPiSSATrainerMixin`` holds the method's trainer logic in one place:

* wrap the model after the parent built it (:meth:`_hdpissa_setup`);
* keep the model OUT of DDP: DDP would average the per-device adapter gradients and broadcast rank 0's slices over
  everyone's, destroying the method. Nothing but the adapters is trainable, so DDP brings nothing;
* fold after every real optimizer step (:meth:`hdpissa_after_optimizer_step`, the one method to read);
* checkpoint W once, all initial factors and EVERY device's optimizer state, atomically;
* save the merged plain model.

``HDPiSSASFTTrainer = HDPiSSATrainerMixin + trl.SFTTrainer``; the same mixin can make a ``DPOTrainer`` or a plain
``Trainer`` train with HD-PiSSA. ``method="pissa" | "lora" | "full"`` gives the baselines in the same trainer
(PEFT for LoRA/PiSSA), so every comparison shares data, schedule and logging.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import json
import os
import shutil
import time
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from .config import HDPiSSAConfig
from .model import HDPiSSAEngine, inject_hdpissa
from .sync import FoldStats

METHODS = ("hdpissa", "pissa", "lora", "full")
HDPISSA_STATE_NAME = "hdpissa_state.safetensors"
COMPLETE_MARKER = "CHECKPOINT_COMPLETE"


def build_peft_config(method: str, config: HDPiSSAConfig):
    """The PEFT ``LoraConfig`` of a LoRA / PiSSA baseline with the same r, alpha, targets and dropout."""
    from peft import LoraConfig

    init: Any = True
    if method == "pissa":
        init = "pissa" if config.init_method == "svd" else f"pissa_niter_{config.n_iter}"
    return LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
                      exclude_modules=config.exclude_modules, lora_dropout=config.lora_dropout,
                      init_lora_weights=init, task_type="CAUSAL_LM")


class _FoldCallback(TrainerCallback):
    """Calls the trainer's fold right after ``optimizer.step()`` (before scheduler, logging and saving)."""

    def __init__(self, trainer: HDPiSSATrainerMixin):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.hdpissa_after_optimizer_step()


class HDPiSSATrainerMixin:
    """HD-PiSSA for any ``transformers.Trainer`` subclass: put it first in the bases.

    Extra constructor arguments: ``hdpissa_config`` (:class:`HDPiSSAConfig`), ``method`` (``"hdpissa"``, ``"pissa"``,
    ``"lora"``, ``"full"``) and ``save_dtype`` (dtype of the merged model written by ``save_model``; default: the
    training dtype).
    """

    hdpissa_engine: HDPiSSAEngine | None = None

    def _hdpissa_pre_init(self, method: str, hdpissa_config: HDPiSSAConfig | None, kwargs: dict) -> None:
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
        self.method = method
        self.hdpissa_config = hdpissa_config or HDPiSSAConfig()
        if method in ("pissa", "lora"):
            if kwargs.get("peft_config") is None:
                kwargs["peft_config"] = build_peft_config(method, self.hdpissa_config)
        elif kwargs.get("peft_config") is not None:
            raise ValueError(f"method={method!r} does not take a peft_config (use method='lora' or 'pissa').")

    def _hdpissa_setup(self, save_dtype: torch.dtype | None) -> None:
        """Inject the adapters (after the parent loaded and placed the model) and keep the model out of DDP."""
        self.save_dtype = save_dtype
        self._fold_log: list[FoldStats] = []
        self._skipped_folds = 0
        self._apply_ddp_timeout()
        if self.method != "hdpissa":
            return
        model = self.accelerator.unwrap_model(self.model)
        world = self.accelerator.num_processes
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() != world:
            raise RuntimeError(f"World size mismatch: accelerate says {world}, torch.distributed says "
                               f"{dist.get_world_size()}.")
        self._check_targets(model)
        self.hdpissa_engine = inject_hdpissa(model, self.hdpissa_config, rank=self.accelerator.process_index,
                                             world_size=world, show_progress=self.accelerator.is_main_process)
        if getattr(self.args, "gradient_checkpointing", False) and hasattr(model, "enable_input_require_grads"):
            # Frozen embeddings give hidden states without grad; reentrant checkpointing would then drop the
            # adapter gradients inside checkpointed blocks (PEFT does the same).
            model.enable_input_require_grads()
        # DDP trap guard: prepare the model as accelerate does for evaluation (device placement, autocast) but
        # never wrap it in DistributedDataParallel.
        original = self.accelerator.prepare_model

        @functools.wraps(original)
        def prepare_model_without_ddp(model, device_placement=None, evaluation_mode=False):
            return original(model, device_placement=device_placement, evaluation_mode=True)

        self.accelerator.prepare_model = prepare_model_without_ddp
        self.add_callback(_FoldCallback(self))

    def _apply_ddp_timeout(self) -> None:
        """Make ``ddp_timeout`` bound every collective on CPU too, so a dead or hung peer stops the others.

        transformers passes ``ddp_timeout`` to ``init_process_group`` on GPUs but not with ``use_cpu=True``: the gloo
        group then keeps torch's 30-minute default, and a hung process stalls the others that long.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
            return
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        if set_timeout is not None:
            set_timeout(datetime.timedelta(seconds=self.args.ddp_timeout))

    def _check_targets(self, model) -> None:
        """SFTTrainer computes log-probs from ``lm_head.weight`` directly (fused LM head): an adapter there would
        never receive a gradient. Refuse it before any work, as TRL does for PEFT."""
        from .model import find_target_modules

        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or not isinstance(self, SFTTrainer):
            return
        hit = [name for name, mod in find_target_modules(model, self.hdpissa_config) if mod is head]
        if hit:
            raise ValueError(f"Adapting the output head {hit[0]!r} is not supported with SFTTrainer: it computes "
                             f"log-probabilities from its weight directly (fused LM head), so the adapter would never "
                             f"be trained. Remove it from target_modules (or use 'all-linear', which leaves it out).")

    # -- the fold ---------------------------------------------------------------------------------------------
    def hdpissa_after_optimizer_step(self) -> None:
        """Fold every device's adapter deltas into W right after a real optimizer step; reset the adapters.

        Called at gradient-accumulation boundaries only (``on_optimizer_step``). A device whose step was skipped
        (fp16 GradScaler found inf/nan) contributes a zero delta; the fold runs on every rank regardless, so the
        collective never deadlocks on a per-device decision.
        """
        if self.hdpissa_engine is None:
            return
        if self.accelerator.optimizer_step_was_skipped:
            self._skipped_folds += 1
        self._fold_log.append(self.hdpissa_engine.fold())
        if self.hdpissa_engine.factors_changed:  # subspace 'refactor'/'rotate': new directions, restart their moments
            self.optimizer.state.clear()

    # -- logging ----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.hdpissa_engine is not None and "loss" in logs and self._fold_log:
            n = len(self._fold_log)
            logs["hdpissa/fold_seconds"] = round(sum(s.seconds for s in self._fold_log) / n, 6)
            logs["hdpissa/gather_seconds"] = round(sum(s.gather_seconds for s in self._fold_log) / n, 6)
            logs["hdpissa/bytes_communicated"] = self._fold_log[-1].bytes_sent + self._fold_log[-1].bytes_received
            logs["hdpissa/collectives_per_step"] = sum(s.num_collectives for s in self._fold_log) / n
            logs["hdpissa/update_rank"] = self._fold_log[-1].update_rank_bound
            check = self.hdpissa_engine.last_check
            logs["hdpissa/w_check_step"] = check["step"] if check["step"] is not None else -1
            logs["hdpissa/w_check_ok"] = 1.0 if check["ok"] else 0.0
            if self._skipped_folds:
                logs["hdpissa/skipped_local_steps"] = self._skipped_folds
            self._fold_log = []
        super().log(logs, *args, **kwargs)

    # -- model card -------------------------------------------------------------------------------------------
    def hdpissa_card_info(self) -> dict[str, Any]:
        """What the model card says about the method and run (extended by recipes with data and provenance)."""
        cfg, K = self.hdpissa_config, self.accelerator.num_processes
        info: dict[str, Any] = {"method": self.method, "devices K": K}
        if self.method == "hdpissa":
            info.update({"per-device r": cfg.r, "lora_alpha": cfg.lora_alpha,
                         "update rank per step (2·K·r)": 2 * K * cfg.r,
                         "directions owned (K·r)": K * cfg.r, "init": cfg.init_method,
                         "W precision": cfg.precision, "target modules": cfg.target_modules,
                         "subspace schedule": cfg.subspace + ("" if cfg.subspace in ("fixed", "moving") else
                                                              f" every {cfg.subspace_steps} folds")})
        elif self.method in ("pissa", "lora"):
            info.update({"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target modules": cfg.target_modules})
        args = self.args
        info.update({"learning rate": args.learning_rate, "lr scheduler": getattr(args.lr_scheduler_type, "value",
                                                                                   args.lr_scheduler_type),
                     "optimizer steps": self.state.global_step,
                     "effective batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * K,
                     "weight decay": args.weight_decay})
        info.update(getattr(self, "hdpissa_extra_card_info", {}) or {})
        return info

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, **kwargs) -> None:
        """TRL's card plus the HD-PiSSA section, the loss plot and ``model-index`` evaluation results."""
        from .card import plot_training_loss, update_model_card

        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags + ["hd-pissa"])
        if not self.is_world_process_zero():
            return
        out = self.args.output_dir
        plot = plot_training_loss(self.state.log_history, os.path.join(out, "training_loss.png"))
        update_model_card(os.path.join(out, "README.md"), self.hdpissa_card_info(),
                          report=getattr(self, "hdpissa_eval_report", None),
                          before=getattr(self, "hdpissa_eval_before", None), loss_plot=plot,
                          model_name=model_name or os.path.basename(os.path.abspath(out)))

    # -- saving -----------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the merged plain model (no adapters inside) + tokenizer, in the training dtype or ``save_dtype``.

        The Hub token is blanked while ``training_args.bin`` is written, so it never lands in a file.
        """
        with self._hub_token_outside_args():
            self._save_merged(output_dir, state_dict)

    def _save_merged(self, output_dir: str | None, state_dict: dict | None) -> None:
        if self.hdpissa_engine is not None and state_dict is None:
            state_dict = self.hdpissa_engine.merged_state_dict(self.save_dtype)
            return super()._save(output_dir, state_dict=state_dict)
        if self.method in ("pissa", "lora") and not getattr(self, "_in_checkpoint", False):
            # Final model of a PEFT baseline: merge on a copy so training state stays untouched.
            if self.args.should_save:
                merged = copy.deepcopy(self.accelerator.unwrap_model(self.model)).merge_and_unload()
                if self.save_dtype is not None:
                    merged.to(self.save_dtype)
                os.makedirs(output_dir or self.args.output_dir, exist_ok=True)
                merged.save_pretrained(output_dir or self.args.output_dir)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir or self.args.output_dir)
            return
        return super()._save(output_dir, state_dict=state_dict)

    def _barrier(self) -> None:
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a hidden temp dir and rename it into place once every rank has finished.

        A crash mid-save leaves only ``.tmp-checkpoint-N`` (never matched by ``checkpoint-*`` discovery).
        """
        run_dir = self._get_output_dir(trial=trial)
        name = f"checkpoint-{self.state.global_step}"
        tmp_parent = os.path.join(run_dir, f".tmp-{name}")
        final = os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(run_dir):
            # Leftovers of a save that crashed (this step's or any other): never complete, never resumed from.
            for entry in os.listdir(run_dir):
                if entry.startswith(f".tmp-{PREFIX_CHECKPOINT_DIR}-"):
                    shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)
        self._barrier()
        real_output_dir = self.args.output_dir
        self._in_checkpoint = True
        self._pending_push = None
        try:
            self.args.output_dir = tmp_parent
            super()._save_checkpoint(model, trial)
            tmp = os.path.join(tmp_parent, name)
            self._save_hdpissa_state(tmp)
        finally:
            self.args.output_dir = real_output_dir
            self._in_checkpoint = False
        self._barrier()
        if self.args.should_save:
            tmp = os.path.join(tmp_parent, name)
            with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
                json.dump({"global_step": self.state.global_step, "world_size": self.accelerator.num_processes,
                           "method": self.method, "time": time.time()}, f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            shutil.rmtree(tmp_parent, ignore_errors=True)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            if self._pending_push is not None:
                self._push_from_checkpoint(final)
        self._pending_push = None
        self._barrier()

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push a checkpoint to the Hub once it is complete and in place, with the Hub token in no file.

        transformers calls this from inside ``_save_checkpoint``: here that is while the checkpoint is still in the temp
        dir, which is renamed and deleted right after (the asynchronous upload would race that), and it pickles the
        training arguments, token included, into ``training_args.bin`` of the pushed folder. So the push is deferred
        to the end of :meth:`_save_checkpoint`, and the token rides in the upload client instead of the arguments.
        """
        if getattr(self, "_in_checkpoint", False):
            self._pending_push = checkpoint_folder
            return
        with self._hub_token_outside_args():
            super()._push_from_checkpoint(checkpoint_folder)

    @contextlib.contextmanager
    def _hub_token_outside_args(self):
        """While the body runs ``args.hub_token`` is None (pickling the arguments cannot write it) and transformers'
        Hub client (``transformers.trainer.hf_api``) carries the token. Without that client the token is simply held
        back (fails closed: the push then needs ``HF_TOKEN`` or a stored login)."""
        import transformers.trainer as hf_trainer

        token = getattr(self.args, "hub_token", None)
        factory = getattr(hf_trainer, "hf_api", None)
        if token is None:
            yield
            return
        if factory is not None and getattr(self, "_hub_api_with_token", None) is None:
            self._hub_api_with_token = copy.copy(factory())
            self._hub_api_with_token.token = token
        self.args.hub_token = None
        if factory is not None:
            hf_trainer.hf_api = lambda: self._hub_api_with_token
        try:
            yield
        finally:
            self.args.hub_token = token
            if factory is not None:
                hf_trainer.hf_api = factory

    def _save_hdpissa_state(self, ckpt_dir: str) -> None:
        """Every rank writes its optimizer state; rank 0 writes the initial factors and precision state once."""
        os.makedirs(ckpt_dir, exist_ok=True)
        if self.hdpissa_engine is None:
            return
        rank = self.accelerator.process_index
        torch.save(self.optimizer.state_dict(), os.path.join(ckpt_dir, f"optimizer_rank{rank}.pt"))
        if self.args.should_save:
            from safetensors.torch import save_file

            state = self.hdpissa_engine.state_dict()
            save_file(state["tensors"], os.path.join(ckpt_dir, HDPISSA_STATE_NAME), metadata=state["metadata"])

    # -- resuming ---------------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.hdpissa_engine is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_hdpissa_checkpoint(self.hdpissa_engine, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.hdpissa_engine is None:
            return
        path = os.path.join(checkpoint, f"optimizer_rank{self.accelerator.process_index}.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Cannot resume: {path} is missing (every device's optimizer state is needed).")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip, bad pickle: torch names neither the file nor the cause
            raise ValueError(f"Cannot resume: {path} is corrupt or truncated ({type(exc).__name__}: {exc}).") from exc
        self.optimizer.load_state_dict(state)


def load_hdpissa_checkpoint(engine: HDPiSSAEngine, ckpt_dir: str) -> None:
    """Restore W and the engine state from a checkpoint dir; clear errors for incomplete or foreign checkpoints."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(os.path.join(ckpt_dir, COMPLETE_MARKER)):
        raise ValueError(f"Checkpoint {ckpt_dir} is incomplete (no {COMPLETE_MARKER}): it was interrupted while "
                         f"being written. Resume from an earlier checkpoint.")
    state_path = os.path.join(ckpt_dir, HDPISSA_STATE_NAME)
    weights_path = os.path.join(ckpt_dir, "model.safetensors")
    tensors = {}
    for path in (state_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Cannot resume: {path} is missing (not an HD-PiSSA checkpoint?).")
        try:
            tensors[path] = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"Cannot resume: {path} is corrupt or truncated ({exc}).") from exc
    from safetensors import safe_open

    with safe_open(state_path, "pt") as f:
        meta = f.metadata()
    # First the engine state: it refuses another K, r, precision or layer set before W is touched (and restores
    # the fp32 master; the W saved in the model dtype is exactly that master's cast, so W below agrees with it).
    engine.load_state_dict({"tensors": tensors[state_path], "metadata": meta})
    weights = tensors[weights_path]
    with torch.no_grad():
        for key, param in engine.model.state_dict(keep_vars=True).items():
            if key.split(".")[-1] in ("lora_A", "lora_B", "A0_all", "B0_all"):
                continue
            plain = key.replace(".base_layer.", ".")
            if plain not in weights:
                if param.is_floating_point() and key.endswith("weight") and "lm_head" not in key:
                    raise ValueError(f"Cannot resume: {weights_path} has no tensor {plain!r} (another model?).")
                continue
            src = weights[plain]
            if src.shape != param.shape:
                raise ValueError(f"Cannot resume: {plain!r} has shape {tuple(src.shape)} in the checkpoint but "
                                 f"{tuple(param.shape)} in this model (another model?).")
            param.data.copy_(src.to(param.dtype))
    engine.check_consistency(engine.step, on_mismatch="raise")


class HDPiSSASFTTrainer(HDPiSSATrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` training with HD-PiSSA (or a baseline: ``method="pissa" | "lora" | "full"``).

    Example::

        trainer = HDPiSSASFTTrainer(model="path/or/name", args=SFTConfig(...), train_dataset=ds,
                                    hdpissa_config=HDPiSSAConfig(r=16, lora_alpha=16))
        trainer.train(); trainer.save_model(); trainer.push_to_hub()

    Launch with ``accelerate launch --num_processes K script.py``: each process owns one slice of every adapted
    layer's top ``K·r`` singular directions. Everything else behaves like ``SFTTrainer``.
    """

    def __init__(self, *args, hdpissa_config: HDPiSSAConfig | None = None, method: str = "hdpissa",
                 save_dtype: torch.dtype | None = None, **kwargs):
        self._hdpissa_pre_init(method, hdpissa_config, kwargs)
        self._check_datasets(args[1] if len(args) > 1 else kwargs.get("args"), kwargs)
        super().__init__(*args, **kwargs)
        self._hdpissa_setup(save_dtype)

    @staticmethod
    def _check_datasets(args, kwargs: dict) -> None:
        """Empty datasets and missing columns fail here, in one line, before the model is loaded."""
        from .data import check_sft_dataset

        dataset_kwargs = getattr(args, "dataset_kwargs", None) or {}
        needs_columns = kwargs.get("formatting_func") is None and not dataset_kwargs.get("skip_prepare_dataset")
        text_field = getattr(args, "dataset_text_field", "text")
        check_sft_dataset(kwargs.get("train_dataset"), "train", text_field, needs_columns)
        check_sft_dataset(kwargs.get("eval_dataset"), "eval", text_field, needs_columns)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        from .data import check_after_truncation

        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        check_after_truncation(dataset, prepared, dataset_name, args.max_length)
        return prepared
