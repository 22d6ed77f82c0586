"""engine/export.py: the run's update ΔW factored as LoRA B·A, against slow, obvious float64 references."""

from __future__ import annotations

import pytest
import torch

from hdpissa_trl.engine.export import (
    _check_start,
    directions,
    exact_factors,
    factor_update,
    overall_relative_error,
    refined_factors,
    resolve_factorization,
    sample_positions,
    svd_factors,
)


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def _update(m=40, n=30, kr=4, second=0.05, seed=0):
    """ΔW = U·X + Y·Vᵀ + E with E outside both subspaces (the second-order part), and U, V."""
    g = torch.Generator().manual_seed(seed)
    U, V = _orthonormal(m, kr, g), _orthonormal(n, kr, g)
    X, Y = torch.randn(kr, n, generator=g, dtype=torch.float64), torch.randn(m, kr, generator=g, dtype=torch.float64)
    E = torch.randn(m, n, generator=g, dtype=torch.float64)
    Pu, Pv = torch.eye(m, dtype=torch.float64) - U @ U.T, torch.eye(n, dtype=torch.float64) - V @ V.T
    E = Pu @ E @ Pv
    first = U @ X + Y @ V.T
    E *= second * first.norm() / E.norm()
    return first + E, U, V, E


def test_exact_factors_are_the_projection_onto_the_fixed_set():
    delta, U, V, E = _update()
    # A0_all / B0_all as the engine keeps them: sqrt(S/s)-scaled rows / columns of the same subspaces.
    scale = torch.linspace(3.0, 0.5, U.shape[1], dtype=torch.float64)
    A0_all, B0_all = (scale[:, None] * V.T).float(), (U * scale[None, :]).float()
    A, B = exact_factors(delta.float(), *directions(A0_all, B0_all))
    assert A.shape == (8, 30) and B.shape == (40, 8)  # rank 2·K·r
    m, n = delta.shape
    Pu, Pv = U @ U.T, V @ V.T
    projection = Pu @ delta + (torch.eye(m, dtype=torch.float64) - Pu) @ delta @ Pv  # by hand
    torch.testing.assert_close((B.double() @ A.double()), projection, rtol=0, atol=1e-5)
    torch.testing.assert_close(delta - B.double() @ A.double(), E, rtol=0, atol=1e-5)
    # Each rank-one term is balanced: ‖b_j‖ = ‖a_j‖.
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-4, atol=1e-7)


def test_factor_update_reports_the_measured_error():
    delta, U, V, E = _update(second=0.03)
    up = factor_update(delta.float(), bases=(U.float(), V.float()), factorization="exact")
    assert up.factorization == "exact" and up.rank == 8
    assert up.relative_error == pytest.approx((E.norm() / delta.norm()).item(), rel=1e-4)
    exact = factor_update((delta - E).float(), bases=(U.float(), V.float()))  # no second-order part: exact
    assert exact.factorization == "refined" and exact.relative_error < 1e-5
    # In bf16 the error is measured on the factors as written.
    low = factor_update(delta.float(), bases=(U.float(), V.float()), factorization="exact", dtype=torch.bfloat16)
    assert low.A.dtype == low.B.dtype == torch.bfloat16
    ref = (delta - low.B.double() @ low.A.double()).norm() / delta.norm()
    assert low.relative_error == pytest.approx(ref.item(), rel=1e-4) and low.relative_error > up.relative_error


def _reference_error(delta, A, B) -> float:
    return ((delta - B.double() @ A.double()).norm() / delta.norm()).item()


def test_refined_factors_never_lose_to_the_exact_construction_and_approach_the_svd():
    # A spectrum the first-order set does not capture in order: the exact construction keeps all of U·X + Y·Vᵀ,
    # the best rank-8 approximation trades its weakest directions for the strongest of E.
    delta, U, V, E = _update(m=60, n=50, kr=4, second=0.6, seed=3)
    best = torch.linalg.svdvals(delta)
    optimum = (best[8:].norm() / best.norm()).item()
    exact = _reference_error(delta, *exact_factors(delta.float(), U.float(), V.float()))
    errors = [_reference_error(delta, *refined_factors(delta.float(), U.float(), V.float(), n_iter=i))
              for i in (0, 1, 3)]
    assert optimum - 1e-6 <= errors[2] <= errors[1] <= errors[0] <= exact + 1e-6
    assert errors[0] < exact and errors[2] < optimum + 0.25 * (exact - optimum)
    up = factor_update(delta.float(), bases=(U.float(), V.float()))  # the default: refined, measured error
    assert up.factorization == "refined" and up.relative_error == pytest.approx(errors[1], rel=1e-4)
    small = factor_update(delta.float(), bases=(U.float(), V.float()), rank=3)  # a smaller rank: truncated inside
    assert small.rank == 3 and small.relative_error > up.relative_error
    bigger = factor_update(delta.float(), bases=(U.float(), V.float()), rank=12)  # above 2·K·r: the SVD
    assert bigger.factorization == "svd" and bigger.rank == 12


def test_svd_factors_are_the_best_rank_k_approximation():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(30, 20, generator=g, dtype=torch.float64)
    S = torch.linalg.svdvals(delta)
    for k in (1, 5, 20):
        up = factor_update(delta.float(), rank=k)
        assert up.factorization == "svd" and up.rank == k
        assert up.relative_error == pytest.approx((S[k:].norm() / S.norm()).item(), rel=1e-4, abs=1e-6)
    A, B = svd_factors(delta.float(), 3)
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-5, atol=0)
    # A rank above min(m, n) is capped; bases whose 2·K·r covers a whole side take the (lossless) SVD.
    assert factor_update(delta.float(), rank=50).rank == 20
    U, V = torch.linalg.qr(torch.randn(30, 10, dtype=torch.float64)).Q.float(), torch.eye(20)[:, :10]
    capped = factor_update(delta.float(), bases=(U, V), rank=20)
    assert capped.factorization == "svd" and capped.relative_error < 1e-5


def test_overall_error_weighs_layers_by_their_update():
    a = factor_update(torch.eye(4) * 3, rank=2)  # error sqrt(2)·3 of norm 6
    b = factor_update(torch.ones(4, 4), rank=1)  # rank one: no error, norm 4
    assert overall_relative_error([a, b]) == pytest.approx((18 / (36 + 16)) ** 0.5, rel=1e-5)
    assert factor_update(torch.zeros(3, 3), rank=1).relative_error == 0.0  # a layer that did not move


def test_factorization_choice_and_refusals():
    assert resolve_factorization("auto", "fixed", None) == "refined"
    assert resolve_factorization("exact", "fixed", None) == "exact"
    for subspace in ("rotate", "refactor", "gradient", "moving"):
        assert resolve_factorization("auto", subspace, None) == "svd"
        for fixed_only in ("exact", "refined"):
            with pytest.raises(ValueError, match="needs the fixed directions.*factorization='svd'"):
                resolve_factorization(fixed_only, subspace, None)
    assert resolve_factorization("auto", "fixed", 4) == "refined"  # a chosen rank, truncated inside
    with pytest.raises(ValueError, match="rank 2·K·r per layer by construction"):
        resolve_factorization("exact", "fixed", 4)
    with pytest.raises(ValueError, match="positive integer"):
        resolve_factorization("svd", "fixed", 0)
    with pytest.raises(ValueError, match="one of"):
        resolve_factorization("qr", "fixed", None)


def test_samples_spread_over_rows_and_columns_and_refuse_another_start():
    idx = sample_positions(64, 32, count=100)
    assert 90 <= len(idx) <= 100 and len(set((idx // 32).tolist())) > 40 and len(set((idx % 32).tolist())) == 32
    w = torch.randn(64, 32)
    samples = [(idx, w.reshape(-1)[idx].clone())]
    _check_start("layer", w.clone(), samples)  # the same weights pass
    other = w.clone()
    other.view(-1)[idx[7]] += 1e-3
    with pytest.raises(ValueError, match=f"1 of {len(idx)} sampled entries differ.*checkpoint the run was started from"):
        _check_start("layer", other, samples)
