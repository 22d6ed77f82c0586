"""``HDPiSSADPOTrainer``: TRL's ``DPOTrainer`` training with HD-PiSSA (or a baseline, ``method=...``).

What differs from ``DPOTrainer`` is only where the reference comes from (see :mod:`hdpissa_trl.reference`):

* ``precompute_ref_log_probs=True`` (the cheap choice): TRL scores the data set with the starting model before any
  adapter exists; no second model is kept. Memory: two floats per example. Time: one forward pass over the data.
* otherwise a frozen copy of the starting model (``ref_model``; one more copy of the weights). A model passed as a
  path is loaded a second time by TRL, as ``DPOTrainer`` does; a model object is deep-copied, so the reference is
  the object you passed even if its weights differ from the files at ``config._name_or_path``.

At step 0 policy and reference are the same function, so the DPO (sigmoid) loss is exactly ln 2.
"""

from __future__ import annotations

import inspect

import torch
from trl import DPOTrainer

from .config import HDPiSSAConfig
from .reference import frozen_copy, use_merged_weight_ref_sync, wrap_peft_with_reference_adapter
from .trainer import HDPiSSATrainerMixin


def bind_arguments(fn, args: tuple, kwargs: dict) -> dict:
    """``fn``'s positional and keyword arguments as one keyword dict (``self`` excluded)."""
    bound = inspect.signature(fn).bind_partial(None, *args, **kwargs)
    out = dict(bound.arguments)
    out.pop(next(iter(inspect.signature(fn).parameters)))
    out.update(out.pop("kwargs", {}) or {})
    return out


def refuse_adapted_output_head(model, config: HDPiSSAConfig, trainer_name: str) -> None:
    """TRL's DPO / GRPO compute log-probabilities from ``lm_head.weight`` directly (fused LM head): an adapter on
    the head would never get a gradient. Refuse it before any work, as TRL does for PEFT."""
    from .model import find_target_modules

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return
    hit = [name for name, mod in find_target_modules(model, config) if mod is head]
    if hit:
        raise ValueError(f"Adapting the output head {hit[0]!r} is not supported with {trainer_name}: it computes "
                         f"log-probabilities from its weight directly (fused LM head), so the adapter would never "
                         f"be trained. Remove it from target_modules (or use 'all-linear', which leaves it out).")


class HDPiSSADPOTrainer(HDPiSSATrainerMixin, DPOTrainer):
    """``trl.DPOTrainer`` training with HD-PiSSA (or a baseline: ``method="pissa" | "lora" | "full"``).

    Example::

        trainer = HDPiSSADPOTrainer(model="path/or/name", args=DPOConfig(..., precompute_ref_log_probs=True),
                                    train_dataset=preferences, hdpissa_config=HDPiSSAConfig(r=16))
        trainer.train(); trainer.save_model()

    Reference: ``precompute_ref_log_probs=True`` keeps no reference model (cheapest); otherwise a frozen copy of the
    starting model. ``sync_ref_model=True`` mixes the merged plain W into that copy. Launch with
    ``accelerate launch --num_processes K``; everything else behaves like ``DPOTrainer``.
    """

    def __init__(self, *args, hdpissa_config: HDPiSSAConfig | None = None, method: str = "hdpissa",
                 save_dtype: torch.dtype | None = None, **kwargs):
        kwargs = bind_arguments(DPOTrainer.__init__, args, kwargs)
        self._hdpissa_pre_init(method, hdpissa_config, kwargs)
        self._choose_reference(kwargs)
        super().__init__(**kwargs)
        self._hdpissa_setup(save_dtype)
        use_merged_weight_ref_sync(self)

    def _choose_reference(self, kwargs: dict) -> None:
        """A reference that is the starting model (see the module docstring); TRL's choice where that already holds."""
        args, model = kwargs.get("args"), kwargs.get("model")
        if kwargs.get("ref_model") is not None or args is None:
            return
        if self.method == "pissa":
            # Adapter-disabled PiSSA is the residual W - BA: keep a frozen copy of the initial adapter instead.
            from transformers import set_seed

            set_seed(args.seed)
            kwargs["model"] = wrap_peft_with_reference_adapter(model, kwargs.pop("peft_config"), args)
        elif self.method in ("hdpissa", "full") and not args.precompute_ref_log_probs and not isinstance(model, str):
            kwargs["ref_model"] = frozen_copy(model)

    def _check_targets(self, model) -> None:
        refuse_adapted_output_head(model, self.hdpissa_config, "DPOTrainer")
