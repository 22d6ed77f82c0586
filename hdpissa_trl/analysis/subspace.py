"""How much of a weight update lies outside HD-PiSSA's fixed subspace ``{X·A0 + B0·Y}``.

With the paper's scheme the adapters restart from ``(A0_k, B0_k)`` after every fold, so every step adds
``s·Σ_k(dB_k A_k + B0_k dA_k)``: columns in the span of ``B0`` (the top-``K·r`` left singular vectors ``U`` of the
initial W) plus rows in the span of ``A0`` (the top right singular vectors ``V``). The cumulative update of a whole run
therefore stays in the set ``{P_U·M1 + M2·P_V}``, whatever it learns; the part of any ΔW that this set cannot hold is

    (I − P_U) · ΔW · (I − P_V),        residual fraction = ‖(I − P_U) ΔW (I − P_V)‖_F / ‖ΔW‖_F

(0: the update fits the fixed set; 1: it is orthogonal to it). Applied to full fine-tuning's or PiSSA's ΔW, it says how
much of what those methods learn an HD-PiSSA run with ``K·r`` directions can never reach (to first order; the small
second-order ``dB·dA`` part of each fold is the only thing that leaves the set).
"""

from __future__ import annotations

import torch


def principal_bases(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases ``(U_k, V_k)`` (``m × k``, ``n × k``, fp64) of the top-``k`` left/right singular subspaces.

    These span the columns of ``B0_all`` and the rows of ``A0_all`` of an HD-PiSSA init with ``K·r = k``.
    """
    if not 0 < k <= min(weight.shape):
        raise ValueError(f"k must be in [1, min(m, n) = {min(weight.shape)}], got {k}.")
    U, _, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return U[:, :k].contiguous(), Vh[:k].t().contiguous()


def outside_residual(delta: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``(I − U Uᵀ) · delta · (I − V Vᵀ)`` for orthonormal ``U`` (``m × k``) and ``V`` (``n × k``), without forming
    an ``m × m`` or ``n × n`` projector (fp64)."""
    d = delta.detach().to(torch.float64)
    d = d - U @ (U.t() @ d)
    return d - (d @ V) @ V.t()


def outside_fraction(delta: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """``‖(I − P_U) ΔW (I − P_V)‖_F / ‖ΔW‖_F``: the share of ``delta`` outside ``{P_U·M1 + M2·P_V}`` (0 for a zero
    update)."""
    norm = float(delta.detach().to(torch.float64).norm())
    return float(outside_residual(delta, U, V).norm()) / norm if norm > 0 else 0.0


def outside_fractions(w_init: dict[str, torch.Tensor], w_now: dict[str, torch.Tensor], k: int,
                      bases: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, float]:
    """Per layer, the residual fraction of ``w_now − w_init`` outside the top-``k`` subspaces of ``w_init``.

    ``bases`` (name → ``principal_bases(w_init[name], k)``) can be computed once and passed in when the same run is
    measured at many steps.
    """
    out = {}
    for name, w0 in w_init.items():
        U, V = bases[name] if bases is not None else principal_bases(w0, k)
        out[name] = outside_fraction(w_now[name].to(torch.float64) - w0.to(torch.float64), U, V)
    return out
