"""``lora_alpha`` means what it means in PEFT's PiSSA: ``A0 = sqrt(S/s)·Vh``, ``B0 = U·sqrt(S/s)``, ``s = lora_alpha/r``.

Checked against a real PEFT model (``init_lora_weights="pissa"``): with K = 1 one HD-PiSSA step gives the same merged W
as one PEFT PiSSA step; the per-step change grows like sqrt(s); weight decay shrinks the top part by (1 − lr·wd)²;
checkpoints written under the old convention (``A0 = sqrt(S)·Vh``) are refused unless s = 1.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hdpissa_trl import HDPiSSAConfig, inject_hdpissa, top_singular_factors
from hdpissa_trl.testing_utils import build_tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(0))


def _peft_merged(model) -> dict[str, torch.Tensor]:
    """``W_res + s·B A`` of every adapted layer, computed here from PEFT's own tensors."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            s = mod.scaling["default"]
            w = mod.get_base_layer().weight.detach() + s * (mod.lora_B["default"].weight @ mod.lora_A["default"].weight)
            out[name.split("base_model.model.", 1)[-1]] = w.detach().clone()
    return out


def _hdpissa_step(r: int, alpha: float, lr: float, wd: float = 0.0, loss_scale: float = 1.0):
    """One HD-PiSSA step (K = 1) on the tiny model; returns ``(W_before, W_after)`` by layer name."""
    model = build_tiny_model("llama", seed=0, num_layers=1)
    engine = inject_hdpissa(model, HDPiSSAConfig(r=r, lora_alpha=alpha, target_modules=TARGETS), 0, 1,
                            show_progress=False)
    before = {n: lyr.weight.detach().clone() for n, lyr in zip(engine.names, engine.layers)}
    ids = _batch(model.config.vocab_size)
    (loss_scale * model(input_ids=ids, labels=ids).loss).backward()
    opt = torch.optim.AdamW(engine.adapter_parameters(), lr=lr, weight_decay=wd)
    opt.step()
    engine.fold()
    return before, {n: lyr.weight.detach().clone() for n, lyr in zip(engine.names, engine.layers)}


def test_initial_factors_carry_one_over_s():
    """``s·B0A0`` is exactly the top-k part of W, whatever s; the factors shrink by sqrt(s)."""
    torch.manual_seed(0)
    W = torch.randn(20, 16)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    top = (U[:, :6] * S[:6]) @ Vh[:6]
    for s in (1.0, 4.0, 0.25):
        A0, B0 = top_singular_factors(W, 6, scale=s)
        torch.testing.assert_close(s * (B0 @ A0).double(), top, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(A0.double().norm(dim=1), (S[:6] / s).sqrt(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_one_step_equals_peft_pissa(wd):
    """K = 1, r = 2, α = 8 (s = 4): one AdamW step of HD-PiSSA and of PEFT PiSSA give the same merged W."""
    r, alpha, lr = 2, 8.0, 1e-3
    peft_model = get_peft_model(build_tiny_model("llama", seed=0, num_layers=1),
                                LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0,
                                           init_lora_weights="pissa"))
    ids = _batch(peft_model.config.vocab_size)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=wd).step()
    want = _peft_merged(peft_model)

    before, got = _hdpissa_step(r, alpha, lr, wd)
    assert set(got) == set(want) and len(got) == 7
    for name in got:
        delta = want[name] - before[name]
        assert delta.abs().max() > 1e-4  # the step did something
        # Tight: float32 round-off of W's entries (|W| ~ 0.05), far below the step's own size.
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-6)
        assert (got[name] - want[name]).norm() < 1e-3 * delta.norm()


def test_step_grows_like_sqrt_s():
    """Same batch and lr, α = r (s = 1) vs α = 4r (s = 4): the first AdamW step moves W 2 = sqrt(4) times as far
    (the old convention moved it 4 times as far)."""
    lr = 1e-5  # small: the second-order dB·dA term (which grows like s) stays negligible
    b1, a1 = _hdpissa_step(2, 2.0, lr)
    b4, a4 = _hdpissa_step(2, 8.0, lr)
    for name in a1:
        n1, n4 = (a1[name] - b1[name]).norm(), (a4[name] - b4[name]).norm()
        assert n4 / n1 == pytest.approx(2.0, rel=0.02), name


def test_weight_decay_shrinks_top_part_independent_of_s():
    """With zero gradient AdamW only decays: W loses ``(1 − (1 − lr·wd)²)`` of its top-r part, whatever α."""
    lr, wd, r = 1e-2, 0.5, 2
    for alpha in (2.0, 8.0):
        before, after = _hdpissa_step(r, alpha, lr, wd, loss_scale=0.0)
        for name in before:
            U, S, Vh = torch.linalg.svd(before[name].double(), full_matrices=False)
            top = (U[:, :r] * S[:r]) @ Vh[:r]
            want = before[name].double() - (1 - (1 - lr * wd) ** 2) * top
            torch.testing.assert_close(after[name].double(), want, rtol=0, atol=1e-6)


def _state(alpha: float, r: int = 2) -> dict:
    model = build_tiny_model("llama", seed=0, num_layers=1)
    return inject_hdpissa(model, HDPiSSAConfig(r=r, lora_alpha=alpha), 0, 1, show_progress=False).state_dict()


def _engine(alpha: float, r: int = 2):
    return inject_hdpissa(build_tiny_model("llama", seed=0, num_layers=1), HDPiSSAConfig(r=r, lora_alpha=alpha), 0, 1,
                          show_progress=False)


def test_checkpoint_carries_convention_and_old_ones_are_refused():
    state = _state(8.0)
    assert state["metadata"]["factor_convention"] == "peft-pissa"
    _engine(8.0).load_state_dict(state)  # the current convention loads

    old = {"tensors": state["tensors"], "metadata": {k: v for k, v in state["metadata"].items()
                                                     if k != "factor_convention"}}
    with pytest.raises(ValueError, match=r"another lora_alpha convention.*lora_alpha / r = 4.*hdpissa_trl version "
                                         r"that wrote it.*model_name_or_path = the checkpoint directory"):
        _engine(8.0).load_state_dict(old)
    # With s = 1 the two conventions give identical factors: an old checkpoint loads unchanged.
    s1 = _state(2.0)
    s1_old = {"tensors": s1["tensors"], "metadata": {k: v for k, v in s1["metadata"].items()
                                                     if k != "factor_convention"}}
    eng = _engine(2.0)
    eng.load_state_dict(s1_old)
    torch.testing.assert_close(eng.layers[0].A0_all, s1["tensors"][f"{eng.names[0]}.A0_all"])
    # An unknown (future) convention is refused too, and so is another lora_alpha (the factors depend on it).
    with pytest.raises(ValueError, match="another lora_alpha convention"):
        _engine(8.0).load_state_dict({"tensors": state["tensors"],
                                      "metadata": dict(state["metadata"], factor_convention="v3")})
    with pytest.raises(ValueError, match="lora_alpha=8.0, now lora_alpha=4"):
        _engine(4.0).load_state_dict(state)
