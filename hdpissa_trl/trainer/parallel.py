"""Which parallel set-ups HD-PiSSA trains with, decided in one place, before any weight is loaded.

HD-PiSSA needs per-device adapters that are never averaged or broadcast. Two set-ups give that:

* replicated data parallelism (``accelerate launch --num_processes K``): every device holds the whole W;
* FSDP2 (``fsdp_version: 2``): W sharded by rows, each rank folds its own rows (:mod:`hdpissa_trl.engine.sharded`,
  :mod:`hdpissa_trl.trainer.fsdp`).

Everything else would silently destroy the method or fail with an unrelated message, and is refused here with the
setting to change: DeepSpeed (every ZeRO stage averages the adapter gradients; ZeRO-3's partitions are flat chunks,
not rows of W), FSDP1 (flat, non-row-aligned shards), a ``device_map`` splitting the model with K > 1,
``bf16_full_eval``/``fp16_full_eval``, several GPUs visible to one process without a launcher (``nn.DataParallel``),
and a model on the CPU when the processes talk over NCCL.
"""

from __future__ import annotations

import json
import os

REPLICATED = ("Use replicated data parallelism instead: `accelerate launch --num_processes K` with a multi-GPU, "
              "multi-node or CPU config (no DeepSpeed, no FSDP); every device then holds the whole model.")
TO_FSDP2 = ("To shard W, use FSDP2: `accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml` (or "
            "`fsdp=\"full_shard\", fsdp_config={\"version\": 2}` in the training arguments); see docs/parallelism.md.")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes", "on")


def _deepspeed_zero_stage(args) -> int | None:
    """The ZeRO stage the user asked for (training arguments, their DeepSpeed config, or the launch environment);
    ``None`` without DeepSpeed, ``-1`` when DeepSpeed is on but its stage unknown."""
    plugin = getattr(args, "deepspeed_plugin", None) if args is not None else None
    config = getattr(args, "deepspeed", None) if args is not None else None
    if plugin is None and not config and not _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return None
    if getattr(plugin, "zero_stage", None) is not None:
        return int(plugin.zero_stage)
    if isinstance(config, str) and os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    stage = (config or {}).get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    if stage is None:
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if stage not in (None, "", "auto") else -1


def check_deepspeed(args) -> None:
    """Refuse DeepSpeed: every stage averages the adapter gradients across devices (merging the per-device slices);
    ZeRO-3 partitions are flat chunks of the parameters, not rows of W, so no device could fold "its rows"."""
    stage = _deepspeed_zero_stage(args)
    if stage is None:
        return
    if stage == 3:
        raise ValueError("HD-PiSSA cannot train under DeepSpeed ZeRO-3: its partitions are flattened chunks of the "
                         "parameters, not rows of W, so no device could fold its own rows, and it averages the "
                         "per-device adapter gradients. " + TO_FSDP2)
    raise ValueError(f"HD-PiSSA cannot train under DeepSpeed (ZeRO stage {stage if stage >= 0 else 'unknown'}): "
                     f"DeepSpeed averages the adapter gradients across devices, merging the per-device slices. "
                     + REPLICATED + " " + TO_FSDP2)


def requested_fsdp_version(args) -> int | None:
    """The FSDP version the user asked for (training arguments or an accelerate launch config), ``None`` without FSDP.

    transformers defaults ``fsdp_config["version"]`` to 2; accelerate's ``FSDP_VERSION`` defaults to 1."""
    if args is not None and getattr(args, "fsdp", None):
        return int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
    if _env_flag("ACCELERATE_USE_FSDP"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


ONE_PROCESS_PER_GPU = ("Start one process per GPU instead: `accelerate launch --num_processes N script.py` (each "
                      "process then owns its own slice of the singular directions), or make one GPU visible "
                      "(CUDA_VISIBLE_DEVICES=0).")


def _split_on_purpose(args, model) -> bool:
    """Whether one process is to hold a model split over several devices by a ``device_map`` the user chose."""
    if isinstance(model, str):  # not loaded yet: only an explicit device_map counts (TRL would pick "auto" itself)
        return (getattr(args, "model_init_kwargs", None) or {}).get("device_map") is not None
    device_map = getattr(model, "hf_device_map", None)
    return isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) > 1


def check_one_process_per_gpu(args, model=None) -> None:
    """Refuse several GPUs visible to one process started without a launcher.

    transformers then wraps the model in ``nn.DataParallel`` (``args.n_gpu > 1``; a model given by name would be split
    over the GPUs by TRL's ``device_map="auto"`` instead): one process, so K = 1 and one slice of the singular
    directions for all the GPUs. A model split over the GPUs by a ``device_map`` the user set is model parallelism in
    one process (K = 1, allowed); transformers sets ``n_gpu`` to 1 for it once the model is loaded.
    """
    n_gpu = getattr(args, "n_gpu", 1) if args is not None else 1
    if isinstance(n_gpu, int) and n_gpu > 1 and not _split_on_purpose(args, model):
        raise ValueError(f"{n_gpu} GPUs are visible to this one process, started without a launcher: transformers "
                         f"would train through `nn.DataParallel` (or TRL, given a model name, split the model over "
                         f"them), i.e. with K = 1 process and one HD-PiSSA slice for all of them. "
                         + ONE_PROCESS_PER_GPU)


def check_model_on_device(model, backend: str | None) -> None:
    """Refuse a model whose weights are on the CPU when the processes talk over NCCL, before the first collective.

    NCCL moves GPU tensors only: the broadcast of the initial slices (and every fold) would fail deep inside the
    set-up with a message about tensor devices. Call after the trainer placed (or FSDP2 sharded) the model."""
    if backend != "nccl":
        return
    on_cpu = [name for name, p in model.named_parameters() if p.device.type == "cpu"]
    if on_cpu:
        raise ValueError(f"The model is on the CPU ({len(on_cpu)} weight tensors, e.g. {on_cpu[0]!r}) but the processes "
                         f"talk over NCCL, which moves GPU tensors only: HD-PiSSA's collectives (the broadcast of the "
                         f"initial slices, every fold) cannot run. Let the trainer place the model on each process's "
                         f"GPU (the default; `place_model_on_device=False` keeps it where it is, and a `device_map` "
                         f"should name the process's GPU), or train on CPU processes with gloo (`use_cpu=True`).")


def load_whole_model_per_process(args, model) -> None:
    """Under FSDP, load a model given by name with ``device_map=None`` (unless the user set a ``device_map``).

    TRL loads a model name with ``device_map="auto"`` on a GPU machine except under MULTI_GPU and DeepSpeed: under FSDP
    every process would then spread its own copy over all the machine's GPUs, and the sharding (accelerate's FSDP2
    preparation, which moves each rank's rows to its GPU) needs the whole model on the CPU or on ``meta``.
    """
    if not isinstance(model, str) or not hasattr(args, "model_init_kwargs") or requested_fsdp_version(args) is None:
        return
    kwargs = dict(args.model_init_kwargs or {})
    if "device_map" not in kwargs:
        args.model_init_kwargs = {**kwargs, "device_map": None}


def check_parallelism(args, model=None, world_size: int = 1) -> None:
    """Raise ``ValueError`` for a parallel set-up HD-PiSSA cannot train with (FSDP2 and replicated DP pass).

    Args:
        args: the ``TrainingArguments`` (or ``None``, for the defaults).
        model: the model object when the user passed one (its ``hf_device_map`` is checked), else ``None``.
        world_size: number of processes K (a model split over devices is refused when K > 1).
    """
    check_deepspeed(args)
    check_one_process_per_gpu(args, model)
    version = requested_fsdp_version(args)
    if version is not None and version != 2:
        raise ValueError(f"HD-PiSSA cannot train under FSDP{version} (`fsdp=`/`--fsdp` with fsdp_config version "
                         f"{version}, or an accelerate FSDP config without `fsdp_version: 2`): its flat parameter "
                         f"shards are not rows of W and it reduces gradients across devices, which destroys the "
                         f"per-device adapters. Set `fsdp_version: 2` (accelerate) or fsdp_config={{'version': 2}}. "
                         + TO_FSDP2)
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
