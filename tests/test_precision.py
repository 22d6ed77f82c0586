"""Precision modes: plain bf16 loses small updates; Kahan and stochastic rounding track fp32."""

import pytest
import torch

from hdpissa_trl.engine.precision import WeightUpdater, stochastic_round_to_bf16


def run_mode(mode: str, steps: int = 200):
    torch.manual_seed(0)
    w0 = (torch.rand(256, 64) + 0.5).to(torch.bfloat16).float()  # |w| in [0.5, 1.5]: one bf16 ulp is 2^-8..2^-7
    delta = 1e-4 * (torch.rand_like(w0) + 0.5)  # far below half an ulp: plain bf16 rounds every update away
    w32 = w0.clone()
    w16 = w0.to(torch.bfloat16)
    upd = WeightUpdater(w16, mode, seed=3, layer_index=0)
    for step in range(steps):
        w32 += delta
        upd.apply(w16, delta, step)
    return w0, w32, upd.full_precision_weight(w16).float()


def test_plain_bf16_loses_small_updates():
    w0, w32, w = run_mode("model")
    assert torch.equal(w, w0.to(torch.bfloat16).float())  # nothing moved at all
    assert (w32 - w0).mean() == pytest.approx(0.02, rel=0.01)


def half_ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(x.abs())) - 8)


def test_fp32_master_equals_fp32():
    w0, w32, w = run_mode("fp32")
    torch.testing.assert_close(w, w32, rtol=0, atol=1e-6)


def test_kahan_stays_within_one_ulp_of_fp32():
    w0, w32, w = run_mode("bf16_kahan")
    # Within one bf16 ulp everywhere (the bf16 compensation buffer itself rounds), unbiased on average.
    assert ((w - w32).abs() <= 2 * half_ulp_bf16(w32)).all()
    assert (w - w0).mean().item() == pytest.approx((w32 - w0).mean().item(), rel=0.02)


def test_stochastic_rounding_tracks_fp32_on_average():
    w0, w32, w = run_mode("bf16_sr")
    assert (w - w0).mean().item() == pytest.approx((w32 - w0).mean().item(), rel=0.02)
    # Unbiased but a random walk: far closer than plain bf16 (which is off by the whole update, 0.02).
    assert (w - w32).abs().mean().item() < 0.5 * (w32 - w0).mean().item()


def test_stochastic_rounding_unbiased_and_deterministic():
    x = torch.full((200_000,), 1.0 + 2**-10)  # 1/8 of the way from 1.0 to the next bf16 (1 + 2^-7)
    a = stochastic_round_to_bf16(x, key=7)
    assert torch.equal(a, stochastic_round_to_bf16(x, key=7))
    assert not torch.equal(a, stochastic_round_to_bf16(x, key=8))
    assert set(a.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert a.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)


def test_rounding_noise_is_uniform_and_uncorrelated():
    """The 16 random bits per element (a hash of position and key): uniform over their range, no correlation between
    neighbours or between two keys: what makes stochastic rounding unbiased element by element."""
    from hdpissa_trl.engine.precision import rounding_key, rounding_noise

    index = torch.arange(1 << 20, dtype=torch.int64)
    a = rounding_noise(index, *divmod(rounding_key(0, 1, 0), 2**32)[::-1]).double()
    b = rounding_noise(index, *divmod(rounding_key(0, 2, 0), 2**32)[::-1]).double()
    assert a.min() >= 0 and a.max() <= 65535
    counts = torch.bincount((a // 4096).long(), minlength=16).double()  # 16 bins of 2^12 values
    expected = index.numel() / 16
    assert ((counts - expected) ** 2 / expected).sum() < 50  # chi-square, 15 degrees of freedom (p ~ 1e-5)
    for x, y in ((a[:-1], a[1:]), (a, b)):
        assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < 0.01


def test_stochastic_rounding_bits_do_not_depend_on_the_chunking(monkeypatch):
    """The eager update works in passes of UPDATE_CHUNK elements; the random bits belong to each element's position,
    so any pass size gives the same W (and the fused CUDA kernel, one pass, the same bits again)."""
    from hdpissa_trl.engine import precision

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(300, 70, generator=g).to(torch.bfloat16)
    delta = 1e-3 * torch.randn(300, 70, generator=g)
    results = []
    for chunk in (precision.UPDATE_CHUNK, 1000, 7):
        monkeypatch.setattr(precision, "UPDATE_CHUNK", chunk)
        w = w0.clone()
        precision.stochastic_round_update(w, delta, key=12345, fused=False)
        results.append(w)
    assert not torch.equal(results[0], w0)
    assert all(torch.equal(r, results[0]) for r in results)
    # One call over the whole tensor is stochastic_round_to_bf16 of the fp32 sum with the same key.
    assert torch.equal(results[0], stochastic_round_to_bf16(w0.float() + delta, key=12345))


def test_kahan_update_is_the_kahan_formula_in_any_chunking(monkeypatch):
    from hdpissa_trl.engine import precision

    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(257, 33, generator=g).to(torch.bfloat16)
    c0 = (1e-3 * torch.randn(257, 33, generator=g)).to(torch.bfloat16)
    delta = 1e-3 * torch.randn(257, 33, generator=g)
    # The formula written out: y = delta - c; t = w + y (rounded to bf16); c = (t - w) - y; w = t.
    y = delta - c0.float()
    t = (w0.float() + y).to(torch.bfloat16)
    c_ref = ((t.float() - w0.float()) - y).to(torch.bfloat16)
    for chunk in (precision.UPDATE_CHUNK, 100):
        monkeypatch.setattr(precision, "UPDATE_CHUNK", chunk)
        w, c = w0.clone(), c0.clone()
        precision.kahan_update(w, c, delta, fused=False)
        assert torch.equal(w, t) and torch.equal(c, c_ref)


def test_state_roundtrip_checks_mode():
    w = torch.ones(3, 3, dtype=torch.bfloat16)
    u = WeightUpdater(w, "bf16_kahan")
    st = {k: v.clone() for k, v in u.state().items()}
    WeightUpdater(w, "bf16_kahan").load_state(st)
    with pytest.raises(ValueError, match="Precision state mismatch"):
        WeightUpdater(w, "model").load_state(st)


def test_constructor_refuses_a_dtype_the_mode_cannot_update():
    with pytest.raises(ValueError, match=r"precision='bf16_sr' cannot update a torch.float16 weight"):
        WeightUpdater(torch.ones(2, 2, dtype=torch.float16), "bf16_sr")
    with pytest.raises(ValueError, match=r"precision='bf16_kahan' cannot update a torch.float64 weight"):
        WeightUpdater(torch.ones(2, 2, dtype=torch.float64), "bf16_kahan")
    with pytest.raises(ValueError, match=r"precision='fp64'"):
        WeightUpdater(torch.ones(2, 2), "fp64")


@pytest.mark.parametrize("mode,dtype", [("fp32", torch.float32), ("fp32", torch.bfloat16), ("bf16_kahan", torch.bfloat16),
                                        ("bf16_sr", torch.bfloat16), ("model", torch.float64)])
def test_addmm_adds_the_scaled_product(mode, dtype):
    """``addmm`` is ``apply`` of ``alpha·left@right`` (in place with ``addmm_`` for an fp32 weight without master)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(32, 24, generator=g).to(dtype)
    left, right = torch.randn(32, 4, generator=g), torch.randn(4, 24, generator=g)
    a, b = w0.clone(), w0.clone()
    ua, ub = WeightUpdater(a, mode, seed=1), WeightUpdater(b, mode, seed=1)
    ua.addmm(a, left, right, 0.5, step=3)
    ub.apply(b, 0.5 * (left @ right), step=3)
    torch.testing.assert_close(ua.full_precision_weight(a).double(), ub.full_precision_weight(b).double(),
                               rtol=0, atol=1e-5 if dtype == torch.float32 else 0)
    assert not torch.equal(a, w0)


@pytest.mark.slow
def test_fused_passes_compute_the_eager_bits():
    """The passes CUDA runs as compiled kernels, compiled here exactly as the engine compiles them (Inductor's CPU
    backend; on a GPU Triton's, see the gpu-marked test in test_fold.py), give the eager path's bits: Kahan (both W and
    the compensation: Inductor skips low-precision casts unless told not to), stochastic rounding, the checksum."""
    from hdpissa_trl.engine import precision
    from hdpissa_trl.engine.consistency import _checksum_flat, tensor_checksum

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(3000 * 70, generator=g).to(torch.bfloat16)
    c0 = (1e-3 * torch.randn(3000 * 70, generator=g)).to(torch.bfloat16)
    delta = 1e-3 * torch.randn(3000 * 70, generator=g)
    w, c, we, ce = w0.clone(), c0.clone(), w0.clone(), c0.clone()
    precision.compile_elementwise(precision._kahan_flat)(w, c, delta)
    precision.kahan_update(we, ce, delta, fused=False)
    assert torch.equal(w, we) and torch.equal(c, ce) and not torch.equal(c, c0)

    sr = precision.compile_elementwise(precision._stochastic_round_flat)
    for n, key in ((3000 * 70, precision.rounding_key(3, 5, 7)), (5000, (2 << 32) | 1)):  # a second shape and key
        w, we = w0[:n].clone(), w0[:n].clone()
        sr(w, delta[:n], key & 0xFFFFFFFF, key >> 32, 0)
        precision.stochastic_round_update(we, delta[:n], key, fused=False)
        assert torch.equal(w, we) and not torch.equal(w, w0[:n])

    checksum = precision.compile_elementwise(_checksum_flat)
    x = torch.randn(2_000_003, generator=g)
    assert checksum(x.view(torch.int32)).item() == tensor_checksum(x).item()
    assert checksum(w0.view(torch.int16)).item() == tensor_checksum(w0).item()
