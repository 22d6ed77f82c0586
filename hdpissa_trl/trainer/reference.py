"""The reference model of preference and RL trainers (DPO, GRPO with ``beta > 0``) when W moves every step.

A PEFT trainer gets its reference for free: disable the adapter and the base model is the starting model. HD-PiSSA
folds every optimizer step into W, so "the model with its adapter disabled" is the *current* policy. The reference
must be kept some other way:

* a frozen copy of the starting model (one more copy of the weights in memory, in the model dtype), or
* DPO only: reference log-probabilities computed once before training (``precompute_ref_log_probs=True``; no second
  model in memory: two floats per example, and one extra forward pass over the data set at start-up).

PiSSA baselines have the same trap in TRL: PiSSA moves the principal part of W into the adapter, so the adapter-
disabled model is the *residual* W - BA, not the starting model. :func:`add_reference_adapter` keeps a frozen copy of
the initial adapter as reference ("ref"), which TRL's trainers use when it exists.

``sync_ref_model=True`` (TRL mixes the policy into the reference every few steps) zips the parameter lists of the
two models; an HD-PiSSA policy has adapters and ``base_layer`` names, so it does not line up.
:class:`MergedWeightSyncRefModelCallback` mixes in the policy's plain merged weights by name instead. A synced
reference is part of the training state: it goes into checkpoints (``reference_model.safetensors``) and comes back on
resume (TRL itself restarts it from the starting model).
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import nn
from transformers import TrainerCallback


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with no trainable parameter, in eval mode: the reference of an HD-PiSSA run.

    Costs one more copy of the weights (same dtype and device as ``model``).
    """
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


@torch.no_grad()
def add_reference_adapter(peft_model) -> None:
    """Give a PEFT model a frozen "ref" adapter holding the "default" adapter's current weights (idempotent).

    TRL's DPO/GRPO trainers compute the reference with the "ref" adapter when the model has one, else with adapters
    disabled. For a PiSSA adapter the adapter-disabled model is the residual ``W − s·B0A0``, not the starting model;
    base + initial adapter is. TRL itself adds "ref" only for a model passed already wrapped, and with the default
    adapter's config, which for PiSSA would run PiSSA's init again and subtract a second principal part from the base
    weights. Here the "ref" adapter gets a plain init (base weights untouched) and the "default" weights are copied in.
    """
    if "ref" in peft_model.peft_config:
        return
    config = copy.copy(peft_model.peft_config["default"])
    config.init_lora_weights = True
    peft_model.add_adapter("ref", config)
    for name, param in peft_model.named_parameters():
        if ".ref." in name:
            param.copy_(peft_model.get_parameter(name.replace(".ref.", ".default.")))
            param.requires_grad_(False)


@contextlib.contextmanager
def trl_reference_adapter_keeps_the_base(model):
    """While TRL builds a trainer around a ``PeftModel``: its "default" config says plain init.

    DPO (and GRPO with ``beta > 0``) add a frozen "ref" adapter to a ``PeftModel`` passed as the model, with the
    "default" adapter's config object, then copy the default weights into it. For an init that changes the base
    weights (PiSSA, OLoRA, CorDA, ...) adding it runs that init again: a second principal part is subtracted from the
    base weights and the policy is no longer the model passed. A plain init leaves the base alone; the copied weights
    make "ref" the starting adapter either way. The config is restored afterwards (also on error).
    """
    from peft import PeftModel

    config = model.peft_config.get("default") if isinstance(model, PeftModel) else None
    init = getattr(config, "init_lora_weights", True)
    if config is None or init is True:
        yield
        return
    config.init_lora_weights = True
    try:
        yield
    finally:
        config.init_lora_weights = init


@torch.no_grad()
def mix_into_reference(ref_model: nn.Module, policy_weights: dict[str, torch.Tensor], alpha: float) -> None:
    """``ref ← (1 − alpha)·ref + alpha·policy``, parameter by parameter, matched by (plain) name.

    ``policy_weights`` is a plain state dict (e.g. :meth:`HDPiSSAEngine.merged_state_dict`). A reference parameter
    without a counterpart is an error naming it: a silent partial mix would leave a reference that is neither model.
    """
    params = dict(ref_model.named_parameters())
    missing = [name for name in params if name not in policy_weights]
    if missing:
        raise ValueError(f"sync_ref_model: the policy has no weight named {missing[0]!r} (and {len(missing) - 1} more); "
                         f"the reference model must be the same architecture as the policy.")
    for name, param in params.items():  # all checked before any is changed: no half-mixed reference
        src = policy_weights[name]
        if src.shape != param.shape:
            raise ValueError(f"sync_ref_model: {name!r} has shape {tuple(src.shape)} in the policy but "
                             f"{tuple(param.shape)} in the reference model.")
    for name, param in params.items():
        param.mul_(1.0 - alpha).add_(policy_weights[name].to(device=param.device, dtype=param.dtype), alpha=alpha)


class MergedWeightSyncRefModelCallback(TrainerCallback):
    """TRL's ``SyncRefModelCallback`` for an HD-PiSSA policy: mixes in the merged plain W, matched by name.

    Runs at step end, i.e. after the step's fold (which happens right after the optimizer step), every
    ``args.ref_model_sync_steps`` steps with weight ``args.ref_model_mixup_alpha``, as TRL's callback does.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        ref = getattr(self.trainer, "ref_model", None)
        engine = self.trainer.hdpissa_engine
        if ref is None or engine is None or state.global_step % args.ref_model_sync_steps != 0:
            return
        ref = self.trainer.accelerator.unwrap_model(ref)
        mix_into_reference(ref, engine.merged_state_dict(), args.ref_model_mixup_alpha)


def use_merged_weight_ref_sync(trainer) -> None:
    """Swap TRL's reference-sync callback (if the trainer added one) for :class:`MergedWeightSyncRefModelCallback`."""
    from trl.trainer.callbacks import SyncRefModelCallback

    if trainer.hdpissa_engine is None:  # baselines: TRL's own callback is right (full) or refused (PEFT)
        return
    handler = trainer.callback_handler
    found = [cb for cb in handler.callbacks if isinstance(cb, SyncRefModelCallback)]
    for cb in found:
        handler.remove_callback(cb)
    if found:
        trainer.add_callback(MergedWeightSyncRefModelCallback(trainer))


REFERENCE_STATE_NAME = "reference_model.safetensors"


def save_synced_reference(trainer, ckpt_dir: str) -> None:
    """Write the reference model into a checkpoint when ``sync_ref_model`` makes it training state (saving rank)."""
    ref = getattr(trainer, "ref_model", None)
    if ref is None or not getattr(trainer.args, "sync_ref_model", False) or not trainer.args.should_save:
        return
    from safetensors.torch import save_file

    params = dict(trainer.accelerator.unwrap_model(ref).named_parameters())
    save_file({name: p.detach().contiguous().cpu() for name, p in params.items()},
              os.path.join(ckpt_dir, REFERENCE_STATE_NAME))


@torch.no_grad()
def load_synced_reference(trainer, ckpt_dir: str) -> None:
    """Restore the synced reference from a checkpoint; a clear error when the checkpoint has none."""
    ref = getattr(trainer, "ref_model", None)
    if ref is None or not getattr(trainer.args, "sync_ref_model", False):
        return
    path = os.path.join(ckpt_dir, REFERENCE_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Cannot resume with sync_ref_model=True: {path} is missing (the checkpoint was written "
                                f"without a synced reference). Resume with sync_ref_model=False or from another run.")
    from safetensors.torch import load_file

    saved = load_file(path)
    params = dict(trainer.accelerator.unwrap_model(ref).named_parameters())
    if set(saved) != set(params):
        raise ValueError(f"Cannot resume: {path} holds another model's weights ({len(saved)} tensors, the reference "
                         f"has {len(params)}).")
    for name, param in params.items():
        param.copy_(saved[name].to(param.device, param.dtype))


class ReferenceTrainerMixin:
    """What HD-PiSSA's DPO and GRPO trainers share (put in front of :class:`HDPiSSATrainerMixin`): their refusals
    (an adapted output head, W sharded by rows) and a synced reference saved into and restored from checkpoints."""

    hdpissa_trl_parent = "a TRL trainer"  # the TRL class name the messages use

    def hdpissa_check_before_loading(self, args, model) -> None:
        """Before TRL loads the reference and precomputes log-probabilities (minutes to hours on a real data set)."""
        from .checks import model_skeleton, refuse_adapted_output_head, refuse_sharded_w_before_loading

        refuse_sharded_w_before_loading(args, self.hdpissa_trl_parent)
        skeleton = model_skeleton(model, args)
        if skeleton is not None:
            refuse_adapted_output_head(skeleton, self.hdpissa_config, self.hdpissa_trl_parent)

    def hdpissa_check_model(self, model) -> None:
        from .checks import refuse_adapted_output_head, refuse_sharded_w

        refuse_adapted_output_head(model, self.hdpissa_config, self.hdpissa_trl_parent)
        refuse_sharded_w(self, self.hdpissa_trl_parent)

    # The checkpoint hooks of CheckpointMixin: a synced reference is training state, saved and restored with it.
    def _save_hdpissa_state(self, ckpt_dir: str) -> None:
        super()._save_hdpissa_state(ckpt_dir)
        save_synced_reference(self, ckpt_dir)

    def _load_hdpissa_extra_state(self, ckpt_dir: str) -> None:
        super()._load_hdpissa_extra_state(ckpt_dir)
        load_synced_reference(self, ckpt_dir)
