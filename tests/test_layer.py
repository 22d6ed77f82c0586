"""HDPiSSALinear: base output unchanged, adapter gradients equal the formulas, nothing flows into x."""

import pytest
import torch
from torch import nn

from hdpissa_trl.engine.layer import HDPiSSALinear


def make_layer(m=12, n=10, r=2, K=3, rank=1, scale=1.5, bias=True, dropout=0.0):
    torch.manual_seed(0)
    base = nn.Linear(n, m, bias=bias)
    layer = HDPiSSALinear(base, r=r, rank=rank, world_size=K, scale=scale, lora_dropout=dropout, name="x")
    layer.set_initial_factors(torch.randn(K * r, n), torch.randn(m, K * r))
    return layer


def test_forward_equals_base_and_grad_x_untouched():
    layer = make_layer()
    x = torch.randn(4, 5, 10, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = layer.base_layer(x_ref)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)


def test_adapter_grads_equal_formulas():
    layer = make_layer(scale=2.5)
    x = torch.randn(3, 7, 10)
    g = torch.randn(3, 7, 12)
    layer(x).backward(g)
    X, D = x.reshape(-1, 10).double(), g.reshape(-1, 12).double()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    # grad_A = s · B^T δ^T x,  grad_B = s · δ^T (x A^T), written out per token as the slow reference.
    gA = sum(2.5 * B.t() @ D[t:t + 1].t() @ X[t:t + 1] for t in range(X.shape[0]))
    gB = sum(2.5 * D[t:t + 1].t() @ (X[t:t + 1] @ A.t()) for t in range(X.shape[0]))
    torch.testing.assert_close(layer.lora_A.grad.double(), gA, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.grad.double(), gB, rtol=1e-5, atol=1e-6)


def test_grads_match_full_weight_gradient_chain_rule():
    """grad_A = s·B^T G and grad_B = s·G A^T where G = dL/dW of the plain layer."""
    layer = make_layer(scale=0.5, bias=False)
    x = torch.randn(6, 10)
    W = layer.base_layer.weight.detach().clone().requires_grad_(True)
    loss_ref = (torch.nn.functional.linear(x, W) ** 2).sum()
    loss_ref.backward()
    (layer(x) ** 2).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, 0.5 * layer.lora_B.detach().t() @ W.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, 0.5 * W.grad @ layer.lora_A.detach().t(), rtol=1e-5, atol=1e-5)


def test_own_slice_and_reset():
    layer = make_layer(K=3, rank=2, r=2)
    assert torch.equal(layer.lora_A.detach(), layer.A0_all[4:6])
    assert torch.equal(layer.lora_B.detach(), layer.B0_all[:, 4:6])
    with torch.no_grad():
        layer.lora_A.add_(1.0)
    layer.reset_adapter()
    assert torch.equal(layer.lora_A.detach(), layer.A0_all[4:6])


def test_lora_dropout_follows_the_lora_formula():
    """lora_dropout means what it means in PEFT's LoRA/PiSSA: y = W_res x + b + s·B·A·drop(x) with W_res = W − s·B0A0
    (this device's slice). Forward value, dL/dx and both adapter gradients follow from that formula with the same
    mask; in eval mode the layer is the base layer."""
    s, p = 1.5, 0.4
    layer = make_layer(scale=s, dropout=p)
    layer.train()
    x = torch.randn(3, 5, 10, requires_grad=True)
    g = torch.randn(3, 5, 12)
    torch.manual_seed(7)
    y = layer(x)
    y.backward(g)
    torch.manual_seed(7)
    mask = nn.functional.dropout(torch.ones_like(x), p)  # the same draw: the mask dropout applied to x
    assert (mask == 0).any() and (mask != 0).any()
    W, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    A = layer.A0.double().clone().requires_grad_(True)
    B = layer.B0.double().clone().requires_grad_(True)
    xr = x.detach().double().clone().requires_grad_(True)
    y_ref = xr @ (W - s * B.detach() @ A.detach()).t() + b + s * ((xr * mask.double()) @ A.t()) @ B.t()
    y_ref.backward(g.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, layer.base_layer(x))  # dropout changes the value (the old behaviour ignored it)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad.double(), A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad.double(), B.grad, rtol=1e-5, atol=1e-5)
    layer.eval()
    assert torch.equal(layer(x), layer.base_layer(x))
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))


def test_rejects_non_linear():
    with pytest.raises(TypeError, match="wraps nn.Linear"):
        HDPiSSALinear(nn.Conv1d(2, 2, 1), r=1, rank=0, world_size=1, scale=1.0)


def test_bf16_autocast_backward_matches_fp32():
    """Mixed precision (SFTConfig's default bf16=True): the base matmul runs in bf16, adapter grads stay fp32."""
    layer = make_layer(scale=1.0, bias=False)
    x = torch.randn(4, 10)
    g = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().backward(g)
    gA, gB = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    assert gA.dtype == torch.float32 and gB.dtype == torch.float32
    layer.lora_A.grad = layer.lora_B.grad = None
    layer(x).backward(g)
    torch.testing.assert_close(gA, layer.lora_A.grad, rtol=0.05, atol=0.05)
    torch.testing.assert_close(gB, layer.lora_B.grad, rtol=0.05, atol=0.05)


def test_bf16_autocast_through_a_model():
    from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
    from hdpissa_trl.testing_utils import build_tiny_model

    m = build_tiny_model("llama", num_layers=1)
    engine = inject_hdpissa(m, HDPiSSAConfig(r=2), 0, 1, show_progress=False)
    ids = torch.randint(0, 500, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in engine.adapter_parameters())
