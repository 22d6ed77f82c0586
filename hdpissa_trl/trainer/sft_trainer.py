"""``HDPiSSASFTTrainer``: TRL's ``SFTTrainer`` training with HD-PiSSA (or a baseline, ``method=...``).

All of the method is in :class:`~hdpissa_trl.trainer.mixin.HDPiSSATrainerMixin`; what is SFT's own here: the dataset
checks before the model is loaded and after truncation (:mod:`hdpissa_trl.trainer.data_checks`), and the refusal of an
adapted output head (SFTTrainer reads its weight directly).
"""

from __future__ import annotations

import inspect

from trl import SFTTrainer

from .checks import refuse_adapted_output_head, require_trl_hooks
from .data_checks import check_after_truncation, check_sft_dataset
from .mixin import HDPiSSATrainerMixin


class HDPiSSASFTTrainer(HDPiSSATrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` training with HD-PiSSA (or a baseline: ``method="pissa" | "lora" | "full"``).

    Example::

        trainer = HDPiSSASFTTrainer(model="path/or/name", args=SFTConfig(...), train_dataset=ds,
                                    hdpissa_config=HDPiSSAConfig(r=16, lora_alpha=16))
        trainer.train(); trainer.save_model(); trainer.push_to_hub()

    Launch with ``accelerate launch --num_processes K script.py``: each process owns one slice of every adapted
    layer's top ``K·r`` singular directions. Everything else behaves like ``SFTTrainer``.
    """

    def __init__(self, *args, **kwargs):
        require_trl_hooks((SFTTrainer, "_prepare_dataset"))
        self._check_datasets(args, kwargs)
        super().__init__(*args, **kwargs)

    @staticmethod
    def _check_datasets(args: tuple, kwargs: dict) -> None:
        """Empty datasets and missing columns fail here, in one line, before the model is loaded."""
        signature = inspect.signature(SFTTrainer.__init__)
        own = {k: v for k, v in kwargs.items() if k in signature.parameters}
        bound = signature.bind_partial(None, *args, **own).arguments
        training_args = bound.get("args")
        dataset_kwargs = getattr(training_args, "dataset_kwargs", None) or {}
        needs_columns = bound.get("formatting_func") is None and not dataset_kwargs.get("skip_prepare_dataset")
        text_field = getattr(training_args, "dataset_text_field", "text")
        check_sft_dataset(bound.get("train_dataset"), "train", text_field, needs_columns)
        check_sft_dataset(bound.get("eval_dataset"), "eval", text_field, needs_columns)

    def hdpissa_check_model(self, model) -> None:
        """SFTTrainer reads ``lm_head.weight`` directly (fused LM head): refuse an adapter there before any work."""
        refuse_adapted_output_head(model, self.hdpissa_config, "SFTTrainer")

    # Overridden (TRL's dataset hook): fail clearly when truncation left no completion token to learn from.
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        check_after_truncation(dataset, prepared, dataset_name, args.max_length)
        return prepared
