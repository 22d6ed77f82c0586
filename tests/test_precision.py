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
    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1.0 to the next bf16 (1 + 2^-7)... 1/8
    g1 = torch.Generator().manual_seed(0)
    g2 = torch.Generator().manual_seed(0)
    a = stochastic_round_to_bf16(x, g1)
    b = stochastic_round_to_bf16(x, g2)
    assert torch.equal(a, b)
    assert set(a.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert a.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)


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
