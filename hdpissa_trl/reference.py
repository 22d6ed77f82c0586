"""The reference model of preference and RL trainers (DPO, GRPO with ``beta > 0``) when W moves every step.

A PEFT trainer gets its reference for free: disable the adapter and the base model is the starting model. HD-PiSSA
folds every optimizer step into W, so "the model with its adapter disabled" is the *current* policy. The reference
must be kept some other way:

* a frozen copy of the starting model (one more copy of the weights in memory, in the model dtype), or
* DPO only: reference log-probabilities computed once before training (``precompute_ref_log_probs=True``; no second
  model in memory: two floats per example, and one extra forward pass over the data set at start-up).

PiSSA baselines have the same trap in TRL: PiSSA moves the principal part of W into the adapter, so the adapter-
disabled model is the *residual* W - BA, not the starting model. :func:`wrap_peft_with_reference_adapter` gives TRL
a PEFT model it recognises as pre-wrapped, for which it keeps a frozen copy of the adapter as reference ("ref").

``sync_ref_model=True`` (TRL mixes the policy into the reference every few steps) zips the parameter lists of the
two models; an HD-PiSSA policy has adapters and ``base_layer`` names, so it does not line up.
:class:`MergedWeightSyncRefModelCallback` mixes in the policy's plain merged weights by name instead.
"""

from __future__ import annotations

import copy

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


def wrap_peft_with_reference_adapter(model, peft_config, args):
    """``get_peft_model(model, peft_config)``, done before TRL sees the model, so TRL keeps a frozen reference adapter.

    For a pre-wrapped PEFT model TRL's DPO/GRPO trainers add a "ref" adapter with the "default" adapter's config, copy
    the "default" weights into it and compute the reference with it: reference = base + initial adapter = the starting
    model. With PiSSA that ``add_adapter`` would run PiSSA's init a second time, which subtracts another principal
    part from the base weights (policy and reference both wrong: 0.33 max logit error on a tiny model). The config
    TRL copies therefore says plain init (the weights are copied over anyway); the base weights stay ``W - s·B0A0``.
    """
    from peft import get_peft_model
    from trl.trainer.utils import create_model_from_path

    if isinstance(model, str):
        model = create_model_from_path(model, **dict(args.model_init_kwargs or {}))
    model = get_peft_model(model, peft_config)
    model.peft_config["default"].init_lora_weights = True
    return model


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
    for name, param in params.items():
        src = policy_weights[name]
        if src.shape != param.shape:
            raise ValueError(f"sync_ref_model: {name!r} has shape {tuple(src.shape)} in the policy but "
                             f"{tuple(param.shape)} in the reference model.")
        param.mul_(1.0 - alpha).add_(src.to(device=param.device, dtype=param.dtype), alpha=alpha)


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
