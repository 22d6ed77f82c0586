"""FOR COMPARISON ONLY — an "official-style" HD-PiSSA step, re-implemented from the paper's description.

This is NOT the project's engine and NOT the authors' code. It reproduces, from the description of the reference
implementation (arXiv 2505.18777 and the design notes), the structural choices the benchmarks compare against:

* the adapter enters the forward as a dense term: ``y = x (W + 1e-16 · s · B A)^T`` — a dense ``B @ A`` (m × n) per
  layer per forward, and autograd materialises the dense ``dL/dW_eff`` (m × n) in the backward;
* the adapter gradients, scaled by ``1e-16`` through that term, are multiplied back by ``1e16`` before the step;
* the base weights are kept in fp32;
* after the optimizer step, FOUR ``all_gather`` calls per layer exchange ``dA, dB, A, B`` of every device, and each
  device folds ``W += s · Σ_k (B_k A_k − B0_k A0_k)`` one device at a time with dense products.

The arithmetic of one step is the same as HD-PiSSA's (same gradients up to rounding, same update), so only speed,
memory and communication differ. The optimizer is whatever the caller passes (the benchmarks use the same
``torch.optim.AdamW`` for every method) so that the comparison isolates the structure above.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hdpissa_trl.engine.distributed import world_and_rank

TINY = 1e-16


class OfficialStyleLinear(nn.Module):
    """``y = x (W + 1e-16·s·B A)^T + b`` with an fp32 ``W`` and this device's fp32 adapter slice ``(A, B)``."""

    def __init__(self, base: nn.Linear, A0_all: torch.Tensor, B0_all: torch.Tensor, r: int, rank: int,
                 world_size: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(base.weight.detach().to(torch.float32), requires_grad=False)  # fp32 base
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().float(), requires_grad=False)
        self.r, self.rank, self.world_size, self.scale = r, rank, world_size, scale
        sl = slice(rank * r, (rank + 1) * r)
        self.register_buffer("A0_all", A0_all.clone())
        self.register_buffer("B0_all", B0_all.clone())
        self.lora_A = nn.Parameter(A0_all[sl].clone())
        self.lora_B = nn.Parameter(B0_all[:, sl].clone())
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + (self.lora_B @ self.lora_A) * (TINY * self.scale)  # dense m × n every forward
        return F.linear(x.to(w.dtype), w, self.bias).to(x.dtype)


class OfficialStyleState:
    """The injected layers and the official-style fold (four all_gathers per layer)."""

    def __init__(self, names: list[str], layers: list[OfficialStyleLinear]):
        self.names = names
        self.layers = layers
        self.step = 0

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in (layer.lora_A, layer.lora_B)]

    @torch.no_grad()
    def rescale_gradients(self) -> None:
        """Undo the ``1e-16`` of the forward term: multiply every adapter gradient by ``1e16``."""
        for p in self.adapter_parameters():
            if p.grad is not None:
                p.grad.mul_(1.0 / TINY)

    @torch.no_grad()
    def fold(self) -> dict:
        """Per layer: all_gather dA, dB, A, B (4 collectives), then ``W += s·Σ_k (B_k A_k − B0_k A0_k)``."""
        t0 = time.perf_counter()
        world, _ = world_and_rank()
        distributed = world > 1
        gather_s, ncoll, sent = 0.0, 0, 0
        for layer in self.layers:
            sl = slice(layer.rank * layer.r, (layer.rank + 1) * layer.r)
            A, B = layer.lora_A.data, layer.lora_B.data
            dA = A - layer.A0_all[sl]
            dB = B - layer.B0_all[:, sl]
            local = [dA, dB, A, B]
            if distributed:
                gathered = []
                tg = time.perf_counter()
                for t in local:
                    out = [torch.empty_like(t) for _ in range(world)]
                    dist.all_gather(out, t.contiguous())
                    gathered.append(out)
                    ncoll += 1
                    sent += t.numel() * t.element_size()
                gather_s += time.perf_counter() - tg
            else:
                gathered = [[t] for t in local]
            dAs, dBs, As, Bs = gathered
            for k in range(world):
                # B_k A_k − B0_k A0_k with B0_k = B_k − dB_k, A0_k = A_k − dA_k: two dense m × n products.
                new = Bs[k] @ As[k]
                old = (Bs[k] - dBs[k]) @ (As[k] - dAs[k])
                layer.weight.add_((new - old) * layer.scale)
            layer.lora_A.copy_(layer.A0_all[sl])
            layer.lora_B.copy_(layer.B0_all[:, sl])
        self.step += 1
        return {"seconds": time.perf_counter() - t0, "gather_seconds": gather_s, "bytes_sent": sent,
                "num_collectives": ncoll}


def inject_official_style(model: nn.Module, r: int, lora_alpha: float, rank: int = 0, world_size: int = 1,
                          target_modules="all-linear", init_method: str = "svd") -> OfficialStyleState:
    """Replace the targeted linears of ``model`` (in place) by :class:`OfficialStyleLinear`; returns the state.

    Initial factors come from the same SVD as the engine (factored on one rank and broadcast), so both start equal.
    """
    from hdpissa_trl import HDPiSSAConfig
    from hdpissa_trl.engine.init import distributed_init_factors
    from hdpissa_trl.engine.model import _set_submodule, find_target_modules

    cfg = HDPiSSAConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules)
    targets = find_target_modules(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    factors = distributed_init_factors([m.weight for _, m in targets], world_size * r, init_method, 4, 0,
                                       shard=True, scale=cfg.scale)  # the engine's lora_alpha convention
    names, layers = [], []
    for (name, module), (A0_all, B0_all) in zip(targets, factors):
        layer = OfficialStyleLinear(module, A0_all, B0_all, r, rank, world_size, cfg.scale)
        _set_submodule(model, name, layer)
        names.append(name)
        layers.append(layer)
    return OfficialStyleState(names, layers)
