"""``HDPiSSATrainer``: a plain ``transformers.Trainer`` training with HD-PiSSA, for custom losses and models.

Everything ``Trainer`` does stays (``compute_loss`` override, ``compute_loss_func``, data collators, evaluation);
the mixin adds the method: adapters injected after the model is placed, the model kept out of DDP, the fold after
every real optimizer step, atomic checkpoints with every device's optimizer state, and the merged plain model on save.
"""

from __future__ import annotations

from transformers import Trainer

from .checks import refuse_optimizer_built_before_the_trainer
from .mixin import HDPiSSATrainerMixin, _is_peft_model, build_peft_config


class HDPiSSATrainer(HDPiSSATrainerMixin, Trainer):
    """``transformers.Trainer`` training with HD-PiSSA (or a baseline: ``method="pissa" | "lora" | "full"``).

    Example (a custom loss)::

        class MyTrainer(HDPiSSATrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                ...

        trainer = MyTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                            hdpissa_config=HDPiSSAConfig(r=16))

    ``Trainer`` takes no ``peft_config``, so the PEFT baselines wrap the model here with the ``LoraConfig`` TRL's
    trainers would build from ``hdpissa_config``.
    """

    def __init__(self, model=None, *args, **kwargs):
        if kwargs.get("method") in ("pissa", "lora") and model is not None and not _is_peft_model(model):
            from peft import get_peft_model

            from ..engine.config import HDPiSSAConfig

            method = kwargs["method"]
            refuse_optimizer_built_before_the_trainer(kwargs.get("optimizers"), f"the {method} adapter is created "
                                                      f"inside the trainer, after the optimizer", True, method)
            config = kwargs.get("hdpissa_config") or HDPiSSAConfig()
            model = get_peft_model(model, build_peft_config(kwargs["method"], config))
        super().__init__(model, *args, **kwargs)
