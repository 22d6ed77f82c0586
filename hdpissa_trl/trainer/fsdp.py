"""The trainer's side of W sharded by rows: read the user's FSDP2 settings from accelerate and shard the model by them.

Users ask for FSDP2 the usual way: an accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``
(``recipes/accelerate_configs/fsdp2.yaml``), or ``SFTConfig(fsdp="full_shard", fsdp_config={"version": 2})``.
HD-PiSSA then shards the (frozen) model with accelerate's own FSDP2 preparation (transformer blocks, the root, the
mixed-precision policy, ``reshard_after_forward``, ``cpu_ram_efficient_loading``...) BEFORE the adapters exist, so the
adapters are never FSDP parameters: no gradient reduce-scatter, no broadcast, one slice per device.

On CPU (``use_cpu=True``, gloo) accelerate runs as ``MULTI_CPU`` and leaves FSDP off even when the launch config asks
for it (``recipes/accelerate_configs/cpu_fsdp2.yaml``); the same settings are read from the launch environment and
applied the same way, so one code path shards on CPU and on GPUs.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from torch import nn


def requested_fsdp_plugin(args, accelerator):
    """The FSDP plugin the user configured (accelerate state, launch environment or ``args.fsdp``), else ``None``.

    Refuses FSDP1: its flat parameters are not row-aligned, so a rank could not fold "its rows" of a weight.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        if getattr(args, "fsdp_plugin_args", None):
            plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* settings accelerate launch exported
        if plugin is not None and accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
    if plugin is not None and plugin.fsdp_version != 2:
        raise ValueError(
            f"HD-PiSSA needs FSDP2 to shard W: got fsdp_version={plugin.fsdp_version}. FSDP1 keeps flat, "
            f"non-row-aligned parameter shards. Set `fsdp_version: 2` in the accelerate config "
            f"(recipes/accelerate_configs/fsdp2.yaml) or fsdp_config={{'version': 2}} in the training arguments."
        )
    return plugin


def fsdp2_requested(args) -> bool:
    """Whether the run asks for FSDP2, decided from the training arguments and the launch environment alone (before
    any accelerator or model exists)."""
    from types import SimpleNamespace

    nothing = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None), mixed_precision="no")
    try:
        return requested_fsdp_plugin(args, nothing) is not None
    except ValueError:  # FSDP1: refused by check_parallelism with its own message
        return False


def machines(args=None) -> int:
    """How many machines the launch spans: the world size over the processes started on this machine (torchrun,
    hence ``accelerate launch``, exports both); 1 when the launcher does not say."""
    world = int(os.environ.get("WORLD_SIZE", getattr(args, "world_size", 1) or 1))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    return max(1, -(-world // max(local, 1)))


def check_sharded_storage(args) -> None:
    """Refuse, before anything is loaded, W sharded by rows (FSDP2) on several machines with ``save_on_each_node=True``.

    ``save_on_each_node`` declares per-machine storage; a sharded checkpoint is one directory into which every process
    writes its rows and from which a resume reads all of them, so no machine would ever hold a checkpoint it could
    resume from (and the merged model is gathered onto one process only).
    """
    if not getattr(args, "save_on_each_node", False) or not fsdp2_requested(args) or machines(args) < 2:
        return
    raise ValueError(
        f"save_on_each_node=True declares storage per machine, but with W sharded by rows (FSDP2) on "
        f"{machines(args)} machines every checkpoint is one directory that all processes write their rows into and "
        f"a resume reads whole: no machine would hold a checkpoint it can resume from. Put output_dir on storage "
        f"every machine shares and set save_on_each_node=False, or train with W replicated (multi_node.yaml), where "
        f"save_on_each_node gives every machine its own complete checkpoint."
    )


def shard_like_accelerate(model: nn.Module, accelerator, plugin) -> nn.Module:
    """``fully_shard`` the frozen ``model`` exactly as accelerate's FSDP2 preparation would; returns the model.

    Every parameter is frozen first (HD-PiSSA trains only its adapters, created after this), so accelerate keeps the
    weights in their loaded dtype and the optimizer later sees only the adapters. Activation checkpointing from the
    FSDP settings is applied here, before sharding, and switched off in the plugin so it is not applied twice.
    """
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise ValueError("HD-PiSSA does not support FSDP parameter CPU offload (fsdp_offload_params): the fold "
                         "updates W's shards in place on the device. Set fsdp_offload_params: false.")
    for p in model.parameters():
        p.requires_grad_(False)
    driver = accelerator
    if getattr(accelerator.state, "fsdp_plugin", None) is not plugin:
        # CPU: accelerate's state has no FSDP plugin; drive its preparation with the requested one.
        driver = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision=accelerator.mixed_precision,
                                 is_main_process=accelerator.is_main_process, device=accelerator.device,
                                 torch_device_mesh=None)
    plugin.set_auto_wrap_policy(model)
    if plugin.activation_checkpointing:
        model = fsdp2_apply_ac(driver, model)
        plugin.activation_checkpointing = False
    return fsdp2_prepare_model(driver, model)
