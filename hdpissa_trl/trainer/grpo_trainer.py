"""``HDPiSSAGRPOTrainer``: TRL's ``GRPOTrainer`` training with HD-PiSSA (or a baseline, ``method=...``).

The policy of an HD-PiSSA run is a plain model at every step: after each optimizer step the deltas are folded into
W and the adapters reset, and the adapter path adds nothing to the forward value. So generation (``model.generate``)
uses the model as it is, with nothing to merge or unmerge, and vLLM weight sync sends W itself under the plain
parameter names (:func:`vllm_named_weights`) instead of PEFT's merge / send / unmerge round trip.

Reference (only with ``beta > 0``): a frozen copy of the starting model (one more copy of the weights); the
adapter-disabled model would not be the start (see :mod:`hdpissa_trl.trainer.reference`). A model passed as a path is
loaded a second time by TRL, as ``GRPOTrainer`` does; a model object is deep-copied (as ``HDPiSSADPOTrainer`` does),
so the reference is the object you passed even if its weights differ from the files at ``config._name_or_path``. A
PiSSA baseline keeps a frozen copy of its initial adapter as reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import trl.trainer.grpo_trainer as trl_grpo
from torch import nn
from trl import GRPOTrainer

from ..engine.layer import plain_key
from .checks import require_trl_hooks
from .dpo_trainer import bind_arguments, starts_from_plain_model
from .mixin import HDPiSSATrainerMixin
from .reference import (
    ReferenceTrainerMixin,
    add_reference_adapter,
    frozen_copy,
    trl_reference_adapter_keeps_the_base,
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
        require_trl_hooks((trl_grpo, "create_model_from_path"), (trl_grpo, "get_config_model_id"))
        kwargs = bind_arguments(GRPOTrainer.__init__, args, kwargs)
        if getattr(kwargs.get("args"), "use_vllm", False):
            from trl.generation.vllm_generation import VLLMGeneration

            require_trl_hooks((VLLMGeneration, "_iter_named_params"), (VLLMGeneration, "_fix_param_name_to_vllm"))
        self._reference_copy = None
        with trl_reference_adapter_keeps_the_base(kwargs.get("model")), self._reference_from_the_object():
            super().__init__(**kwargs)
        if self.method == "pissa" and self.beta != 0.0:
            add_reference_adapter(self.accelerator.unwrap_model(self.model))
        use_merged_weight_ref_sync(self)
        if self.hdpissa_engine is not None and getattr(self, "vllm_generation", None) is not None:
            self.send_plain_weights_to_vllm(self.vllm_generation)

    def hdpissa_parent_kwargs(self, kwargs: dict) -> dict:
        """With ``beta > 0`` and a model object: the frozen copy that becomes the reference (after every refusal)."""
        model, training_args = kwargs.get("model"), kwargs.get("args")
        if (model is not None and not isinstance(model, str) and getattr(training_args, "beta", 0.0) != 0.0
                and starts_from_plain_model(self.method, kwargs)):
            self._reference_copy = frozen_copy(model)
        return kwargs

    @contextlib.contextmanager
    def _reference_from_the_object(self):
        """While ``GRPOTrainer.__init__`` runs: its reference load (``create_model_from_path`` of the policy's
        ``config._name_or_path``) returns the frozen copy of the object passed, once; every other load is TRL's."""
        load = trl_grpo.create_model_from_path

        def create_model_from_path(model_id, *args, **kwargs):
            ref = self._reference_copy
            if ref is not None and model_id == trl_grpo.get_config_model_id(ref.config):
                self._reference_copy = None
                return ref
            return load(model_id, *args, **kwargs)

        trl_grpo.create_model_from_path = create_model_from_path
        try:
            yield
        finally:
            trl_grpo.create_model_from_path = load
            self._reference_copy = None

    def send_plain_weights_to_vllm(self, vllm_generation) -> None:
        """Make TRL's ``VLLMGeneration.sync_weights`` send W under plain names (every rank must iterate: the
        gather of a sharded W is a collective)."""
        model = self.accelerator.unwrap_model(self.model)

        def iter_named_params():
            for name, weight in vllm_named_weights(model):
                yield vllm_generation._fix_param_name_to_vllm(name), weight

        vllm_generation._iter_named_params = iter_named_params
