"""The fold: gather every device's adapter deltas in one collective and add them into the full weight.

After an optimizer step device ``k`` holds ``A_k = A0_k + dA_k`` and ``B_k = B0_k + dB_k``. Every device already
knows all ``A0_k, B0_k`` (from init), so only the deltas travel: one flat fp32 buffer of every layer's
``(dA_k, dB_k)`` is ``all_gather_into_tensor``-ed once (or once per bucket under a memory cap). Then, identically on
every device, each layer folds

    W += s · Σ_k (B_k A_k − B0_k A0_k) = s · [dB_1..dB_K | B0_1..B0_K] @ [A_1..A_K ; dA_1..dA_K]

as ONE GEMM of inner dimension ``2·K·r`` (the delta form avoids the cancellation of ``BA − B0A0``), and resets
``A ← A0``, ``B ← B0``. How ``W`` absorbs the product (fp32 master, Kahan, stochastic rounding) is the
:class:`~hdpissa_trl.engine.precision.WeightUpdater`'s business. Same inputs in the same order on every device give
the same bits of ``W``; :mod:`hdpissa_trl.engine.consistency` checks that they do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .distributed import all_gather_flat, collective_errors, world_and_rank
from .layer import HDPiSSALinear
from .precision import WeightUpdater


class Stopwatch:
    """Elapsed time of work queued on ``device``.

    CUDA work is asynchronous: the host clock would only measure kernel launches. There, CUDA events are recorded on
    the device's current stream and read when :attr:`seconds` is first asked for (that read waits for the work; the
    fold itself never blocks the host). Elsewhere, the host clock.
    """

    def __init__(self, device: torch.device | None = None):
        self._events = None
        self._seconds: float | None = None
        if device is not None and device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record(stream)
            self._stream = stream
        self._t0 = time.perf_counter()

    def stop(self) -> Stopwatch:
        if self._events is not None:
            self._events[1].record(self._stream)
        else:
            self._seconds = time.perf_counter() - self._t0
        return self

    @property
    def seconds(self) -> float:
        if self._seconds is None:
            start, end = self._events
            end.synchronize()
            self._seconds = start.elapsed_time(end) / 1e3
        return self._seconds


@dataclass
class FoldStats:
    """What one fold cost and did. ``seconds`` / ``gather_seconds`` are device time (see :class:`Stopwatch`)."""

    bytes_sent: int = 0  # this device's contribution to the gather(s)
    bytes_received: int = 0  # what this device received from the others
    num_collectives: int = 0
    update_rank_bound: int = 0  # min over layers of min(2·K·r, m, n): the rank one step can reach
    fold_timer: Stopwatch | None = field(default=None, repr=False)
    gather_timers: list[Stopwatch] = field(default_factory=list, repr=False)

    @property
    def seconds(self) -> float:
        return self.fold_timer.seconds if self.fold_timer is not None else 0.0

    @property
    def gather_seconds(self) -> float:
        return sum(t.seconds for t in self.gather_timers)

    def to_dict(self) -> dict[str, float | int]:
        return {"seconds": self.seconds, "gather_seconds": self.gather_seconds, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "num_collectives": self.num_collectives,
                "update_rank_bound": self.update_rank_bound}


def update_rank_bound(layers: list[HDPiSSALinear], world_size: int) -> int:
    """The rank one step's update can reach on the smallest layer: ``min(2·K·r, m, n)`` (0 without layers)."""
    return min((min(2 * world_size * lyr.r, lyr.in_features, lyr.out_features) for lyr in layers), default=0)


def layer_delta_numel(layer: HDPiSSALinear) -> int:
    return layer.r * (layer.in_features + layer.out_features)


def buckets_by_size(sizes: list[int], cap: int) -> list[list[int]]:
    """Split indices into consecutive runs whose summed ``sizes`` stay under ``cap`` (an item larger than the cap
    gets a run alone). Every rank computes the same runs from the same sizes, so the collectives line up."""
    buckets, cur, cur_size = [], [], 0
    for i, size in enumerate(sizes):
        if cur and cur_size + size > cap:
            buckets.append(cur)
            cur, cur_size = [], 0
        cur.append(i)
        cur_size += size
    if cur:
        buckets.append(cur)
    return buckets


def make_buckets(layers: list[HDPiSSALinear], bucket_bytes: int) -> list[list[int]]:
    """Split layer indices into consecutive buckets whose fp32 delta buffers stay under ``bucket_bytes``.

    ``bucket_bytes == 0`` means one bucket (one collective per step). A layer larger than the cap gets a bucket alone.
    """
    if bucket_bytes <= 0:
        return [list(range(len(layers)))]
    return buckets_by_size([layer_delta_numel(layer) * 4 for layer in layers], bucket_bytes)


@torch.no_grad()
def local_delta_buffer(layers: list[HDPiSSALinear]) -> torch.Tensor:
    """This device's ``[dA (r·n) | dB (m·r)]`` of each layer, concatenated in layer order, fp32.

    Written straight into one flat buffer by multi-tensor operations (copy the adapters, subtract their initial
    values), instead of two subtractions per layer and a concatenation. The A and B sides go in separate calls: ``B0``
    is a column slice of ``B0_all``, and one strided tensor would send a whole multi-tensor call down the per-tensor
    path on CUDA.
    """
    if not layers:
        return torch.zeros(0, dtype=torch.float32)
    out = torch.empty(sum(lyr.lora_A.numel() + lyr.lora_B.numel() for lyr in layers), dtype=torch.float32,
                      device=layers[0].lora_A.device)
    sides = {"A": ([], [], []), "B": ([], [], [])}  # (views into out, adapters, initial values)
    offset = 0
    for lyr in layers:
        for side, param, init in (("A", lyr.lora_A, lyr.A0), ("B", lyr.lora_B, lyr.B0)):
            views, params, inits = sides[side]
            views.append(out[offset:offset + param.numel()].view(param.shape))
            params.append(param.detach())
            inits.append(init)
            offset += param.numel()
    for views, params, inits in sides.values():
        torch._foreach_copy_(views, params)
        torch._foreach_sub_(views, inits)
    return out


@torch.no_grad()
def reset_adapters(layers: list[HDPiSSALinear]) -> None:
    """``A ← A0``, ``B ← B0`` of every layer (in place, so optimizer state keeps pointing at the same tensors): one
    multi-tensor copy per side instead of two copies per layer."""
    if layers:
        torch._foreach_copy_([lyr.lora_A.detach() for lyr in layers], [lyr.A0 for lyr in layers])
        torch._foreach_copy_([lyr.lora_B.detach() for lyr in layers], [lyr.B0 for lyr in layers])


def gather_buffers(local: torch.Tensor, group=None, step: int | None = None) -> tuple[torch.Tensor, int]:
    """All-gather ``local`` from every rank into a ``(K, numel)`` tensor. Returns it and the number of collectives."""
    world, _ = world_and_rank(group)
    if world == 1:
        return local.unsqueeze(0), 0
    out = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    with collective_errors("fold (all-gather of the adapter deltas)", step, group):
        all_gather_flat(out, local.contiguous(), group)
    return out.view(world, -1), 1


@torch.no_grad()
def fold_layer(layer: HDPiSSALinear, gathered: torch.Tensor, offset: int, updater: WeightUpdater, step: int,
               move_factors: bool = False, reset: bool = True) -> int:
    """Fold one layer from the gathered ``(K, numel)`` buffer starting at ``offset``; returns the next offset.

    The GEMM's operands are written once each, straight from the gathered buffer: ``left = s·[dB_1..dB_K | B0_all]``
    (m × 2Kr, scaled here so no kernel scales the m×n product) and ``right = [A0_all + dA_all ; dA_all]`` (2Kr × n).
    ``move_factors``: afterwards every device's factors become its adapter's new values (``subspace="moving"``).
    ``reset=False`` leaves the adapter reset to the caller (:func:`reset_adapters`, all layers at once).
    """
    r, n, m = layer.r, layer.in_features, layer.out_features
    K = gathered.shape[0]
    Kr, na, nb = K * r, r * n, m * r
    dA = gathered[:, offset:offset + na].view(K, r, n)  # dA_k = dA[k]
    dB = gathered[:, offset + na:offset + na + nb].view(K, m, r).permute(1, 0, 2)  # (m, K, r): dB_k = dB[:, k]
    right = torch.empty(2 * Kr, n, dtype=torch.float32, device=gathered.device)
    torch.add(layer.A0_all.view(K, r, n), dA, out=right[:Kr].view(K, r, n))  # A_k = A0_k + dA_k
    right[Kr:].view(K, r, n).copy_(dA)
    left = torch.empty(m, 2 * Kr, dtype=torch.float32, device=gathered.device)
    torch.mul(dB, layer.scale, out=left[:, :Kr].view(m, K, r))
    torch.mul(layer.B0_all, layer.scale, out=left[:, Kr:])
    updater.addmm(layer.base_layer.weight, left, right, 1.0, step)
    if move_factors:
        layer.A0_all.copy_(right[:Kr])
        layer.B0_all.view(m, K, r).add_(dB)
    if reset:
        layer.reset_adapter()
    return offset + na + nb


@torch.no_grad()
def fold_gathered(layers: list[HDPiSSALinear], updaters: list[WeightUpdater], gathered: torch.Tensor, step: int,
                  move_factors: bool = False, reset: bool = True) -> None:
    """Fold every layer from one gathered ``(K, numel)`` buffer (the layers' deltas in order), then reset every
    adapter at once (``reset=False``: the caller does). What every device runs after the all-gather."""
    offset = 0
    for layer, updater in zip(layers, updaters):
        offset = fold_layer(layer, gathered, offset, updater, step, move_factors, reset=False)
    if reset:
        reset_adapters(layers)


def fold_deltas(layers: list[HDPiSSALinear], updaters: list[WeightUpdater], step: int, group=None,
                bucket_bytes: int = 0, move_factors: bool = False) -> FoldStats:
    """Gather all devices' deltas (one collective per bucket) and fold them into every layer's ``W``.

    Must be called by every rank after the same optimizer step, with the same layers in the same order.
    """
    device = layers[0].base_layer.weight.device if layers else None
    stats = FoldStats(fold_timer=Stopwatch(device))
    world, _ = world_and_rank(group)
    for bucket in make_buckets(layers, bucket_bytes):
        local = local_delta_buffer([layers[i] for i in bucket])
        timer = Stopwatch(device)
        gathered, ncoll = gather_buffers(local, group, step)
        stats.gather_timers.append(timer.stop())
        stats.num_collectives += ncoll
        if ncoll:
            stats.bytes_sent += local.numel() * local.element_size()
            stats.bytes_received += (world - 1) * local.numel() * local.element_size()
        fold_gathered([layers[i] for i in bucket], [updaters[i] for i in bucket], gathered, step, move_factors,
                      reset=False)
    reset_adapters(layers)
    stats.update_rank_bound = update_rank_bound(layers, world)
    stats.fold_timer.stop()
    return stats
