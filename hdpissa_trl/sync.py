"""Gather every device's adapter deltas in one collective and fold them into the full weight.

After an optimizer step device ``k`` holds ``A_k = A0_k + dA_k`` and ``B_k = B0_k + dB_k``. Every device already
knows all ``A0_k, B0_k`` (from init), so only the deltas travel: one flat fp32 buffer of every layer's
``(dA_k, dB_k)`` is ``all_gather_into_tensor``-ed once (or once per bucket under a memory cap). Then, identically on
every device, each layer folds

    W += s · Σ_k (B_k A_k − B0_k A0_k) = s · [dB_1..dB_K | B0_1..B0_K] @ [A_1..A_K ; dA_1..dA_K]

as ONE GEMM of inner dimension ``2·K·r`` (the delta form avoids the cancellation of ``BA − B0A0``), and resets
``A ← A0``, ``B ← B0``. Same inputs in the same order on every device give the same bits of ``W``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .layer import HDPiSSALinear
from .precision import WeightUpdater


@dataclass
class FoldStats:
    """What one fold cost and did."""

    seconds: float = 0.0
    gather_seconds: float = 0.0
    bytes_sent: int = 0  # this device's contribution to the gather(s)
    bytes_received: int = 0  # what this device received from the others
    num_collectives: int = 0
    update_rank_bound: int = 0  # min over layers of min(2·K·r, m, n): the rank one step can reach


def _dist_world(group) -> tuple[bool, int, int]:
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_world_size(group), dist.get_rank(group)
    return False, 1, 0


def layer_delta_numel(layer: HDPiSSALinear) -> int:
    return layer.r * (layer.in_features + layer.out_features)


def make_buckets(layers: list[HDPiSSALinear], bucket_bytes: int) -> list[list[int]]:
    """Split layer indices into consecutive buckets whose fp32 delta buffers stay under ``bucket_bytes``.

    ``bucket_bytes == 0`` means one bucket (one collective per step). A layer larger than the cap gets a bucket alone.
    """
    if bucket_bytes <= 0:
        return [list(range(len(layers)))]
    buckets, cur, cur_bytes = [], [], 0
    for i, layer in enumerate(layers):
        nbytes = layer_delta_numel(layer) * 4
        if cur and cur_bytes + nbytes > bucket_bytes:
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += nbytes
    if cur:
        buckets.append(cur)
    return buckets


@torch.no_grad()
def local_delta_buffer(layers: list[HDPiSSALinear]) -> torch.Tensor:
    """This device's ``[dA (r·n) | dB (m·r)]`` of each layer, concatenated in layer order, fp32."""
    parts = []
    for layer in layers:
        parts.append((layer.lora_A - layer.A0).reshape(-1))
        parts.append((layer.lora_B - layer.B0).reshape(-1))
    return torch.cat(parts).to(torch.float32)


def _all_gather_flat(out: torch.Tensor, local: torch.Tensor, group=None) -> None:
    """One flat all-gather (``all_gather_single`` where torch has it; it replaced ``all_gather_into_tensor``)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, local, group=group)


class CollectiveError(RuntimeError):
    """A collective of the fold or of the consistency check failed: a peer died or hangs, or the timeout ran out."""


@contextlib.contextmanager
def collective_errors(what: str, step: int | None, group=None):
    """Re-raise a failed collective (gloo/NCCL timeout, closed connection) as a :class:`CollectiveError` that says
    which rank and step, and how to give a slow peer more time. torch's own message names neither."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistError and the gloo/NCCL errors are RuntimeErrors
        _, world, rank = _dist_world(group)
        raise CollectiveError(
            f"HD-PiSSA {what} at step {step} failed on rank {rank} of {world}: {exc}. Another process probably died "
            f"or hangs (read its log), or did not reach this step within the process-group timeout. To give slow "
            f"steps more time raise `ddp_timeout` (seconds) in the training arguments (or `timeout=` of "
            f"torch.distributed.init_process_group)."
        ) from exc


def gather_buffers(local: torch.Tensor, group=None, step: int | None = None) -> tuple[torch.Tensor, int]:
    """All-gather ``local`` from every rank into a ``(K, numel)`` tensor. Returns it and the number of collectives."""
    distributed, world, _ = _dist_world(group)
    if not distributed or world == 1:
        return local.unsqueeze(0), 0
    out = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    with collective_errors("fold (all-gather of the adapter deltas)", step, group):
        _all_gather_flat(out, local.contiguous(), group)
    return out.view(world, -1), 1


@torch.no_grad()
def fold_layer(layer: HDPiSSALinear, gathered: torch.Tensor, offset: int, updater: WeightUpdater, step: int,
               move_factors: bool = False) -> int:
    """Fold one layer from the gathered ``(K, numel)`` buffer starting at ``offset``; returns the next offset.

    ``move_factors``: afterwards every device's factors become its adapter's new values (``subspace="moving"``).
    """
    r, n, m = layer.r, layer.in_features, layer.out_features
    K = gathered.shape[0]
    na, nb = r * n, m * r
    dA_all = gathered[:, offset:offset + na].reshape(K * r, n)  # rows k·r..(k+1)·r = dA_k
    dB_all = gathered[:, offset + na:offset + na + nb].reshape(K, m, r).permute(1, 0, 2).reshape(m, K * r)
    A_all = layer.A0_all + dA_all
    left = torch.cat([dB_all, layer.B0_all], dim=1)  # (m, 2Kr)
    right = torch.cat([A_all, dA_all], dim=0)  # (2Kr, n)
    weight = layer.base_layer.weight
    if updater.master is None and weight.dtype == torch.float32:
        weight.addmm_(left, right, alpha=layer.scale)  # fp32 W: fold in place, no m×n temporary
    else:
        delta = torch.mm(left, right)
        delta.mul_(layer.scale)
        updater.apply(weight, delta, step)
    if move_factors:
        layer.A0_all.copy_(A_all)
        layer.B0_all.add_(dB_all)
    layer.reset_adapter()
    return offset + na + nb


def fold_deltas(layers: list[HDPiSSALinear], updaters: list[WeightUpdater], step: int, group=None,
                bucket_bytes: int = 0, move_factors: bool = False) -> FoldStats:
    """Gather all devices' deltas (one collective per bucket) and fold them into every layer's ``W``.

    Must be called by every rank after the same optimizer step, with the same layers in the same order.
    """
    t0 = time.perf_counter()
    stats = FoldStats()
    _, world, _ = _dist_world(group)
    for bucket in make_buckets(layers, bucket_bytes):
        blayers = [layers[i] for i in bucket]
        local = local_delta_buffer(blayers)
        tg = time.perf_counter()
        gathered, ncoll = gather_buffers(local, group, step)
        stats.gather_seconds += time.perf_counter() - tg
        stats.num_collectives += ncoll
        if ncoll:
            stats.bytes_sent += local.numel() * local.element_size()
            stats.bytes_received += (world - 1) * local.numel() * local.element_size()
        offset = 0
        for i in bucket:
            offset = fold_layer(layers[i], gathered, offset, updaters[i], step, move_factors)
    stats.update_rank_bound = min(
        (min(2 * world * lyr.r, lyr.in_features, lyr.out_features) for lyr in layers), default=0
    )
    stats.seconds = time.perf_counter() - t0
    return stats


@torch.no_grad()
def weight_checksums(layers: list[HDPiSSALinear], updaters: list[WeightUpdater] | None = None) -> torch.Tensor:
    """One int64 checksum per layer over the exact bits of ``W`` (and the precision state), position-weighted.

    Integer arithmetic so the sum itself is exact and order-independent: equal bits give equal checksums.
    """
    sums = []
    for i, layer in enumerate(layers):
        tensors = [layer.base_layer.weight]
        if updaters is not None:
            tensors += list(updaters[i].state().values())
        total = torch.zeros((), dtype=torch.int64, device=layer.base_layer.weight.device)
        for t in tensors:
            flat = t.detach().contiguous().reshape(-1)
            itype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
            bits = flat.view(itype).to(torch.int64)
            weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device) % 65521 + 1
            total = total + (bits * weights).sum()  # wraps modulo 2^64: still exact and deterministic
        sums.append(total.cpu())
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


class WeightMismatchError(RuntimeError):
    """Raised when the full weights of two devices differ (they must be bit-identical)."""


def check_weights_consistent(layers: list[HDPiSSALinear], names: list[str], step: int,
                             updaters: list[WeightUpdater] | None = None, group=None,
                             on_mismatch: str = "raise") -> list[str]:
    """Compare per-layer checksums across ranks (one small all_gather). Returns names of layers that differed.

    ``on_mismatch="raise"`` raises :class:`WeightMismatchError` naming the first differing layer and the step;
    ``"resync"`` broadcasts rank 0's ``W`` (and precision state) for the differing layers and returns their names.
    """
    distributed, world, rank = _dist_world(group)
    if not distributed or world == 1:
        return []
    local = weight_checksums(layers, updaters)
    dev = layers[0].base_layer.weight.device if layers else torch.device("cpu")
    local_dev = local.to(dev)
    out = torch.empty(world * local.numel(), dtype=torch.int64, device=dev)
    with collective_errors("weight consistency check (all-gather of checksums)", step, group):
        _all_gather_flat(out, local_dev, group)
    table = out.view(world, -1).cpu()
    bad = (table != table[0:1]).any(dim=0).nonzero().flatten().tolist()
    if not bad:
        return []
    bad_names = [names[i] for i in bad]
    if on_mismatch == "raise":
        ranks = [r for r in range(world) if table[r, bad[0]] != table[0, bad[0]]]
        raise WeightMismatchError(
            f"HD-PiSSA weight mismatch at step {step}: layer {bad_names[0]!r} differs between rank 0 and rank(s) "
            f"{ranks} ({len(bad)} layer(s) differ in total). All devices must hold bit-identical W; set "
            f"on_sync_mismatch='resync' to copy rank 0's weights instead of stopping."
        )
    with collective_errors("re-sync of W from rank 0 (broadcast)", step, group):
        for i in bad:
            dist.broadcast(layers[i].base_layer.weight.data, src=0, group=group)
            if updaters is not None:
                for t in updaters[i].state().values():
                    dist.broadcast(t, src=0, group=group)
    return bad_names
