"""``hdpissa_trl.analysis.subspace``: the share of an update outside ``{X·A0 + B0·Y}``, against a slow reference.

The reference fits ``X·A0 + B0·Y`` to ΔW by least squares over the vectorised unknowns (X, Y) — nothing about
projectors assumed — and takes the norm of what is left.
"""

import pytest
import torch

from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
from hdpissa_trl.analysis.subspace import outside_fraction, outside_fractions, principal_bases
from hdpissa_trl.testing_utils import build_tiny_model


def lstsq_residual_fraction(delta: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor) -> float:
    """min over X (m×k), Y (k×n) of ‖ΔW − X·A0 − B0·Y‖ / ‖ΔW‖, by building the linear map column by column."""
    m, n = delta.shape
    k = A0.shape[0]
    cols = []
    for i in range(m * k):  # unknown X[i // k, i % k]
        X = torch.zeros(m, k, dtype=torch.float64)
        X.view(-1)[i] = 1
        cols.append((X @ A0).reshape(-1))
    for i in range(k * n):  # unknown Y[i // n, i % n]
        Y = torch.zeros(k, n, dtype=torch.float64)
        Y.view(-1)[i] = 1
        cols.append((B0 @ Y).reshape(-1))
    M = torch.stack(cols, dim=1)
    target = delta.reshape(-1)
    sol = torch.linalg.lstsq(M, target.unsqueeze(1), driver="gelsd").solution
    return float((target - (M @ sol).squeeze(1)).norm() / target.norm())


@pytest.mark.parametrize("m,n,k", [(9, 7, 2), (6, 11, 3)])
def test_outside_fraction_matches_least_squares(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    Us, _, Vh = torch.linalg.svd(W)
    # Any factors spanning the same subspaces describe the same set: mix them with random invertible k×k matrices.
    A0 = torch.randn(k, k, generator=g, dtype=torch.float64) @ Vh[:k]
    B0 = Us[:, :k] @ torch.randn(k, k, generator=g, dtype=torch.float64)
    U, V = principal_bases(W, k)
    generic = torch.randn(m, n, generator=g, dtype=torch.float64)
    inside = B0 @ torch.randn(k, n, generator=g, dtype=torch.float64) + torch.randn(m, k, generator=g,
                                                                                  dtype=torch.float64) @ A0
    for delta in (generic, inside, generic + 0.1 * inside):
        want = lstsq_residual_fraction(delta, A0, B0)
        assert outside_fraction(delta, U, V) == pytest.approx(want, abs=1e-9)
    assert 0.3 < outside_fraction(generic, U, V) < 1.0
    assert outside_fraction(inside, U, V) < 1e-12
    outside = torch.randn(m, n, generator=g, dtype=torch.float64)
    outside = outside - U @ (U.t() @ outside)
    outside = outside - (outside @ V) @ V.t()
    assert outside_fraction(outside, U, V) == pytest.approx(1.0, abs=1e-12)


def test_fixed_scheme_stays_inside_to_first_order():
    """Many small HD-PiSSA steps (K = 1, fixed subspace) leave almost nothing outside the top-r set, while a
    comparable random update is mostly outside: the measure sees the ceiling it is meant to measure."""
    torch.manual_seed(0)
    model = build_tiny_model("llama", seed=0, num_layers=1)
    engine = inject_hdpissa(model, HDPiSSAConfig(r=2, lora_alpha=2), 0, 1, show_progress=False)
    w0 = {n: lyr.weight.detach().clone() for n, lyr in zip(engine.names, engine.layers)}
    opt = torch.optim.AdamW(engine.adapter_parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(5):
        ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        engine.fold()
    w1 = {n: lyr.weight.detach().clone() for n, lyr in zip(engine.names, engine.layers)}
    fr = outside_fractions(w0, w1, k=2)
    assert set(fr) == set(w0) and max(fr.values()) < 0.01  # only the second-order dB·dA part leaves the set
    rnd = {n: w + 1e-3 * torch.randn_like(w) for n, w in w0.items()}
    assert min(outside_fractions(w0, rnd, k=2).values()) > 0.8
