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

from .config import SUBSPACE_MODES
from .init import init_factors_per_layer


class SubspaceSchedule:
    """The schedule of one engine. ``after_fold`` runs on every rank right after the fold of step ``engine.step``;
    it returns True when the factors were replaced, i.e. when the adapters' optimizer state must restart."""

    def __init__(self, engine, mode: str, every: int, pool: int = 2):
        if mode not in SUBSPACE_MODES:
            raise ValueError(f"subspace must be one of {SUBSPACE_MODES}, got {mode!r}.")
        self.mode, self.every, self.pool_size = mode, every, pool
        self.pool: list[tuple[torch.Tensor, torch.Tensor]] = []
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

    @property
    def moves_factors(self) -> bool:
        """Whether the fold itself moves the factors to the adapters' new values (``"moving"``)."""
        return self.mode == "moving"

    @torch.no_grad()
    def after_fold(self, engine) -> bool:
        if self.mode in ("fixed", "moving") or engine.step % self.every:
            return False
        if self.mode == "refactor":
            cfg = replace(engine.config, seed=engine.config.seed + engine.step)
            weights = [upd.full_precision_weight(layer.weight).to(torch.float32)
                       for layer, upd in zip(engine.layers, engine.updaters)]
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
        """The rotation pool (the initial SVD is gone after training); the other modes keep nothing beyond A0/B0."""
        out = {}
        for i, (A, B) in enumerate(self.pool):
            out[f"pool.{i}.A"], out[f"pool.{i}.B"] = A.detach().cpu(), B.detach().cpu()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for i in range(len(self.pool)):
            A, B = tensors[f"pool.{i}.A"], tensors[f"pool.{i}.B"]
            self.pool[i] = (A.to(self.pool[i][0].device), B.to(self.pool[i][1].device))
