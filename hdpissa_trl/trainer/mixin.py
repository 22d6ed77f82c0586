"""The reusable HD-PiSSA component for any ``transformers.Trainer`` (TRL's trainers build on it: ``sft_trainer.py``,
``dpo_trainer.py``, ``grpo_trainer.py``; a plain ``Trainer``: ``plain_trainer.py``).

``HDPiSSATrainerMixin`` is the method's trainer logic, self-contained (``class MyTrainer(HDPiSSATrainerMixin,
SomeTrainer): pass`` is a whole trainer):

* set-up: after the parent built and placed the model, inject the adapters (:meth:`_hdpissa_setup`) and keep the
  model OUT of DDP: DDP would average the per-device adapter gradients and broadcast rank 0's slices over everyone's,
  destroying the method. Nothing but the adapters is trainable, so DDP brings nothing;
* the fold after every real optimizer step: :meth:`hdpissa_after_optimizer_step`, the one method to read;
* logging of the fold's cost and the W check; the merged plain model as the saved model; the model card.

Checkpoints (atomic, every device's optimizer state, exact resume) are in :mod:`hdpissa_trl.trainer.checkpoint`.
``method="pissa" | "lora" | "full"`` gives the baselines in the same trainer (PEFT for LoRA/PiSSA), so every
comparison shares data, schedule and logging.
"""

from __future__ import annotations

import copy
import datetime
import inspect
import logging
import os
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..engine.config import HDPiSSAConfig
from ..engine.distributed import is_distributed
from ..engine.export import weight_samples
from ..engine.fold import FoldStats
from ..engine.inject import inject_hdpissa
from ..engine.model import reduce_traffic
from .amp import agree_on_skip
from .checkpoint import CheckpointMixin, writes_on_each_node
from .checks import check_optimizer_trains_the_model, model_skeleton, refuse_optimizer_built_before_the_trainer
from .fsdp import check_sharded_storage, requested_fsdp_plugin, shard_like_accelerate
from .parallel import check_model_on_device, check_parallelism, load_whole_model_per_process

METHODS = ("hdpissa", "pissa", "lora", "full")
logger = logging.getLogger(__name__)


def build_peft_config(method: str, config: HDPiSSAConfig):
    """The PEFT ``LoraConfig`` of a LoRA / PiSSA baseline with the same r, alpha, targets and dropout."""
    from peft import LoraConfig

    init: Any = True
    if method == "pissa":
        init = "pissa" if config.init_method == "svd" else f"pissa_niter_{config.n_iter}"
    return LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
                      exclude_modules=config.exclude_modules, lora_dropout=config.lora_dropout,
                      init_lora_weights=init, task_type="CAUSAL_LM")


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def resolve_method(method: str | None, hdpissa_config: HDPiSSAConfig | None, peft_config, model) -> str:
    """What the trainer trains: ``method`` when given; else HD-PiSSA, or, when the user passed a PEFT adapter
    (``peft_config`` or a ``PeftModel``) and no ``hdpissa_config``, ``"peft"``: that adapter exactly as the parent
    trainer trains it (code written for ``SFTTrainer`` keeps working unchanged)."""
    user_peft = peft_config is not None or _is_peft_model(model)
    what = "peft_config" if peft_config is not None else "a PeftModel as model"
    if method is not None and method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if not user_peft:
        return method or "hdpissa"
    if method in ("pissa", "lora"):
        return method  # the user's PEFT adapter is the baseline
    if method == "full" or hdpissa_config is not None or method == "hdpissa":
        given = f"method={method!r}" if method else "hdpissa_config"
        hint = ("pass the base model (model.get_base_model(), or model.merge_and_unload() to keep the adapter's "
                "weights)" if peft_config is None else
                "train HD-PiSSA with this LoraConfig's settings via hdpissa_config=HDPiSSAConfig.from_peft(peft_config)")
        raise ValueError(f"Both {given} and {what} were given. Either leave out {given} to train the PEFT adapter "
                         f"exactly as the parent trainer does, or {hint}.")
    return "peft"


class _FoldCallback(TrainerCallback):
    """Calls the trainer's fold right after ``optimizer.step()`` (before scheduler, logging and saving)."""

    def __init__(self, trainer: HDPiSSATrainerMixin):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # fp16: every device's GradScaler skips together, so a skipped step is skipped everywhere (amp.py).
        agree_on_skip(getattr(self.trainer.accelerator, "scaler", None), self.trainer.optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.hdpissa_after_optimizer_step()


def _rank_text(r: int, ranks: list[int]) -> str:
    """The card's per-device r: ``r``, or with layers fitted below it (K·r > min(out, in)) how many layers got which r."""
    if set(ranks) == {r}:
        return str(r)
    counts = Counter(ranks)
    return f"{r}, fitted per layer: " + ", ".join(f"r={k} on {counts[k]}" for k in sorted(counts, reverse=True))


class HDPiSSATrainerMixin(CheckpointMixin):
    """HD-PiSSA for any ``transformers.Trainer`` subclass: put it first in the bases; nothing else is needed.

    Args (keyword-only, besides the parent trainer's own):
        hdpissa_config: the :class:`HDPiSSAConfig` (default: ``HDPiSSAConfig()``).
        method: ``"hdpissa"`` (default), or a baseline in the same trainer: ``"pissa"``, ``"lora"`` (PEFT, built from
            ``hdpissa_config``'s r, alpha, targets and dropout) or ``"full"`` fine-tuning.
        save_dtype: dtype of the FINAL merged model written by ``save_model`` (default: the training dtype).
            Checkpoints always keep the training precision.

    A ``peft_config`` (or a ``PeftModel`` as ``model``) without ``hdpissa_config`` keeps the parent's meaning: that PEFT
    adapter is trained exactly as the parent trainer trains it, and the log says HD-PiSSA is not used
    (``HDPiSSAConfig.from_peft(lora_config)`` gives HD-PiSSA with its settings). Both together are an error.
    """

    def __init__(self, *args, hdpissa_config: HDPiSSAConfig | None = None, method: str | None = None,
                 save_dtype: torch.dtype | None = None, **kwargs):
        parent_init = inspect.signature(super().__init__)
        bound = parent_init.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in parent_init.parameters})
        given = bound.arguments
        self.method = resolve_method(method, hdpissa_config, given.get("peft_config"), given.get("model"))
        self.hdpissa_config = hdpissa_config or HDPiSSAConfig()
        self.save_dtype = save_dtype
        if self.method in ("pissa", "lora") and given.get("peft_config") is None and not _is_peft_model(
                given.get("model")) and "peft_config" in parent_init.parameters:
            kwargs["peft_config"] = build_peft_config(self.method, self.hdpissa_config)
        refuse_optimizer_built_before_the_trainer(given.get("optimizers"), self._trains_what_it_creates(given.get(
            "model")), "optimizer_cls_and_kwargs" in parent_init.parameters, self.method)
        if self.method == "hdpissa":
            training_args = given.get("args")
            check_parallelism(training_args, given.get("model"), getattr(training_args, "world_size", 1))
            load_whole_model_per_process(training_args, given.get("model"))  # FSDP: not TRL's device_map="auto"
            self.hdpissa_check_before_loading(training_args, given.get("model"))
            check_sharded_storage(training_args)
        super().__init__(*args, **self.hdpissa_parent_kwargs(kwargs))
        self._hdpissa_setup()

    # -- set-up -----------------------------------------------------------------------------------------------
    def _hdpissa_setup(self) -> None:
        """Inject the adapters (after the parent loaded and placed the model) and keep the model out of DDP."""
        self._fold_log: list[FoldStats] = []
        self._reduce_log: list[int] = []  # slice_gradient="global": bytes of each step's slice-gradient buffer
        self._skipped_steps = 0
        if self.method == "peft":
            if self.accelerator.is_main_process:
                parent = next(c for c in type(self).__mro__ if not issubclass(c, CheckpointMixin)).__name__
                logger.warning("%s got a PEFT adapter (peft_config or a PeftModel) and no hdpissa_config: it trains "
                               "that adapter exactly as %s does; HD-PiSSA is NOT used. For HD-PiSSA with the same "
                               "settings pass hdpissa_config=HDPiSSAConfig.from_peft(peft_config) instead.",
                               type(self).__name__, parent)
            return
        self._apply_ddp_timeout()
        if self.method != "hdpissa":
            return
        model = self.accelerator.unwrap_model(self.model)
        world = self.accelerator.num_processes
        if is_distributed() and dist.get_world_size() != world:
            raise RuntimeError(f"World size mismatch: accelerate says {world}, torch.distributed says "
                               f"{dist.get_world_size()}.")
        check_parallelism(self.args, model, world)
        self.hdpissa_check_model(model)
        plugin = requested_fsdp_plugin(self.args, self.accelerator)
        if plugin is not None:
            # W sharded by rows: shard the frozen model as accelerate's FSDP2 would, THEN create the adapters, so
            # FSDP never manages them (no reduce-scatter of their gradients, no broadcast of rank 0's slices).
            model = shard_like_accelerate(model, self.accelerator, plugin)
        check_model_on_device(model, dist.get_backend() if is_distributed() else None)
        self.hdpissa_engine = inject_hdpissa(model, self.hdpissa_config, rank=self.accelerator.process_index,
                                             world_size=world, show_progress=self.accelerator.is_main_process)
        if getattr(self.args, "disable_dropout", False):
            # TRL's disable_dropout (DPO, GRPO, ...) ran before the adapters existed: the same rule for their dropout.
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        # A few thousand entries of every starting W: save_adapter refuses a base checkpoint that is not this one.
        self._hdpissa_start_samples = weight_samples(self.hdpissa_engine)
        backend = dist.get_backend() if is_distributed() else "none"
        self.accelerator.print(
            f"HD-PiSSA: K={world} devices (torch.distributed world size {world}, backend {backend}), "
            + ("W sharded by rows with FSDP2 (each rank folds 1/K of every weight)." if plugin is not None
               else "W replicated on every device.")
        )
        if getattr(self.args, "gradient_checkpointing", False) and hasattr(model, "enable_input_require_grads"):
            # Frozen embeddings give hidden states without grad; reentrant checkpointing would then drop the
            # adapter gradients inside checkpointed blocks (PEFT does the same).
            model.enable_input_require_grads()
        # DDP trap guard: accelerate has no switch to skip the DDP wrap of a model with trainable parameters, so its
        # prepare_model is told to prepare as for evaluation (device placement, autocast), never wrapping in DDP.
        original = self.accelerator.prepare_model

        def prepare_model_without_ddp(model, device_placement=None, evaluation_mode=False):
            return original(model, device_placement=device_placement, evaluation_mode=True)

        self.accelerator.prepare_model = prepare_model_without_ddp
        self.add_callback(_FoldCallback(self))

    def _trains_what_it_creates(self, model) -> str | None:
        """Why an optimizer built before the trainer cannot hold what this run trains (``None``: it can)."""
        if self.method == "peft":
            return None  # the parent trainer's meaning, unchanged
        if isinstance(model, str):
            return f"the trainer loads the model from {model!r} itself"
        if self.method == "hdpissa":
            return "HD-PiSSA's per-device adapters are created inside the trainer, after the optimizer"
        if self.method in ("pissa", "lora") and not _is_peft_model(model):
            return f"the {self.method} adapter is created inside the trainer, after the optimizer"
        return None

    def hdpissa_check_model(self, model) -> None:
        """Trainer-specific refusals, before any adapter is injected (no-op here; see ``HDPiSSASFTTrainer``). Run twice:
        before the parent trainer loads anything (on :meth:`hdpissa_check_before_loading`'s skeleton) and on the
        loaded model."""

    def hdpissa_parent_kwargs(self, kwargs: dict) -> dict:
        """The parent trainer's keyword arguments, after every refusal and right before the parent's ``__init__`` runs
        (DPO adds its frozen reference model here)."""
        return kwargs

    def hdpissa_check_before_loading(self, args, model) -> None:
        """The refusals, before the parent trainer loads a model or data or computes anything (a path is checked on a
        weightless skeleton built from its config)."""
        skeleton = model_skeleton(model, args)
        if skeleton is not None:
            self.hdpissa_check_model(skeleton)

    def _apply_ddp_timeout(self) -> None:
        """Make ``ddp_timeout`` bound every collective on CPU too, so a dead or hung peer stops the others.

        transformers passes ``ddp_timeout`` to ``init_process_group`` on GPUs but not with ``use_cpu=True``: the gloo
        group then keeps torch's 30-minute default, and a hung process stalls the others that long.
        """
        if not is_distributed() or dist.get_backend() != "gloo":
            return
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        if set_timeout is not None:
            set_timeout(datetime.timedelta(seconds=self.args.ddp_timeout))

    # -- the fold ---------------------------------------------------------------------------------------------
    def training_step(self, *args, **kwargs):
        """The parent's step; with ``slice_gradient="global"``, after the last micro-batch's backward of an optimizer
        step (before the trainer clips), the reduce-scatter that gives each device its slice's global-batch
        gradient."""
        loss = super().training_step(*args, **kwargs)
        engine = getattr(self, "hdpissa_engine", None)
        if engine is not None and engine.global_slice_gradients and self.accelerator.sync_gradients:
            self._reduce_log.append(engine.reduce_slice_gradients())
        return loss

    def hdpissa_after_optimizer_step(self) -> None:
        """Fold every device's adapter deltas into W right after a real optimizer step; reset the adapters.

        Called at gradient-accumulation boundaries only (``on_optimizer_step``). An fp16 step skipped by the
        GradScaler (inf/nan) is skipped by every device together (``on_pre_optimizer_step`` agreed on it), so no device
        has a delta and nothing is folded: no collective is waited for.
        """
        if self.hdpissa_engine is None:
            return
        if self.accelerator.optimizer_step_was_skipped:
            self._skipped_steps += 1
            return
        self._fold_log.append(self.hdpissa_engine.fold())
        if self.hdpissa_engine.factors_changed:  # subspace 'refactor'/'rotate': new directions, restart their moments
            self.optimizer.state.clear()

    def create_optimizer(self, *args, **kwargs):
        """The parent's optimizer; with ``subspace_warmup_steps`` its steps run at the engine's warm-up fraction of the
        scheduled rate after each change of the factors (step hooks: the scheduler keeps its own rate)."""
        given = self.optimizer  # set on the trainer by the user (optimizers=... is refused when it cannot train)
        optimizer = super().create_optimizer(*args, **kwargs)
        if given is not None and self.method != "peft":
            check_optimizer_trains_the_model(optimizer, self.lr_scheduler, self.model, self.method)
        engine = getattr(self, "hdpissa_engine", None)
        if engine is not None and self.hdpissa_config.subspace_warmup_steps and \
                getattr(optimizer, "_hdpissa_lr_hooks", None) is None:
            optimizer._hdpissa_lr_hooks = engine.scale_learning_rate(optimizer)
        return optimizer

    # -- logging ----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.hdpissa_engine is not None and "loss" in logs:
            if self._fold_log:
                n, last = len(self._fold_log), self._fold_log[-1]
                logs["hdpissa/fold_seconds"] = round(sum(s.seconds for s in self._fold_log) / n, 6)
                logs["hdpissa/gather_seconds"] = round(sum(s.gather_seconds for s in self._fold_log) / n, 6)
                traffic = last.bytes_sent + last.bytes_received
                collectives = sum(s.num_collectives for s in self._fold_log) / n
                if self._reduce_log:  # the reduce before the optimizer counts as communication of the step too
                    traffic += reduce_traffic(self._reduce_log[-1], self.hdpissa_engine.world_size)
                    collectives += float(self.hdpissa_engine.world_size > 1)
                logs["hdpissa/bytes_communicated"] = traffic
                logs["hdpissa/collectives_per_step"] = collectives
                logs["hdpissa/update_rank"] = last.update_rank_bound
                self._fold_log, self._reduce_log = [], []
            check = self.hdpissa_engine.last_check
            logs["hdpissa/w_check_step"] = check.step if check.step is not None else -1
            logs["hdpissa/w_check_ok"] = 1.0 if check.ok else 0.0
            if self._skipped_steps:
                logs["hdpissa/skipped_steps"] = self._skipped_steps
        super().log(logs, *args, **kwargs)

    # -- model card -------------------------------------------------------------------------------------------
    def hdpissa_card_info(self) -> dict[str, Any]:
        """What the model card says about the method and the run."""
        cfg, K, args = self.hdpissa_config, self.accelerator.num_processes, self.args
        info: dict[str, Any] = {"method": self.method, "devices K": K}
        if self.method == "hdpissa":
            ranks = [layer.r for layer in self.hdpissa_engine.layers]
            info.update({"per-device r": _rank_text(cfg.r, ranks), "adapted layers": len(ranks),
                         "lora_alpha": cfg.lora_alpha,
                         "update rank per step (2·K·r)": 2 * K * max(ranks),
                         "directions owned (K·r)": K * max(ranks), "init": cfg.init_method,
                         "W precision": cfg.precision, "target modules": cfg.target_modules,
                         "subspace schedule": cfg.subspace + ("" if cfg.subspace in ("fixed", "moving") else
                                                              f" every {cfg.subspace_steps} folds"),
                         "slice gradients": "each device's own data (the paper)" if cfg.slice_gradient == "local"
                         else "the whole global batch (experimental)"})
        elif self.method in ("pissa", "lora"):
            info.update({"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target modules": cfg.target_modules})
        info.update({"learning rate": args.learning_rate,
                     "lr scheduler": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
                     "optimizer steps": self.state.global_step,
                     "effective batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * K,
                     "weight decay": args.weight_decay})
        return info

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, *, run_info: dict[str, Any] | None = None,
                          eval_report: dict | None = None, eval_before: dict | None = None, **kwargs) -> None:
        """TRL's card plus the HD-PiSSA section, the loss plot and ``model-index`` evaluation results.

        Args beyond TRL's: ``run_info`` (extra rows for the settings table: base model, datasets, ...),
        ``eval_report`` (scores of the trained model, :func:`evaluation.evaluate_model`'s report) and ``eval_before``
        (the base model's, for a before/after table). ``push_to_hub(**same)`` passes them on.
        """
        from .card import plot_training_loss, update_model_card

        if self.method == "peft":
            return super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags + ["hd-pissa"])
        if not self.is_world_process_zero():
            return
        out = self.args.output_dir
        plot = plot_training_loss(self.state.log_history, os.path.join(out, "training_loss.png"))
        update_model_card(os.path.join(out, "README.md"), {**self.hdpissa_card_info(), **(run_info or {})},
                          report=eval_report, before=eval_before, loss_plot=plot,
                          model_name=model_name or os.path.basename(os.path.abspath(out)))

    # -- the update as a PEFT LoRA adapter --------------------------------------------------------------------
    def save_adapter(self, path: str | None = None, **kwargs):
        """Write the run's update ``W_final − W_start`` as a PEFT LoRA adapter on the starting model (default path
        ``<output_dir>/adapter``): ``adapter_config.json``, ``adapter_model.safetensors`` and a card with the relative
        error of the update per layer and overall. Every rank must call it (layer ``i`` is factored on rank ``i mod
        K``); returns an :class:`~hdpissa_trl.trainer.adapter.AdapterExport` on rank 0.

        Keyword args: ``base_model`` (where ``W_start`` is read: default the model's ``name_or_path``),
        ``base_model_name_or_path`` (what the config and card name), ``rank`` (default ``2·K·r`` per layer),
        ``factorization`` (``"auto"``, ``"exact"``, ``"svd"``), ``dtype``, ``error_warning`` (default 0.05) and the
        card's ``run_info``, ``eval_report``, ``eval_before``, ``model_name``. See docs/adapter.md.
        """
        from .adapter import save_adapter

        return save_adapter(self, path, **kwargs)

    def push_adapter_to_hub(self, repo_id: str | None = None, path: str | None = None, **kwargs) -> str | None:
        """Upload the adapter :meth:`save_adapter` wrote (default repo: ``<hub_model_id>-adapter``, so it never
        overwrites the merged model's repo); the token comes from ``token=`` or ``args.hub_token`` and is written
        nowhere. Returns the commit URL on rank 0."""
        from .adapter import push_adapter

        return push_adapter(self, repo_id, path, **kwargs)

    # -- the saved model --------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """With W sharded (FSDP2) every rank takes part: the merged model is gathered onto rank 0 tensor by tensor
        and written there as plain safetensors shards. Inside a checkpoint W is not gathered at all (its rows are in
        the checkpoint's torch.distributed.checkpoint files)."""
        if not self.hdpissa_sharded:
            return super().save_model(output_dir, _internal_call)
        if self._hdpissa_in_checkpoint:
            return
        state_dict = self.hdpissa_engine.merged_state_dict(self.save_dtype)
        if self.is_world_process_zero():  # the only process the merged model was gathered onto
            self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # Overridden: transformers' one method that writes the model of every save; here it writes the merged plain model.
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the merged plain model (no adapters inside) + tokenizer, in the training dtype or ``save_dtype``.

        The Hub token is blanked while ``training_args.bin`` is written, so it never lands in a file. With
        ``save_on_each_node`` every node writes its own copy.
        """
        from .hub import hub_token_outside_args

        with hub_token_outside_args(self), writes_on_each_node(self):
            self._save_merged(output_dir, state_dict)

    def _save_merged(self, output_dir: str | None, state_dict: dict | None) -> None:
        dtype = None if self._hdpissa_in_checkpoint else self.save_dtype  # checkpoints keep the training precision
        if self.hdpissa_engine is not None and state_dict is None:
            return super()._save(output_dir, state_dict=self.hdpissa_engine.merged_state_dict(dtype))
        if self.method in ("pissa", "lora") and not self._hdpissa_in_checkpoint:
            # Final model of a PEFT baseline: merge on a copy so training state stays untouched.
            if self.args.should_save:
                out = output_dir or self.args.output_dir
                merged = copy.deepcopy(self.accelerator.unwrap_model(self.model)).merge_and_unload()
                if dtype is not None:
                    merged.to(dtype)
                os.makedirs(out, exist_ok=True)
                merged.save_pretrained(out)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(out)
            return
        if self.method == "full" and dtype is not None and state_dict is None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v
                          for k, v in self.accelerator.unwrap_model(self.model).state_dict().items()}
        return super()._save(output_dir, state_dict=state_dict)

