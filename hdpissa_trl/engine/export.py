"""The run's update as a LoRA adapter: ``ΔW = W_final − W_start`` of every adapted layer factored as ``B·A``.

With the paper's fixed directions every fold adds ``s·Σ_k(dB_k A0_k + B0_k dA_k + dB_k dA_k)``: the first two terms
have columns in span(U) or rows in span(V) (U, V: the ``K·r`` owned directions, orthonormal), so to first order the
whole run's ``ΔW`` lies in ``{U·X + Y·Vᵀ}``, of rank ``≤ 2·K·r``. Its projection onto that set is exactly

    B = [U | (I − UUᵀ)·ΔW·V],   A = [Uᵀ·ΔW ; Vᵀ]        (B·A = UUᵀΔW + (I − UUᵀ)ΔW·VVᵀ)

and what it leaves out is ``(I − UUᵀ)·ΔW·(I − VVᵀ)``, the second-order part: :func:`exact_factors`, a few GEMMs of
inner dimension ``K·r`` per layer (no SVD). The same ``2·K·r`` columns do better with the best ``A`` for them
(``A = QᵀΔW`` for an orthonormal basis ``Q`` of ``B``'s columns: never a larger error) and a subspace iteration
(:func:`refined_factors`, the default for the fixed scheme: on the measured runs it reached the truncated SVD's
error at a few more GEMMs, BENCHMARKS.md). Where the set moved during the run (``rotate``, ``refactor``, ``gradient``,
``moving``), :func:`svd_factors` takes the truncated SVD of ``ΔW`` (the best rank-k approximation, one SVD of the
layer). Either way the error ``‖ΔW − B·A‖ / ‖ΔW‖`` is measured on the factors as written (after the cast to the
adapter dtype), never estimated.

Memory: ``W_start`` is not kept during training. :func:`export_updates` reads it back one layer at a time through a
callable (the trainer reads the checkpoint the run started from), so an export holds at most one layer's ``W_start``,
``ΔW`` and residual (3 × m × n fp32) per rank beside the model. Layer ``i`` is factored on rank ``i mod K`` (the ranks
work in parallel; with W sharded by rows the owner gathers that one layer's rows first), and the small factors are
gathered on rank 0, which writes them. :func:`weight_samples` keeps a few thousand entries of every starting weight
(taken at set-up) so that an export can refuse a checkpoint that is not the one the run started from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .distributed import world_and_rank

FACTORIZATIONS = ("auto", "refined", "exact", "svd")
FIXED_ONLY = ("refined", "exact")  # start from the run's fixed directions U, V
SAMPLES_PER_LAYER = 4096


@dataclass
class FactoredUpdate:
    """One layer's update as LoRA factors ``B (m × rank) · A (rank × n)`` and how well they reproduce ``ΔW``."""

    A: torch.Tensor
    B: torch.Tensor
    factorization: str  # "exact" (the rank-2·K·r projection), "refined" (its columns, refined) or "svd"
    delta_norm: float  # ‖ΔW‖_F
    error_norm: float  # ‖ΔW − B·A‖_F, with A and B as written (after the cast)
    seconds: float = 0.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def relative_error(self) -> float:
        """``‖ΔW − B·A‖ / ‖ΔW‖`` (0 for a layer that did not change)."""
        return self.error_norm / self.delta_norm if self.delta_norm > 0 else 0.0


def overall_relative_error(updates: list[FactoredUpdate]) -> float:
    """``sqrt(Σ_layers ‖ΔW − B·A‖²) / sqrt(Σ_layers ‖ΔW‖²)``: the whole model's share of the update left out."""
    den = sum(u.delta_norm ** 2 for u in updates)
    return (sum(u.error_norm ** 2 for u in updates) / den) ** 0.5 if den > 0 else 0.0


def directions(A0_all: torch.Tensor, B0_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases ``U`` (m × K·r) of the columns of ``B0_all`` and ``V`` (n × K·r) of the rows of ``A0_all``.

    ``A0_all = sqrt(S/s)·Vh`` and ``B0_all = U·sqrt(S/s)`` already have orthogonal rows / columns; a QR makes the
    bases exactly orthonormal in fp32 whatever the init (a zero singular value included)."""
    U = torch.linalg.qr(B0_all.to(torch.float32)).Q
    V = torch.linalg.qr(A0_all.to(torch.float32).t()).Q
    return U, V


def _balanced(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale every rank-one term ``b_j a_j`` so that ``‖b_j‖ = ‖a_j‖`` (same product; no tiny / huge entries in a
    low-precision adapter), as ``U·sqrt(S)``, ``sqrt(S)·Vh`` are for an SVD."""
    nb, na = B.norm(dim=0), A.norm(dim=1)
    ok = (nb > 0) & (na > 0)
    c = torch.where(ok, (na / nb.clamp_min(1e-38)).sqrt(), torch.ones_like(nb))
    return B * c[None, :], A / c[:, None]


@torch.no_grad()
def exact_factors(delta: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of rank ``2·K·r`` with ``B·A = UUᵀΔW + (I − UUᵀ)ΔW·VVᵀ``: the projection of ``ΔW`` onto
    ``{U·X + Y·Vᵀ}``. What is left out, ``(I − UUᵀ)ΔW(I − VVᵀ)``, is the second-order part of the folds."""
    P = U.t() @ delta  # (K·r × n) = UᵀΔW
    Q = delta @ V  # (m × K·r) = ΔW·V
    Q -= U @ (P @ V)  # (I − UUᵀ)ΔW·V
    B = torch.cat([U, Q], dim=1)
    A = torch.cat([P, V.t()], dim=0)
    return tuple(reversed(_balanced(B, A)))  # type: ignore[return-value]


def _ritz(delta: torch.Tensor, Q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` ``(A, B)`` with columns in span(Q) (orthonormal): SVD of the small ``QᵀΔW``."""
    Ub, S, Vh = torch.linalg.svd(Q.t() @ delta, full_matrices=False)
    root = S[:rank].sqrt()
    return (root[:, None] * Vh[:rank]).contiguous(), ((Q @ Ub[:, :rank]) * root[None, :]).contiguous()


@torch.no_grad()
def refined_factors(delta: torch.Tensor, U: torch.Tensor, V: torch.Tensor, rank: int | None = None,
                    n_iter: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of rank ``rank`` (default ``2·K·r``) with columns in the best of: span of :func:`exact_factors`'
    ``B`` (``A = QᵀΔW`` there can only lower its error, which is the second-order part) and ``n_iter`` subspace
    iterations from it (``Q ← orth(ΔW·orth(ΔWᵀQ))``, towards the top singular directions of ΔW). Each candidate is
    judged by its measured residual; the winner's ``QᵀΔW`` is factored by a small SVD (truncated to ``rank``)."""
    k = 2 * U.shape[1]
    rank = k if rank is None else min(rank, k)
    Q = torch.linalg.qr(exact_factors(delta, U, V)[1]).Q
    best, best_err = Q, None
    for it in range(n_iter + 1):
        if it:
            Q = torch.linalg.qr(delta @ torch.linalg.qr(delta.t() @ Q).Q).Q
        A, B = _ritz(delta, Q, rank)
        err = float((delta - B @ A).norm())
        if best_err is None or err < best_err:
            best, best_err = Q, err
    return _ritz(delta, best, rank)


@torch.no_grad()
def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of the truncated SVD: ``B = U_k·sqrt(S_k)``, ``A = sqrt(S_k)·Vh_k`` (the best rank-``k``
    approximation of ``ΔW`` in the Frobenius and spectral norms)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    root = S[:rank].sqrt()
    return (root[:, None] * Vh[:rank]).contiguous(), (U[:, :rank] * root[None, :]).contiguous()


@torch.no_grad()
def factor_update(delta: torch.Tensor, *, bases: tuple[torch.Tensor, torch.Tensor] | None = None,
                  rank: int | None = None, factorization: str = "auto", n_iter: int = 1,
                  dtype: torch.dtype = torch.float32) -> FactoredUpdate:
    """Factor one layer's ``ΔW`` (fp32). With ``bases = (U, V)`` (the fixed scheme): :func:`refined_factors`
    (``"auto"``/``"refined"``, at ``rank`` up to ``2·K·r``) or :func:`exact_factors` (``"exact"``, rank ``2·K·r``);
    without, or for a ``rank`` above ``2·K·r``, or with ``"svd"``: :func:`svd_factors` at ``rank`` (capped at
    ``min(m, n)``). A layer whose ``2·K·r`` reaches ``min(m, n)`` takes the SVD too (lossless there). The error is
    measured on the factors cast to ``dtype``."""
    t0 = time.perf_counter()
    delta = delta.to(torch.float32)
    m, n = delta.shape
    k = 2 * bases[0].shape[1] if bases is not None else None
    how = "svd" if factorization == "svd" or k is None or k >= min(m, n) or (rank is not None and rank > k) else (
        "exact" if factorization == "exact" else "refined")
    if how == "exact":
        A, B = exact_factors(delta, *bases)
    elif how == "refined":
        A, B = refined_factors(delta, *bases, rank=rank, n_iter=n_iter)
    else:
        if rank is None and k is None:
            raise ValueError("factor_update needs bases=(U, V) or a rank.")
        A, B = svd_factors(delta, min(rank or k, m, n))
    A, B = A.to(dtype), B.to(dtype)
    residual = delta - B.to(torch.float32) @ A.to(torch.float32)
    return FactoredUpdate(A=A, B=B, factorization=how, delta_norm=float(delta.norm()),
                          error_norm=float(residual.norm()), seconds=time.perf_counter() - t0)


def resolve_factorization(factorization: str, subspace: str, rank: int | None) -> str:
    """``"refined"``, ``"exact"`` or ``"svd"`` for an engine with schedule ``subspace`` (``"auto"``: refined for the
    fixed scheme, else SVD); a clear error for a combination that cannot work (checked before any work)."""
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"factorization must be one of {FACTORIZATIONS}, got {factorization!r}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer (or None for 2·K·r per layer), got {rank!r}.")
    if factorization in FIXED_ONLY and subspace != "fixed":
        raise ValueError(f"factorization={factorization!r} needs the fixed directions (subspace='fixed'); this run "
                         f"used subspace={subspace!r}, whose update left the initial directions. Use "
                         f"factorization='svd' (or 'auto').")
    if factorization == "exact" and rank is not None:
        raise ValueError("factorization='exact' has rank 2·K·r per layer by construction; leave rank=None, or use "
                         "factorization='refined' or 'svd' for another rank.")
    if factorization == "auto":
        return "refined" if subspace == "fixed" else "svd"
    return factorization


# -- is W_start the one the run started from? ----------------------------------------------------------------------
def sample_positions(m: int, n: int, count: int = SAMPLES_PER_LAYER) -> torch.Tensor:
    """Flat indices of up to ``count`` entries spread over an ``m × n`` weight (a stride coprime with ``n``, so the
    samples cover rows and columns alike)."""
    total = m * n
    stride = max(1, total // count)
    while stride > 1 and math.gcd(stride, n) > 1:
        stride += 1
    return torch.arange(0, total, stride, dtype=torch.int64)[:count]


def _local_weight(layer) -> tuple[torch.Tensor, int]:
    """This rank's part of a layer's weight (all of it, or its rows under FSDP2) and its first global row."""
    w = layer.base_layer.weight
    if hasattr(w, "to_local"):
        return w.to_local(), layer.rows[0]
    return w, 0


@torch.no_grad()
def weight_samples(engine, count: int = SAMPLES_PER_LAYER) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: ``(global flat indices, values)`` of a few thousand entries of the weight as it is now, on CPU, in
    its dtype; this rank's rows only under FSDP2. Taken at set-up, they identify the starting weights."""
    out = []
    for layer in engine.layers:
        local, row0 = _local_weight(layer)
        m, n = layer.out_features, layer.in_features
        idx = sample_positions(m, n, count)
        lo, hi = row0 * n, row0 * n + local.numel()
        idx = idx[(idx >= lo) & (idx < hi)]
        out.append((idx, local.detach().reshape(-1)[(idx - lo).to(local.device)].cpu().clone()))
    return out


def _check_start(name: str, w_start: torch.Tensor, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    flat = w_start.reshape(-1)
    for idx, values in samples:
        got = flat[idx.to(flat.device)].cpu()
        if not torch.equal(got, values.to(got.dtype)):
            bad = int((got != values.to(got.dtype)).sum())
            raise ValueError(
                f"The starting weights read for layer {name!r} are not the ones this run started from ({bad} of "
                f"{idx.numel()} sampled entries differ). Pass the checkpoint the run was started from as base_model "
                f"(the same files, loaded in the training dtype).")


# -- the whole model -----------------------------------------------------------------------------------------------
def _full_layer(engine, i: int, dst: int, need_bases: bool):
    """Collective under FSDP2 (every rank calls it for every layer, in order): ``(W_final fp32, B0_all)`` of layer
    ``i`` on rank ``dst`` (None elsewhere); replicated W: the local tensors on every rank, no communication."""
    layer, upd = engine.layers[i], engine.updaters[i]
    w = layer.base_layer.weight
    if not hasattr(w, "to_local"):
        if world_and_rank(engine.group)[1] != dst:
            return None
        B0 = layer.B0_all if need_bases else None
        return upd.full_precision_weight(w).to(torch.float32), B0
    from .sharded import gather_rows

    local = upd.full_precision_weight(w.to_local()).to(torch.float32)
    full = gather_rows(local, layer.out_features, dst, engine.group)
    B0 = gather_rows(layer.B0_rows, layer.out_features, dst, engine.group) if need_bases else None
    return (full, B0) if full is not None else None


def _guarded(fn, *args, alone: bool, rank: int) -> str | None:
    """Run ``fn``; in a multi-process run turn an exception into a message every rank raises after the next
    collective (one process alone raises it as it is)."""
    if alone:
        fn(*args)
        return None
    try:
        fn(*args)
    except Exception as exc:
        return f"rank {rank}: {type(exc).__name__}: {exc}"
    return None


@torch.no_grad()
def export_updates(engine, start_weight: Callable[[str], torch.Tensor], *, rank: int | None = None,
                   factorization: str = "auto", dtype: torch.dtype = torch.float32,
                   samples: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                   progress: Callable[[str, FactoredUpdate], None] | None = None) -> dict[str, FactoredUpdate]:
    """Factor every adapted layer's ``ΔW = W_final − W_start``; collective (every rank calls it).

    Args:
        engine: the :class:`~hdpissa_trl.engine.HDPiSSAEngine` (or sharded one) after training.
        start_weight: ``name -> W_start`` of that layer (CPU is fine), read on the layer's owner rank only.
        rank: LoRA rank of every layer (truncated SVD), or None for ``2·K·r`` of each layer.
        factorization: ``"auto"`` (``"refined"`` for ``subspace="fixed"``, else ``"svd"``), ``"refined"``,
            ``"exact"`` or ``"svd"`` (:func:`factor_update`).
        dtype: dtype of the factors (the error is measured after the cast).
        samples: this rank's :func:`weight_samples`, taken at set-up (gathered from every rank under FSDP2); when
            given, a ``W_start`` that does not match them is refused.
        progress: called on the owner with each layer's result.

    Returns ``{layer name: FactoredUpdate}`` (CPU tensors) on rank 0, ``{}`` elsewhere. In a multi-process run an
    error on any rank (a checkpoint that does not match, a missing tensor) is raised on every rank, with that rank's
    message, so no rank is left waiting in a collective.
    """
    how = resolve_factorization(factorization, engine.config.subspace, rank)
    world, me = world_and_rank(engine.group)
    sharded = any(hasattr(layer.base_layer.weight, "to_local") for layer in engine.layers)
    all_samples = None
    if samples is not None:
        all_samples = [samples]
        if sharded and world > 1:  # each rank sampled its own rows
            all_samples = [None] * world
            dist.all_gather_object(all_samples, samples, group=engine.group)
    owners = [i % world for i in range(len(engine.layers))]
    mine: dict[str, FactoredUpdate] = {}
    error: str | None = None

    def one(i: int, full) -> None:
        name, layer = engine.names[i], engine.layers[i]
        w_final, B0_all = full
        w_start = start_weight(name)
        if tuple(w_start.shape) != tuple(w_final.shape):
            raise ValueError(f"The starting weight of layer {name!r} has shape {tuple(w_start.shape)}, the trained "
                             f"one {tuple(w_final.shape)}: base_model is another model.")
        w_start = w_start.to(device=w_final.device, dtype=layer.base_layer.weight.dtype)
        if all_samples is not None:
            _check_start(name, w_start, [per_rank[i] for per_rank in all_samples])
        delta = w_final - w_start.to(torch.float32)
        del w_start
        bases = directions(layer.A0_all, B0_all) if how in FIXED_ONLY else None
        r = rank if rank is not None or bases is not None else 2 * world * layer.r
        result = factor_update(delta, bases=bases, rank=r, factorization=how, dtype=dtype)
        result.A, result.B = result.A.cpu(), result.B.cpu()
        mine[name] = result
        if progress is not None:
            progress(name, result)

    if sharded:
        from .sharded import _rounds

        for batch in _rounds(owners):
            got = None
            for i in batch:  # every rank joins every gather; the owner keeps its layer
                full = _full_layer(engine, i, owners[i], how in FIXED_ONLY)
                if full is not None:
                    got = (i, full)
            if got is not None and error is None:
                error = _guarded(one, *got, alone=world == 1, rank=me)
            del got
    else:
        for i in range(len(engine.layers)):
            if owners[i] == me and error is None:
                error = _guarded(one, i, _full_layer(engine, i, me, how in FIXED_ONLY), alone=world == 1, rank=me)
    if world > 1:
        errors: list = [None] * world
        dist.all_gather_object(errors, error, group=engine.group)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise RuntimeError(f"Adapter export failed on {error}")
    if world == 1:
        return mine
    gathered: list | None = [None] * world if me == 0 else None
    dist.gather_object(mine, gathered, group=engine.group, group_dst=0)
    if me != 0:
        return {}
    merged = {k: v for part in gathered for k, v in part.items()}
    return {name: merged[name] for name in engine.names}
