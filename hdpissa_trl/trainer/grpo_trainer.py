"""``HDPiSSAGRPOTrainer``: TRL's ``GRPOTrainer`` training with HD-PiSSA (or a baseline, ``method=...``).

The policy of an HD-PiSSA run is a plain model at every step: after each optimizer step the deltas are folded into
W and the adapters reset, and the adapter path adds nothing to the forward value. So generation (``model.generate``)
uses the model as it is, with nothing to merge or unmerge, and vLLM weight sync sends W itself under the plain
parameter names (:func:`vllm_named_weights`) instead of PEFT's merge / send / unmerge round trip.

Reference (only with ``beta > 0``): TRL loads the starting model a second time from ``config._name_or_path`` (a frozen
copy: one more copy of the weights), which is right for HD-PiSSA too; the adapter-disabled model would not be (see
:mod:`hdpissa_trl.trainer.reference`). A PiSSA baseline keeps a frozen copy of its initial adapter as reference.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from trl import GRPOTrainer

from ..engine.layer import plain_key
from .mixin import HDPiSSATrainerMixin
from .reference import (
    ReferenceTrainerMixin,
    add_reference_adapter,
    use_merged_weight_ref_sync,
)


def vllm_named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, weight)`` of an HD-PiSSA model as the plain model names them (what vLLM's ``load_weights`` expects).

    Adapter factors are skipped and ``.base_layer`` is dropped; W is sent as the forward pass uses it (model dtype).
    No copy is made; a sharded (DTensor) weight is gathered one parameter at a time.
    """
    for name, param in model.named_parameters():
        plain = plain_key(name)
        if plain is None:
            continue
        data = param.data
        if hasattr(data, "full_tensor"):
            data = data.full_tensor()
        yield plain, data


class HDPiSSAGRPOTrainer(ReferenceTrainerMixin, HDPiSSATrainerMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` training with HD-PiSSA (or a baseline: ``method="pissa" | "lora" | "full"``).

    Example::

        trainer = HDPiSSAGRPOTrainer(model="path/or/name", reward_funcs=[my_reward], args=GRPOConfig(...),
                                     train_dataset=prompts, hdpissa_config=HDPiSSAConfig(r=16))
        trainer.train(); trainer.save_model()

    Generation and vLLM weight sync use the plain W (see the module docstring). With ``beta > 0`` the reference is a
    frozen copy of the starting model; ``sync_ref_model=True`` mixes the merged W into it. Launch with
    ``accelerate launch --num_processes K``; everything else behaves like ``GRPOTrainer``.
    """

    hdpissa_trl_parent = "GRPOTrainer"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.method == "pissa" and self.beta != 0.0:
            add_reference_adapter(self.accelerator.unwrap_model(self.model))
        use_merged_weight_ref_sync(self)
        if self.hdpissa_engine is not None and getattr(self, "vllm_generation", None) is not None:
            self.send_plain_weights_to_vllm(self.vllm_generation)

    def send_plain_weights_to_vllm(self, vllm_generation) -> None:
        """Make TRL's ``VLLMGeneration.sync_weights`` send W under plain names (every rank must iterate: the
        gather of a sharded W is a collective)."""
        model = self.accelerator.unwrap_model(self.model)

        def iter_named_params():
            for name, weight in vllm_named_weights(model):
                yield vllm_generation._fix_param_name_to_vllm(name), weight

        vllm_generation._iter_named_params = iter_named_params
