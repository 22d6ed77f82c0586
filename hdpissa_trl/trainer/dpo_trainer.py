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

import hashlib
import inspect

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from trl import DPOTrainer

from .checks import require_trl_hooks
from .mixin import HDPiSSATrainerMixin, _is_peft_model
from .reference import (
    ReferenceTrainerMixin,
    add_reference_adapter,
    frozen_copy,
    trl_reference_adapter_keeps_the_base,
    use_merged_weight_ref_sync,
)


def bind_arguments(fn, args: tuple, kwargs: dict) -> dict:
    """``fn``'s positional and keyword arguments as one keyword dict (``self`` excluded; unknown keywords kept)."""
    params = inspect.signature(fn).parameters
    own = {k: v for k, v in kwargs.items() if k in params}
    bound = dict(inspect.signature(fn).bind_partial(None, *args, **own).arguments)
    bound.pop(next(iter(params)))
    return {**bound, **{k: v for k, v in kwargs.items() if k not in params}}


def starts_from_plain_model(method: str, kwargs: dict) -> bool:
    """True when the run trains the model itself (HD-PiSSA or full), not a PEFT adapter given or built for it."""
    return (method in ("hdpissa", "full") and kwargs.get("peft_config") is None
            and not _is_peft_model(kwargs.get("model")))


REFERENCE_INPUT_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def dataset_digest(dataset: Dataset, columns: tuple[str, ...] = REFERENCE_INPUT_COLUMNS) -> str:
    """sha256 of ``dataset``'s rows in order: the token ids the reference reads (every column if it has none of them).

    Read from Arrow in blocks of rows (token values and row lengths as bytes), so it costs a small fraction of the
    reference's own pass over the data.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    names = [c for c in columns if c in dataset.column_names] or list(dataset.column_names)
    digest = hashlib.sha256(f"{len(dataset)}:{names}".encode())
    table = dataset.select_columns(names).with_format("arrow")
    for start in range(0, len(dataset), 8192):
        block = table[start:start + 8192]
        for name in names:
            column = block.column(name).combine_chunks()
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                values = pc.list_flatten(column)
                if pa.types.is_integer(values.type):
                    digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes())
                    digest.update(values.to_numpy(zero_copy_only=False).tobytes())
                    continue
            digest.update(repr(column.to_pylist()).encode())
    return digest.hexdigest()


def check_same_data_on_every_process(accelerator, dataset: Dataset, name: str) -> None:
    """Refuse to precompute reference log-probabilities when the processes hold different datasets.

    Each process scores its share of the rows and the values are assigned back by row position, so a process whose
    rows differ in content or order gets other rows' reference values (the DPO loss no longer starts at ln 2) and
    trains on a share that overlaps the others'. A random split or shuffle without a fixed seed causes it.
    """
    from accelerate.utils import gather_object

    digests = gather_object([dataset_digest(dataset)])
    if len(set(digests)) > 1:
        differ = [k for k, d in enumerate(digests) if d != digests[0]]
        raise ValueError(
            f"The {len(digests)} processes hold different {name} datasets (process {differ[0]} differs from process 0 "
            f"in its rows or their order). DPOTrainer's precomputed reference log-probabilities are assigned to rows by "
            f"position across processes, so every row would get another row's reference. Build the dataset the same "
            f"way in every process: give every split and shuffle a fixed seed (e.g. train_test_split(..., seed=42)).")


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
        require_trl_hooks((DPOTrainer, "_precompute_ref_logps"), (DPOTrainer, "compute_ref_log_probs"))
        kwargs = bind_arguments(DPOTrainer.__init__, args, kwargs)
        with trl_reference_adapter_keeps_the_base(kwargs.get("model")):
            super().__init__(**kwargs)
        if self.method == "pissa":
            add_reference_adapter(self.accelerator.unwrap_model(self.model))
        use_merged_weight_ref_sync(self)

    def hdpissa_parent_kwargs(self, kwargs: dict) -> dict:
        """The frozen reference of a model object: a copy of the object passed (after every refusal), not a reload of
        ``config._name_or_path``, which may hold other weights than the object."""
        model, training_args = kwargs.get("model"), kwargs.get("args")
        if (kwargs.get("ref_model") is None and training_args is not None and model is not None
                and not isinstance(model, str)
                and not training_args.precompute_ref_log_probs and starts_from_plain_model(self.method, kwargs)):
            kwargs["ref_model"] = frozen_copy(model)
        return kwargs

    # Overridden (TRL's hook, run inside DPOTrainer.__init__): a PiSSA baseline's reference needs its "ref" adapter
    # before the reference log-probabilities are computed.
    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if self.method == "pissa" and self.ref_model is None:
            add_reference_adapter(self.accelerator.unwrap_model(self.model))
        if self.accelerator.num_processes > 1 and isinstance(dataset, Dataset):
            check_same_data_on_every_process(self.accelerator, dataset, name)
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
