"""The replaced module: a linear layer whose output is the base output, with HD-PiSSA adapter gradients.

At every step start the adapter sits at its initial value ``(A0, B0)`` and the full weight already contains
``s·B0A0`` (``W = W_res + s·B0A0``), so the adapter path adds nothing to the forward value and nothing to ``dL/dx``.
Only the backward differs from a frozen linear: it also yields the local adapter gradients

    grad_A = s · B^T δ^T x        (r × n)
    grad_B = s · δ^T (x A^T)      (m × r)

with ``δ = dL/dy`` summed over tokens. A custom autograd function computes exactly that: the forward costs the
base matmul plus one thin ``x A^T`` (saved for grad_B), never a dense ``B@A`` and never a ``1e-16`` trick.

With ``slice_gradient="global"`` the same backward computes every device's slice at once, from ``A0_all`` /
``B0_all`` (the adapters equal their initial slices until the optimizer step), and adds them to the layer's
``slice_grads`` buffers instead of returning this device's own: the engine's reduce-scatter turns the K devices'
buffers into each slice's gradient over the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# What HDPiSSALinear adds to the wrapped nn.Linear (ShardedHDPiSSALinear keeps B0 as B0_rows + B0_own instead).
ADAPTER_KEYS = ("lora_A", "lora_B", "A0_all", "B0_all", "B0_rows", "B0_own")


def plain_key(key: str) -> str | None:
    """The state-dict key a plain model has for ``key`` of a model with HD-PiSSA layers (``x.base_layer.weight`` ->
    ``x.weight``); None for the adapter's own tensors, which a plain model does not have."""
    if key.rsplit(".", 1)[-1] in ADAPTER_KEYS:
        return None
    return key.replace(".base_layer.", ".")


class _HDPiSSALinearFn(torch.autograd.Function):
    """``y = x W^T + b`` whose backward also returns the HD-PiSSA adapter gradients."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, lora_A, lora_B, scale, grad_capture=None, slice_grads=None):
        y = F.linear(x, weight, bias)  # under autocast this runs in the autocast dtype, like a plain Linear
        # x A^T in the adapter dtype (fp32), outside autocast: small (tokens × r), needed for grad_B. With
        # slice_grads = (gA_all, gB_all, A0_all, B0_all): every slice's x A0_k^T (tokens × K·r) and B0_all instead.
        if slice_grads is not None:
            lora_A, lora_B = slice_grads[2], slice_grads[3]
        with torch.autocast(device_type=x.device.type, enabled=False):
            xa = x_adapter.to(lora_A.dtype) @ lora_A.t()
        ctx.save_for_backward(x_adapter, xa, weight, lora_A, lora_B)
        ctx.scale = scale
        ctx.x_dtype = x.dtype
        ctx.grad_capture = grad_capture
        ctx.slice_grads = slice_grads
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_adapter, xa, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scale
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            # Base path only: the adapter contributes nothing to dL/dx.
            grad_x = (grad_y @ weight.to(grad_y.dtype)).to(ctx.x_dtype)
        d = grad_y.reshape(-1, grad_y.shape[-1]).to(lora_A.dtype)  # (T, m)
        capture, every = ctx.grad_capture, ctx.slice_grads
        if ctx.needs_input_grad[4] or capture is not None or every is not None:
            xin = x_adapter.reshape(-1, x_adapter.shape[-1]).to(lora_A.dtype)  # (T, n)
        if every is not None:  # slice_gradient="global": all K slices (lora_A/B are A0_all/B0_all here), accumulated
            every[0].addmm_((d @ lora_B).t(), xin, alpha=s)
            every[1].addmm_(d.t(), xa.reshape(-1, xa.shape[-1]), alpha=s)
        else:
            if ctx.needs_input_grad[4]:
                grad_A = (d @ lora_B).t() @ xin
                grad_A.mul_(s)
            if ctx.needs_input_grad[5]:
                grad_B = d.t() @ xa.reshape(-1, xa.shape[-1])
                grad_B.mul_(s)
        if capture is not None:  # subspace="gradient": dL/dW of this step, accumulated (m × n, fp32)
            capture.addmm_(d.t(), xin)
        return grad_x, None, None, None, grad_A, grad_B, None, None, None


class HDPiSSALinear(nn.Module):
    """An ``nn.Linear`` with a per-device HD-PiSSA adapter slice.

    Holds the original linear as ``base_layer`` (its weight is the full ``W``, frozen), the trainable fp32 factors
    ``lora_A`` (r × n) and ``lora_B`` (m × r) of THIS device, and buffers ``A0_all`` (K·r × n) / ``B0_all``
    (m × K·r) with the initial factors of ALL devices (every device needs them for the fold).
    """

    def __init__(self, base_layer: nn.Linear, r: int, rank: int, world_size: int, scale: float,
                 lora_dropout: float = 0.0, name: str = ""):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"HDPiSSALinear wraps nn.Linear, got {type(base_layer).__name__} for {name!r}.")
        self.base_layer = base_layer
        self.r = r
        self.rank = rank
        self.world_size = world_size
        self.scale = scale
        self.name = name
        m, n = base_layer.out_features, base_layer.in_features
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.zeros(r, n, dtype=torch.float32, device=base_layer.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(m, r, dtype=torch.float32, device=base_layer.weight.device))
        self.register_buffer("A0_all", torch.zeros(world_size * r, n, dtype=torch.float32,
                                                   device=base_layer.weight.device))
        self.register_buffer("B0_all", torch.zeros(m, world_size * r, dtype=torch.float32,
                                                   device=base_layer.weight.device))
        # subspace="gradient" sets an (m × n) fp32 buffer here for the steps whose full gradient of W it needs.
        self.grad_capture: torch.Tensor | None = None
        # slice_gradient="global": (K·r × n, m × K·r) fp32 buffers the backward adds every slice's gradient to.
        self.slice_grads: tuple[torch.Tensor, torch.Tensor] | None = None
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)

    # -- shapes -----------------------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The full weight ``W`` (what a merged model holds)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def own_slice(self) -> slice:
        """Rows of ``A0_all`` / columns of ``B0_all`` owned by this device: ``[k·r, (k+1)·r)``."""
        return slice(self.rank * self.r, (self.rank + 1) * self.r)

    @property
    def A0(self) -> torch.Tensor:
        return self.A0_all[self.own_slice()]

    @property
    def B0(self) -> torch.Tensor:
        return self.B0_all[:, self.own_slice()]

    @torch.no_grad()
    def set_initial_factors(self, A0_all: torch.Tensor, B0_all: torch.Tensor) -> None:
        """Install all devices' initial factors and put this device's adapter at its slice."""
        self.A0_all.copy_(A0_all)
        self.B0_all.copy_(B0_all)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """``A ← A0``, ``B ← B0`` (in place, so optimizer state keeps pointing at the same tensors)."""
        self.lora_A.copy_(self.A0)
        self.lora_B.copy_(self.B0)

    # -- compute ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        train_adapter = torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad)
        dropout = self.training and isinstance(self.lora_dropout, nn.Dropout)
        x_drop = self.lora_dropout(x) if dropout else x
        if train_adapter:
            every = None if self.slice_grads is None else (*self.slice_grads, self.A0_all, self.B0_all)
            y = _HDPiSSALinearFn.apply(x, x_drop.detach(), self.base_layer.weight, self.base_layer.bias,
                                       self.lora_A, self.lora_B, self.scale, self.grad_capture, every)
        else:
            y = self.base_layer(x)  # inference / frozen: exactly the base layer
        if dropout:
            # LoRA dropout, as PEFT's LoRA/PiSSA: W = W_res + s·B0A0 and the adapter's part sees the dropped input,
            # y = W_res x + s·B0A0·drop(x) = W x + s·B0A0·(drop(x) − x); the adapter gradients above use drop(x).
            with torch.autocast(device_type=x.device.type, enabled=False):
                dx = (x_drop - x).to(self.A0_all.dtype)
                y = y + ((dx @ self.A0.t()) @ self.B0.t() * self.scale).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, device_slice={self.rank}/"
                f"{self.world_size}, scale={self.scale:g}")
