"""``HDPiSSATrainer``: a plain ``transformers.Trainer`` training with HD-PiSSA, for custom losses and models.

Everything ``Trainer`` does stays (``compute_loss`` override, ``compute_loss_func``, data collators, evaluation);
the mixin adds the method: adapters injected after the model is placed, the model kept out of DDP, the fold after
every real optimizer step, atomic checkpoints with every device's optimizer state, and the merged plain model on save.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from .config import HDPiSSAConfig
from .trainer import HDPiSSATrainerMixin


class HDPiSSATrainer(HDPiSSATrainerMixin, Trainer):
    """``transformers.Trainer`` training with HD-PiSSA (or a baseline: ``method="pissa" | "lora" | "full"``).

    Example (a custom loss)::

        class MyTrainer(HDPiSSATrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                ...

        trainer = MyTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                            hdpissa_config=HDPiSSAConfig(r=16))

    The model must be a model object (``Trainer`` loads nothing by name); for the PEFT baselines it is wrapped with
    the matching ``LoraConfig`` here, as TRL's trainers do with ``peft_config``.
    """

    def __init__(self, model=None, *args, hdpissa_config: HDPiSSAConfig | None = None, method: str = "hdpissa",
                 save_dtype: torch.dtype | None = None, **kwargs):
        peft_kwargs: dict = {}
        self._hdpissa_pre_init(method, hdpissa_config, peft_kwargs)
        if peft_kwargs.get("peft_config") is not None and model is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_kwargs["peft_config"])
        super().__init__(model, *args, **kwargs)
        self._hdpissa_setup(save_dtype)
