"""``bench/ceiling_real.py``: the part of an update outside the fixed set ``{U·X + Y·Vᵀ}``, the random-matrix
expectation beside it, and the share of full fine-tuning's loss gain kept after projecting onto the set, each against
a slow reference written here."""

from __future__ import annotations

import pytest
import torch

from bench import ceiling_real


def _outside_by_least_squares(delta: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The residual of the best fit ``U·X + Y·Vᵀ`` of ``delta``, by solving the least-squares problem in (X, Y) over
    every entry: slow and obvious."""
    m, n = delta.shape
    k = U.shape[1]
    cols = []
    for i in range(k):  # U·X: column basis U[:, i] e_jᵀ
        for j in range(n):
            e = torch.zeros(m, n, dtype=delta.dtype)
            e[:, j] = U[:, i]
            cols.append(e.reshape(-1))
    for i in range(m):  # Y·Vᵀ: e_i V[:, j]ᵀ
        for j in range(k):
            e = torch.zeros(m, n, dtype=delta.dtype)
            e[i, :] = V[:, j]
            cols.append(e.reshape(-1))
    basis = torch.stack(cols, 1)
    # the basis is rank-deficient (U·X and Y·Vᵀ share a k²-dimensional part): an SVD-based solver handles that
    coef = torch.linalg.lstsq(basis, delta.reshape(-1, 1), driver="gelsd").solution
    return delta - (basis @ coef).reshape(m, n)


def test_project_out_is_the_least_squares_residual():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    delta = torch.randn(7, 5, generator=g, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(w, full_matrices=False)
    for k in (1, 2, 3):
        got = ceiling_real.project_out(delta, U[:, :k], Vh.t()[:, :k])
        torch.testing.assert_close(got, _outside_by_least_squares(delta, U[:, :k], Vh.t()[:, :k]), atol=1e-10, rtol=0)
    # an update inside the set has nothing outside it
    inside = U[:, :2] @ torch.randn(2, 5, generator=g, dtype=torch.float64) + \
        torch.randn(7, 2, generator=g, dtype=torch.float64) @ Vh[:2]
    assert ceiling_real.project_out(inside, U[:, :2], Vh.t()[:, :2]).norm() < 1e-10


def test_random_baseline_matches_random_matrices():
    g = torch.Generator().manual_seed(1)
    m, n, k = 40, 24, 4
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    shares = []
    for _ in range(200):
        d = torch.randn(m, n, generator=g, dtype=torch.float64)
        shares.append(float(ceiling_real.project_out(d, U, V).norm() / d.norm()))
    assert sum(shares) / len(shares) == pytest.approx(ceiling_real.random_baseline(m, n, k), abs=0.005)
    assert ceiling_real.random_baseline(m, n, 0) == 1.0
    assert ceiling_real.random_baseline(m, n, n) == 0.0


def test_projected_gains_against_a_quadratic_loss():
    # Loss ||W - W*||² summed over layers, ΔW = W* - W0: full ΔW brings the loss to 0, the projected one leaves exactly
    # the part outside the set, so the kept share is 1 - Σ||outside||² / Σ||ΔW||².
    g = torch.Generator().manual_seed(2)
    w0 = {"a": torch.randn(6, 4, generator=g, dtype=torch.float64), "b": torch.randn(5, 8, generator=g, dtype=torch.float64)}
    target = {n: w + 0.3 * torch.randn(w.shape, generator=g, dtype=torch.float64) for n, w in w0.items()}
    deltas = {n: target[n] - w0[n] for n in w0}

    def loss_with(weights):
        return float(sum(((weights[n] - target[n]) ** 2).sum() for n in w0))

    bases = ceiling_real.singular_bases(w0)
    res = ceiling_real.projected_gains(w0, deltas, bases, [1, 3], loss_with)
    assert res["loss_full"] == pytest.approx(0.0, abs=1e-20)
    assert res["loss_base"] == pytest.approx(float(sum((d ** 2).sum() for d in deltas.values())))
    for k in (1, 3):
        outs = {}
        for n, w in w0.items():
            U, _, Vh = torch.linalg.svd(w, full_matrices=False)
            outs[n] = _outside_by_least_squares(deltas[n], U[:, :k], Vh.t()[:, :k])
        kept = 1 - sum(float((o ** 2).sum()) for o in outs.values()) / res["loss_base"]
        entry = res["sets"][str(k)]
        assert entry["recovered_share"] == pytest.approx(kept, rel=1e-9)
        shares = [float(outs[n].norm() / deltas[n].norm()) for n in w0]
        assert entry["outside_mean"] == pytest.approx(sum(shares) / 2, rel=1e-9)
        assert entry["outside_min"] == pytest.approx(min(shares), rel=1e-9)
        assert entry["random_baseline_mean"] == pytest.approx(
            (ceiling_real.random_baseline(6, 4, k) + ceiling_real.random_baseline(5, 8, k)) / 2)
    # a larger set keeps more of the gain
    assert res["sets"]["3"]["recovered_share"] > res["sets"]["1"]["recovered_share"]


def test_svd_cost_counts_the_work_of_exact_and_randomized_factorisations():
    assert ceiling_real.svd_cost([(4, 6)], None) == 4 * 6 * 4
    assert ceiling_real.svd_cost([(4, 6), (10, 2)], 3) == 4 * 6 * 6 + 10 * 2 * 6
