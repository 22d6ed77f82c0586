"""Initial factors: the top ``K·r`` singular directions of each weight, identical on every device.

Device ``k`` owns the slice ``idx = [k·r, (k+1)·r)``: ``A0_k = sqrt(S[idx]/s)·Vh[idx]``, ``B0_k = U[:, idx]·sqrt(S[idx]/s)``
with ``s = lora_alpha / r``: PEFT's PiSSA convention, so ``s·B0_k A0_k`` is exactly the slice's part of W, the
per-step change of W grows like ``sqrt(s)`` (not ``s``), and with K = 1 one step equals one PEFT PiSSA step.
Singular vectors are only defined up to sign (and rotation inside repeated singular values), so two devices that
factor the same matrix independently may disagree; each layer is therefore factored on ONE rank and broadcast.
With ``shard_init`` layer ``i`` is factored on rank ``i mod K`` so the K devices split the work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import world_and_rank


def top_singular_factors(weight: torch.Tensor, k: int, method: str = "svd", n_iter: int = 4,
                         seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(A0_all, B0_all)`` of shapes ``(k, n)`` and ``(m, k)`` from the top-``k`` SVD of ``weight`` (fp32).

    ``scale · B0_all @ A0_all`` is the best rank-``k`` approximation of ``weight`` (``scale = lora_alpha / r``, the
    factor the fold multiplies by; PEFT's PiSSA divides the singular values by it the same way).
    """
    w = weight.detach().to(torch.float32)
    if method == "svd":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, Vh = U[:, :k], S[:k], Vh[:k]
    elif method == "randomized":
        # svd_lowrank draws from the global RNG: fork it so init neither depends on nor disturbs the user's seed.
        devices = [w.device] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            # Oversample to 2k: with only k+8 the last device slices of a large K·r lose accuracy (BENCHMARKS.md §3).
            q = min(max(2 * k, k + 8), min(w.shape))
            U, S, V = torch.svd_lowrank(w, q=q, niter=n_iter)
        U, S, Vh = U[:, :k], S[:k], V[:, :k].t()
    else:
        raise ValueError(f"Unknown init method {method!r}; use 'svd' or 'randomized'.")
    root = (S / scale).sqrt()
    A0_all = (root[:, None] * Vh).contiguous()
    B0_all = (U * root[None, :]).contiguous()
    return A0_all, B0_all


def distributed_init_factors(weights: list[torch.Tensor], k: int, method: str, n_iter: int, seed: int,
                             shard: bool, show_progress: bool = False,
                             scale: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Factor every weight once and give every rank the same ``(A0_all, B0_all)``.

    Must be called by all ranks with the same list of weights (same shapes, same order). Without an initialised
    process group it simply factors everything locally.
    """
    world, rank = world_and_rank()
    distributed = world > 1
    owners = [(i % world) if shard else 0 for i in range(len(weights))]
    factors: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(weights)
    mine = [i for i in range(len(weights)) if not distributed or owners[i] == rank]
    iterator = mine
    if show_progress and rank == 0:
        from tqdm.auto import tqdm

        iterator = tqdm(mine, desc="HD-PiSSA SVD init")
    # Phase 1: every rank factors its own layers (in parallel across ranks).
    for i in iterator:
        factors[i] = top_singular_factors(weights[i], k, method, n_iter, seed + i, scale)
    # Phase 2: each layer's owner broadcasts it, so every rank holds bit-identical factors.
    if distributed:
        for i, w in enumerate(weights):
            if factors[i] is None:
                m, n = w.shape
                factors[i] = (torch.empty(k, n, dtype=torch.float32, device=w.device),
                              torch.empty(m, k, dtype=torch.float32, device=w.device))
            dist.broadcast(factors[i][0], src=owners[i])
            dist.broadcast(factors[i][1], src=owners[i])
    return factors  # type: ignore[return-value]


def init_factors_per_layer(weights: list[torch.Tensor], ranks: list[int], world_size: int, config,
                           show_progress: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Initial factors of every layer, ``world_size·r_layer`` directions each, scaled by ``lora_alpha / r_layer``
    (one :func:`distributed_init_factors` call per distinct rank). ``config`` is an :class:`HDPiSSAConfig`."""
    factors: list = [None] * len(weights)
    for r in sorted(set(ranks), reverse=True):
        idx = [i for i, ri in enumerate(ranks) if ri == r]
        group = distributed_init_factors([weights[i] for i in idx], world_size * r, config.init_method,
                                         config.n_iter, config.seed, shard=config.shard_init,
                                         show_progress=show_progress, scale=config.lora_alpha / r)
        for i, f in zip(idx, group):
            factors[i] = f
    return factors
