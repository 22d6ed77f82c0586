"""Every device must hold bit-identical ``W``: a cheap checksum compared across devices, and a re-sync from rank 0.

Same inputs, same order and same kernels give the same bits, but a silent difference (a flaky kernel, a bad GPU, a
resume from the wrong files) would otherwise drift unnoticed. :func:`check_weights_consistent` turns it into a clear
error naming the layer and the step, or copies rank 0's weights when asked to.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from .distributed import all_gather_flat, collective_errors, world_and_rank
from .layer import HDPiSSALinear
from .precision import WeightUpdater, compile_elementwise, fused_available

# Elements summed per pass: the int64 temporaries of one pass (the bits and their position weights, 16 bytes an
# element) stay at 16 MiB whatever the size of the weight (a 70B model's MLP matrix has 235M elements). A multiple of
# the modulus 65521, so every pass uses the same position weights (computed once per device and reused).
CHECKSUM_CHUNK = 65521 * 16
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_POSITION_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _position_weights(device: torch.device) -> torch.Tensor:
    """``(i mod 65521) + 2`` for ``i < CHECKSUM_CHUNK`` (int64): the weights of any pass that starts at a multiple of
    65521."""
    if device not in _POSITION_WEIGHTS:
        _POSITION_WEIGHTS[device] = torch.arange(1, CHECKSUM_CHUNK + 1, dtype=torch.int64, device=device).remainder_(
            65521).add_(1)
    return _POSITION_WEIGHTS[device]


def _checksum_flat(bits: torch.Tensor) -> torch.Tensor:
    """The checksum of a whole flat integer view in one pass (compiled on CUDA: one reduction, no temporaries)."""
    positions = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
    return (bits.to(torch.int64) * (positions % 65521 + 1)).sum()


_COMPILED_CHECKSUM: list = []


def _compiled_checksum():
    """:func:`_checksum_flat` compiled for CUDA (dynamic shapes), or None when compiling is off or unavailable."""
    if not fused_available():
        return None
    if not _COMPILED_CHECKSUM:
        try:
            _COMPILED_CHECKSUM.append(compile_elementwise(_checksum_flat))
        except Exception:  # no compiler here: the eager passes give the same value
            _COMPILED_CHECKSUM.append(None)
    return _COMPILED_CHECKSUM[0]


def tensor_checksum(t: torch.Tensor, chunk: int | None = CHECKSUM_CHUNK, fused: bool | None = None) -> torch.Tensor:
    """``Σ_i bits_i · ((i + 1) mod 65521 + 1)`` over the exact bits of ``t``, as an int64 scalar on ``t``'s device.

    Integer arithmetic wraps modulo 2^64, so the sum is exact and order-independent: equal bits give equal checksums
    and any chunking gives the same value. ``chunk`` elements are summed per pass (``None``: all at once). ``fused``
    (default: on CUDA when ``torch.compile`` works there): one compiled reduction over the whole tensor, which holds
    no temporaries at all. Nothing here waits for the device.
    """
    bits = t.detach().contiguous().reshape(-1).view(_INT_OF_SIZE[t.element_size()])
    n = bits.numel()
    if (fused if fused is not None else bits.is_cuda) and n:
        compiled = _compiled_checksum()
        if compiled is not None:
            try:
                return compiled(bits)
            except Exception as exc:  # a build failure comes before any kernel: fall back to the eager passes
                warnings.warn(f"hdpissa_trl: the fused checksum could not be built ({type(exc).__name__}: {exc}); "
                              f"using the unfused passes, which give the same value.", RuntimeWarning, stacklevel=2)
                _COMPILED_CHECKSUM[0] = None
    step = max(1, n if not chunk or chunk <= 0 else chunk)
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    shared = step % 65521 == 0 and step <= CHECKSUM_CHUNK  # every pass starts at a multiple of 65521
    for start in range(0, n, step):
        part = bits[start:start + step]
        if shared:
            total += torch.mul(part, _position_weights(t.device)[:part.numel()]).sum()
            continue
        weights = torch.arange(start + 1, start + part.numel() + 1, dtype=torch.int64, device=t.device)
        weights.remainder_(65521).add_(1)
        total += weights.mul_(part).sum()  # int64 result: never in place on `t` itself
        del weights  # freed before the next pass allocates its own
    return total


@torch.no_grad()
def weight_checksums(layers: list[HDPiSSALinear], updaters: list[WeightUpdater] | None = None,
                     chunk: int | None = CHECKSUM_CHUNK) -> torch.Tensor:
    """One int64 checksum per layer over the exact bits of ``W`` (and the precision state), position-weighted.

    The per-layer sums stay on the device until the end: one copy to the host (one wait for the device) in all.
    """
    sums = []
    for i, layer in enumerate(layers):
        tensors = [layer.base_layer.weight]
        if updaters is not None:
            tensors += list(updaters[i].state().values())
        total = tensor_checksum(tensors[0], chunk)
        for t in tensors[1:]:
            total = total + tensor_checksum(t, chunk).to(total.device)
        sums.append(total)
    if not sums:
        return torch.zeros(0, dtype=torch.int64)
    if len({s.device for s in sums}) > 1:
        sums = [s.cpu() for s in sums]
    return torch.stack(sums).cpu()


class WeightMismatchError(RuntimeError):
    """Raised when the full weights of two devices differ (they must be bit-identical)."""


def check_weights_consistent(layers: list[HDPiSSALinear], names: list[str], step: int,
                             updaters: list[WeightUpdater] | None = None, group=None,
                             on_mismatch: str = "raise") -> list[str]:
    """Compare per-layer checksums across ranks (one small all_gather). Returns names of layers that differed.

    ``on_mismatch="raise"`` raises :class:`WeightMismatchError` naming the first differing layer and the step;
    ``"resync"`` broadcasts rank 0's ``W`` (and precision state) for the differing layers and returns their names.
    """
    world, _ = world_and_rank(group)
    if world == 1:
        return []
    local = weight_checksums(layers, updaters)
    dev = layers[0].base_layer.weight.device if layers else torch.device("cpu")
    out = torch.empty(world * local.numel(), dtype=torch.int64, device=dev)
    with collective_errors("weight consistency check (all-gather of checksums)", step, group):
        all_gather_flat(out, local.to(dev), group)
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
