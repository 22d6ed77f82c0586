"""Subspace schedules: what happens to the devices' factors ``(A0_k, B0_k)`` between folds.

The paper's scheme (``subspace="fixed"``) restarts every adapter from the same ``(A0_k, B0_k)`` after every fold, so a
whole run's update stays in the fixed set ``{X·A0 + B0·Y}`` of the initial top-``K·r`` singular subspaces
(:mod:`hdpissa_trl.analysis.subspace` measures how much of an update lies outside it). The other schedules keep the
per-step update of rank ``2·K·r`` and the one collective of the fold, and let the set move over a run:

* ``"refactor"``: every ``subspace_steps`` folds, factor the *current* W again (top ``K·r``, same init method) and
  give the devices the new slices; the adapters' optimizer state restarts (their old moments refer to directions
  that are gone). Costs one re-factorisation (and its broadcasts, as at init) per ``subspace_steps`` folds.
* ``"rotate"``: the initial SVD provides a pool of the top ``rotate_pool·K·r`` directions; every ``subspace_steps``
  folds the devices move to the next window of ``K·r`` of them (cyclically); optimizer state restarts. No collective.
* ``"gradient"``: every ``subspace_steps`` folds the devices take new directions from the *gradient*: the top ``K·r``
  singular directions of the full gradient ``dL/dW`` of the last step (summed over devices: one all-reduce per layer
  at those steps only), where the loss falls fastest, as LoRA-GA and GaLore choose their subspaces. Magnitudes stay
  those of the current factors (W's top singular values at init), so a step's size is the fixed scheme's. The
  gradient comes from the adapted layers' own backward (one ``m × n`` product per layer, at those steps only); it
  costs one fp32 gradient of every adapted W during that step (what full fine-tuning holds at every step) and one
  factorisation per layer, as a refactor. Optimizer state restarts.
* ``"moving"``: after a fold each device's factors become its adapter's new values (``A0_k ← A_k``, ``B0_k ← B_k``),
  known everywhere from the gathered deltas, so the slices drift as PiSSA's adapter does; optimizer state is kept.
  With K = 1 this is PEFT's PiSSA, step for step.

Every schedule leaves W bit-identical on all devices: the fold is unchanged, refactored factors are computed once per
layer and broadcast, the rotation pool is broadcast at init, and moved factors come from the same gathered buffer.
On the tiny benchmarks (BENCHMARKS.md §6; K = 2, r = 4, 300 steps, every schedule at its best learning rate, 3 seeds)
``rotate`` and ``refactor`` beat both ``fixed`` and PEFT PiSSA in every seed on both tasks; ``moving`` beat them on the
full-rank task only and stays experimental. The rotation pool costs ``rotate_pool`` times the memory of the initial
factors; a refactor costs one factorisation of every adapted matrix (use ``init_method="randomized"`` on large models).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from .config import SUBSPACE_MODES
from .distributed import collective_errors, world_and_rank
from .init import init_factors_per_layer

CHANGING_MODES = ("refactor", "rotate", "gradient")  # schedules that replace the factors every subspace_steps folds


class SubspaceSchedule:
    """The schedule of one engine. ``after_fold`` runs on every rank right after the fold of step ``engine.step``;
    it returns True when the factors were replaced, i.e. when the adapters' optimizer state must restart."""

    def __init__(self, engine, mode: str, every: int, pool: int = 2, warmup: int = 0):
        if mode not in SUBSPACE_MODES:
            raise ValueError(f"subspace must be one of {SUBSPACE_MODES}, got {mode!r}.")
        self.mode, self.every, self.pool_size, self.warmup = mode, every, pool, warmup
        self.pool: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.since_change: int | None = None  # folds since the factors last changed (None: never)
        if mode == "rotate":
            K = engine.world_size
            for name, layer in zip(engine.names, engine.layers):
                if pool * K * layer.r > min(layer.in_features, layer.out_features):
                    raise ValueError(
                        f"subspace='rotate' with rotate_pool={pool} needs rotate_pool·K·r = {pool * K * layer.r} "
                        f"singular directions, but layer {name!r} has only min(out, in) = "
                        f"{min(layer.in_features, layer.out_features)}. Lower rotate_pool or r, or exclude the layer.")
            # pool·K·r_layer directions per layer: the init of pool·K devices, same per-layer scale lora_alpha / r
            self.pool = init_factors_per_layer([layer.weight for layer in engine.layers], [layer.r for layer in engine.layers],
                                      pool * K, engine.config, show_progress=False)
            for layer, (A, B) in zip(engine.layers, self.pool):  # window 0 (same as the init for an exact SVD)
                kr = K * layer.r
                layer.set_initial_factors(A[:kr].to(layer.A0_all.device), B[:, :kr].to(layer.B0_all.device))

        self.arm(engine)

    @property
    def moves_factors(self) -> bool:
        """Whether the fold itself moves the factors to the adapters' new values (``"moving"``)."""
        return self.mode == "moving"

    def lr_scale(self) -> float:
        """Multiplier of the adapters' learning rate for the next optimizer step: ``(i + 1) / (N + 1)`` on the i-th
        step after a change of the factors while ``i < N = subspace_warmup_steps``, else 1."""
        if not self.warmup or self.since_change is None or self.since_change >= self.warmup:
            return 1.0
        return (self.since_change + 1) / (self.warmup + 1)

    def arm(self, engine) -> None:
        """``"gradient"``: give every layer a zeroed gradient buffer when the next fold changes the factors (its
        backward fills it), and none otherwise (no cost on the other steps)."""
        if self.mode != "gradient":
            return
        wanted = (engine.step + 1) % self.every == 0
        for layer in engine.layers:
            if wanted:
                w = layer.base_layer.weight
                layer.grad_capture = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            else:
                layer.grad_capture = None

    @torch.no_grad()
    def _gradient_factors(self, engine) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """New factors from the captured gradients: directions of the top K·r singular pairs of Σ_k dL/dW_k (factored
        on one rank per layer and broadcast, as at init), magnitudes of the current factors (largest first)."""
        world, _ = world_and_rank(engine.group)
        grads = []
        for name, layer in zip(engine.names, engine.layers):
            g = layer.grad_capture
            if g is None:
                raise RuntimeError(f"subspace='gradient': no gradient was captured for layer {name!r} before fold "
                                   f"{engine.step}; the fold must follow a backward of the adapted model.")
            if world > 1:
                with collective_errors("gradient all-reduce (subspace='gradient')", engine.step, engine.group):
                    dist.all_reduce(g, group=engine.group)
            grads.append(g)
        cfg = replace(engine.config, seed=engine.config.seed + engine.step)
        unit = init_factors_per_layer(grads, [layer.r for layer in engine.layers], engine.world_size,
                                      cfg, show_progress=False)
        out = []
        for layer, (A, B) in zip(engine.layers, unit):
            mags = layer.A0_all.norm(dim=1).sort(descending=True).values
            A_dir = A / A.norm(dim=1, keepdim=True).clamp_min(1e-30)
            B_dir = B / B.norm(dim=0, keepdim=True).clamp_min(1e-30)
            out.append(((mags[:, None] * A_dir).contiguous(), (B_dir * mags[None, :]).contiguous()))
        for layer in engine.layers:
            layer.grad_capture = None
        return out

    @torch.no_grad()
    def after_fold(self, engine) -> bool:
        changed = self._change(engine)
        if changed:
            self.since_change = 0
        elif self.since_change is not None:
            self.since_change += 1
        self.arm(engine)
        return changed

    def _change(self, engine) -> bool:
        if self.mode in ("fixed", "moving") or engine.step % self.every:
            return False
        if self.mode == "gradient":
            factors = self._gradient_factors(engine)
        elif self.mode == "refactor":
            cfg = replace(engine.config, seed=engine.config.seed + engine.step)
            # In the model dtype: each layer is cast to fp32 inside its own factorisation, so a bf16 model never holds
            # an fp32 copy of more than one weight at a time (per rank).
            weights = [upd.full_precision_weight(layer.weight) for layer, upd in zip(engine.layers, engine.updaters)]
            factors = init_factors_per_layer(weights, [layer.r for layer in engine.layers], engine.world_size, cfg,
                                    show_progress=False)
        else:  # rotate: the next window of K·r directions of the initial pool
            t = (engine.step // self.every) % self.pool_size
            factors = []
            for layer, (A, B) in zip(engine.layers, self.pool):
                kr = engine.world_size * layer.r
                factors.append((A[t * kr:(t + 1) * kr], B[:, t * kr:(t + 1) * kr]))
        for layer, (A0_all, B0_all) in zip(engine.layers, factors):
            layer.set_initial_factors(A0_all.to(layer.A0_all.device), B0_all.to(layer.B0_all.device))
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rotation pool (the initial SVD is gone after training) and the folds since the last change (the
        warm-up's position); the other modes keep nothing beyond A0/B0."""
        out = {}
        for i, (A, B) in enumerate(self.pool):
            out[f"pool.{i}.A"], out[f"pool.{i}.B"] = A.detach().cpu(), B.detach().cpu()
        if self.since_change is not None:
            out["since_change"] = torch.tensor(self.since_change, dtype=torch.int64)
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], engine=None) -> None:
        """Restore :meth:`state_dict`; with ``engine`` (its step restored) also re-arm the gradient capture."""
        for i in range(len(self.pool)):
            A, B = tensors[f"pool.{i}.A"], tensors[f"pool.{i}.B"]
            self.pool[i] = (A.to(self.pool[i][0].device), B.to(self.pool[i][1].device))
        self.since_change = int(tensors["since_change"]) if "since_change" in tensors else None
        if engine is not None:
            self.arm(engine)
