"""fp16 mixed precision: every device's GradScaler makes the SAME skip decision (one tiny collective per step).

Without DDP (HD-PiSSA never averages gradients) each device's GradScaler would only see its own gradients: a device
that found inf/nan would skip its step alone, and the devices' loss scales and learning-rate schedules would drift
apart. Here the found-inf flags are max-reduced across devices before ``GradScaler.step``, so every device skips
(and lowers its scale) together, and the scaler state stays identical everywhere.

Under FSDP2 accelerate gives a plain ``GradScaler`` (the adapters are plain tensors outside FSDP, each device's own);
versions that give FSDP a ``ShardedGradScaler`` sum the flags over its process group inside ``unscale_`` already, and
the max on top keeps the one decision (``tests/test_amp.py``). Clipping runs before this agreement (transformers calls
``clip_grad_norm_``, which unscales, before ``on_pre_optimizer_step``), so the gradients are unscaled once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..engine.distributed import is_distributed


def agree_on_skip(scaler, optimizer, group=None) -> bool | None:
    """Make every rank skip this optimizer step if ANY rank found inf/nan gradients. Every rank must call it.

    Call after the gradients are complete and before ``optimizer.step()``. Unscales the gradients first unless that
    was done already (``clip_grad_norm_`` does it); ``GradScaler.step`` then reuses the agreed flags. Returns whether
    the step will be skipped, or None when there is nothing to agree on (no enabled scaler, or one process).
    """
    if scaler is None or not scaler.is_enabled():
        return None
    if not is_distributed() or dist.get_world_size(group) == 1:
        return None
    from torch.amp.grad_scaler import OptState

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    state = scaler._per_optimizer_states[id(inner)]  # torch keeps the found-inf flags here; there is no public API
    if state["stage"] is OptState.READY:
        scaler.unscale_(inner)
    found = state["found_inf_per_device"]
    device = next(iter(found.values())).device if found else torch.device("cpu")
    flag = torch.zeros((), dtype=torch.float32, device=device)
    for f in found.values():
        flag = torch.maximum(flag, f.to(device=device, dtype=torch.float32).reshape(()))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    for f in found.values():
        f.copy_(flag.to(f.device).reshape(f.shape))
    return bool(flag.item())
