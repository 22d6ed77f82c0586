"""``HDPiSSADPOTrainer``: TRL's ``DPOTrainer`` training with HD-PiSSA (or a baseline, ``method=...``).

What differs from ``DPOTrainer`` is only where the reference comes from (see :mod:`hdpissa_trl.trainer.reference`):

* ``precompute_ref_log_probs=True`` (the cheap choice): TRL scores the data set with the starting model before any
  adapter exists; no second model is kept. Memory: two floats per example. Time: one forward pass over the data.
* otherwise a frozen copy of the starting model (``ref_model``; one more copy of the weights). A model passed as a
  path is loaded a second time by TRL, as ``DPOTrainer`` does; a model object is deep-copied, so the reference is
  the object you passed even if its weights differ from the files at ``config._name_or_path``.

A PiSSA baseline (``method="pissa"``) keeps a frozen copy of its initial adapter as reference: its adapter-disabled
model would be the residual ``W − s·B0A0``. At step 0 policy and reference are the same function, so the DPO
(sigmoid) loss is exactly ln 2.
"""

from __future__ import annotations

import inspect

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from trl import DPOTrainer

from .mixin import HDPiSSATrainerMixin, _is_peft_model
from .reference import (
    ReferenceTrainerMixin,
    add_reference_adapter,
    frozen_copy,
    use_merged_weight_ref_sync,
)

MIXIN_ARGUMENTS = ("hdpissa_config", "method", "save_dtype")


def bind_arguments(fn, args: tuple, kwargs: dict) -> dict:
    """``fn``'s positional and keyword arguments as one keyword dict (``self`` excluded; unknown keywords kept)."""
    params = inspect.signature(fn).parameters
    own = {k: v for k, v in kwargs.items() if k in params}
    bound = dict(inspect.signature(fn).bind_partial(None, *args, **own).arguments)
    bound.pop(next(iter(params)))
    return {**bound, **{k: v for k, v in kwargs.items() if k not in params}}


def starts_from_plain_model(kwargs: dict) -> bool:
    """True when the run trains the model itself (HD-PiSSA or full), not a PEFT adapter given or built for it."""
    return (kwargs.get("method") in (None, "hdpissa", "full") and kwargs.get("peft_config") is None
            and not _is_peft_model(kwargs.get("model")))


class HDPiSSADPOTrainer(ReferenceTrainerMixin, HDPiSSATrainerMixin, DPOTrainer):
    """``trl.DPOTrainer`` training with HD-PiSSA (or a baseline: ``method="pissa" | "lora" | "full"``).

    Example::

        trainer = HDPiSSADPOTrainer(model="path/or/name", args=DPOConfig(..., precompute_ref_log_probs=True),
                                    train_dataset=preferences, hdpissa_config=HDPiSSAConfig(r=16))
        trainer.train(); trainer.save_model()

    Reference: ``precompute_ref_log_probs=True`` keeps no reference model (cheapest); otherwise a frozen copy of the
    starting model. ``sync_ref_model=True`` mixes the merged plain W into that copy. Launch with
    ``accelerate launch --num_processes K``; everything else behaves like ``DPOTrainer``.
    """

    hdpissa_trl_parent = "DPOTrainer"

    def __init__(self, *args, **kwargs):
        kwargs = bind_arguments(DPOTrainer.__init__, args, kwargs)
        model, training_args = kwargs.get("model"), kwargs.get("args")
        if (kwargs.get("ref_model") is None and training_args is not None and model is not None
                and not isinstance(model, str)
                and not training_args.precompute_ref_log_probs and starts_from_plain_model(kwargs)):
            kwargs["ref_model"] = frozen_copy(model)  # the object passed, not a reload of config._name_or_path
        super().__init__(**kwargs)
        if self.method == "pissa":
            add_reference_adapter(self.accelerator.unwrap_model(self.model))
        use_merged_weight_ref_sync(self)

    # Overridden (TRL's hook, run inside DPOTrainer.__init__): a PiSSA baseline's reference needs its "ref" adapter
    # before the reference log-probabilities are computed.
    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if self.method == "pissa" and self.ref_model is None:
            add_reference_adapter(self.accelerator.unwrap_model(self.model))
        if self.accelerator.num_processes > 1 and isinstance(dataset, Dataset) and not dataset.cache_files:
            return self._precompute_ref_logps_in_memory(dataset, name, batch_size)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    @torch.no_grad()
    def _precompute_ref_logps_in_memory(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """TRL's precompute for an in-memory dataset on K processes, kept in memory.

        TRL writes the log-probabilities to a cache file beside the dataset's own cache files and every process
        reads it back; an in-memory dataset (``Dataset.from_list``, ...) has none, so each process looks in its own
        temporary directory and all but the writer fail (FileNotFoundError). Here the gathered values (every process
        has them all) become two columns on every process. Same batches, same order, same model as TRL's.
        """
        loader = self.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator,
                                                     num_workers=self.args.dataloader_num_workers, shuffle=False))
        model = self.ref_model or self.model
        chosen, rejected = [], []
        for batch in tqdm(loader, desc=f"Computing reference log probs for {name} dataset",
                          disable=not self.accelerator.is_main_process):
            ref_chosen, ref_rejected = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
            chosen.append(ref_chosen.float().cpu())
            rejected.append(ref_rejected.float().cpu())
        return (dataset.add_column("ref_chosen_logps", torch.cat(chosen).tolist())
                .add_column("ref_rejected_logps", torch.cat(rejected).tolist()))
