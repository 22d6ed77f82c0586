"""SVD init: slices orthogonal, B0A0 is the best rank-k approximation, randomized agrees with exact."""

import torch

from hdpissa_trl.engine.init import distributed_init_factors, top_singular_factors


def test_factors_reconstruct_top_k_and_slices_orthogonal():
    torch.manual_seed(0)
    W = torch.randn(40, 30)
    K, r = 4, 3
    A0, B0 = top_singular_factors(W, K * r)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    best = (U[:, :12] * S[:12]) @ Vh[:12]
    torch.testing.assert_close((B0 @ A0).double(), best, rtol=1e-4, atol=1e-4)
    for i in range(K):
        for j in range(K):
            if i != j:
                Ai, Aj = A0[i * r:(i + 1) * r], A0[j * r:(j + 1) * r]
                Bi, Bj = B0[:, i * r:(i + 1) * r], B0[:, j * r:(j + 1) * r]
                assert (Ai @ Aj.t()).abs().max() < 1e-4
                assert (Bi.t() @ Bj).abs().max() < 1e-4


def test_randomized_spans_same_subspace():
    torch.manual_seed(0)
    # A matrix with a clear spectral gap after 8 directions, as trained weights tend to have at the top.
    U, _ = torch.linalg.qr(torch.randn(64, 64))
    V, _ = torch.linalg.qr(torch.randn(48, 48))
    S = torch.cat([torch.linspace(10, 5, 8), torch.linspace(0.5, 0.01, 40)])
    W = (U[:, :48] * S) @ V.t()
    A_ex, _ = top_singular_factors(W, 8, "svd")
    A_rnd, _ = top_singular_factors(W, 8, "randomized", n_iter=4)
    Q1, _ = torch.linalg.qr(A_ex.t())
    Q2, _ = torch.linalg.qr(A_rnd.t())
    cosines = torch.linalg.svdvals(Q1.t() @ Q2)
    assert cosines.min() > 0.999


def test_single_process_distributed_init_is_local():
    ws = [torch.randn(8, 6), torch.randn(5, 7)]
    out = distributed_init_factors(ws, 2, "svd", 0, 0, shard=True)
    assert [tuple(a.shape) for a, _ in out] == [(2, 6), (2, 7)]
    assert [tuple(b.shape) for _, b in out] == [(8, 2), (5, 2)]
