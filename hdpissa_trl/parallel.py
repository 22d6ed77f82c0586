"""Which parallel set-ups HD-PiSSA trains with, decided in one place, before any weight is loaded.

HD-PiSSA keeps the FULL W on every device (replicated data parallelism: ``accelerate launch --num_processes K``, one
process per device) and per-device adapters that must never be averaged or broadcast. Set-ups that shard or average
the trainable state, or cast W for evaluation, would silently destroy the method or fail with an unrelated message:
each is refused here with the setting to change. This is the one function to edit when a sharded-W set-up is
supported.
"""

from __future__ import annotations

import os

REPLICATED = ("Use replicated data parallelism instead: `accelerate launch --num_processes K` with a multi-GPU, "
              "multi-node or CPU config (no DeepSpeed, no FSDP); every device then holds the whole model.")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes", "on")


def check_parallelism(args, model=None, world_size: int = 1) -> None:
    """Raise ``ValueError`` for a parallel set-up HD-PiSSA cannot train with.

    Args:
        args: the ``TrainingArguments`` (or ``None``, for the defaults).
        model: the model object when the user passed one (its ``hf_device_map`` is checked), else ``None``.
        world_size: number of processes K (a model split over devices is refused when K > 1).
    """
    if (args is not None and (getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None)
                              is not None)) or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError("HD-PiSSA cannot train under DeepSpeed (`deepspeed=` or an accelerate DeepSpeed config): "
                         "ZeRO partitions the trainable state into flat shards and averages gradients across devices, "
                         "which destroys the per-device adapters. " + REPLICATED)
    if (args is not None and getattr(args, "fsdp", None)) or _env_flag("ACCELERATE_USE_FSDP"):
        raise ValueError("HD-PiSSA cannot train under FSDP (`fsdp=`/`--fsdp`, `fsdp_config` or an accelerate FSDP "
                         "config, any version): FSDP reduces gradients across devices (on CPU transformers would "
                         "silently ignore it and train a replicated W). " + REPLICATED)
    for name in ("bf16_full_eval", "fp16_full_eval"):
        if args is not None and getattr(args, name, False):
            raise ValueError(f"HD-PiSSA cannot train with `{name}=True`: it casts the whole model, W and its adapters "
                             f"included, to half precision for evaluation, and training would continue from the "
                             f"rounded weights. Set {name}=False; with bf16=True/fp16=True evaluation runs under "
                             f"autocast and W keeps its training precision.")
    device_map = getattr(model, "hf_device_map", None) if model is not None else None
    if world_size > 1 and isinstance(device_map, dict):
        devices = {str(d) for d in device_map.values()}
        if len(devices) > 1:
            raise ValueError(f"HD-PiSSA cannot train a model split over devices with `device_map` (model "
                             f"parallelism: {sorted(devices)}) in {world_size} processes. Load the whole model on each "
                             f"process's device (`device_map=None`). " + REPLICATED)
