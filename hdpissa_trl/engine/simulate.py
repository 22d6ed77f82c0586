"""K HD-PiSSA devices in one process: each device's adapter step from its own micro-batch, the fold as K processes do it.

The paper's K = 8 cannot run as 8 processes on a 2-core machine; this runs the same arithmetic in one. Device ``k``
keeps its own adapter tensors ``(A_k, B_k)`` per layer (and, in the caller, its own optimizer). Inside
``with sim.device(k):`` every HD-PiSSA layer carries device ``k``'s slice and tensors, so a forward/backward there
gives exactly the gradients device ``k`` of a real K-process run computes on the same micro-batch. ``fold()`` stacks
the K local delta buffers in rank order, which is what the all-gather of a real run returns, and folds them with the
engine's own :func:`fold_gathered` and weight updaters: same inputs, same code, same bits of ``W``
(tests/test_simulate.py compares with real 2- and 4-process gloo runs). ``bench/sim_train.py`` runs the real-model
study on it (K = 2, 4, 8 on a 2-core machine).

What it does not simulate: per-device randomness (dropout masks, stochastic rounding draws are already identical
across devices by design), and the wall time or memory of K devices.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .distributed import is_distributed
from .fold import FoldStats, Stopwatch, fold_gathered, update_rank_bound
from .inject import inject_hdpissa


class SimulatedDevices:
    """HD-PiSSA with ``world_size`` devices simulated in this process (no process group may be running).

    Args:
        model: the model to adapt (in place), as for :func:`~hdpissa_trl.inject_hdpissa`.
        config: the :class:`~hdpissa_trl.HDPiSSAConfig`.
        world_size: K, the number of simulated devices.
    """

    def __init__(self, model: nn.Module, config, world_size: int, show_progress: bool = False):
        if is_distributed():
            raise RuntimeError("SimulatedDevices runs K devices in ONE process; a torch.distributed process group is "
                               "running here. Use inject_hdpissa on every rank instead.")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}.")
        self.engine = inject_hdpissa(model, config, rank=0, world_size=world_size, show_progress=show_progress)
        self.world_size = world_size
        layers = self.engine.layers
        self.adapters: list[list[tuple[nn.Parameter, nn.Parameter]]] = [
            [(nn.Parameter(layer.A0_all[k * layer.r:(k + 1) * layer.r].clone()),
              nn.Parameter(layer.B0_all[:, k * layer.r:(k + 1) * layer.r].clone())) for layer in layers]
            for k in range(world_size)
        ]
        # slice_gradient="global": each device's own (all-slices) gradient buffers, summed in rank order by the reduce
        # as a real run's all-reduce sums the devices' buffers.
        self.slice_grads = None
        if layers and layers[0].slice_grads is not None:
            self.slice_grads = [[layer.slice_grads for layer in layers]] + [
                [(torch.zeros_like(layer.A0_all), torch.zeros_like(layer.B0_all)) for layer in layers]
                for _ in range(1, world_size)]
        self._current: int | None = None
        self._install(0)

    @property
    def step(self) -> int:
        return self.engine.step

    @property
    def factors_changed(self) -> bool:
        return self.engine.factors_changed

    def parameters(self, k: int) -> list[nn.Parameter]:
        """Device ``k``'s trainable tensors (A, B of every layer), in layer order: give each device its own optimizer."""
        return [p for pair in self.adapters[k] for p in pair]

    def _install(self, k: int) -> None:
        for i, (layer, (A, B)) in enumerate(zip(self.engine.layers, self.adapters[k])):
            layer.rank = k
            layer.lora_A, layer.lora_B = A, B  # nn.Module.__setattr__ registers the Parameters
            if self.slice_grads is not None:
                layer.slice_grads = self.slice_grads[k][i]
        self._current = k

    @contextlib.contextmanager
    def device(self, k: int):
        """Every HD-PiSSA layer acts as device ``k``'s (its slice, its adapter tensors) inside the block."""
        if not 0 <= k < self.world_size:
            raise ValueError(f"device index must be in [0, {self.world_size}), got {k}.")
        previous = self._current
        self._install(k)
        try:
            yield self
        finally:
            if previous is not None:
                self._install(previous)

    @torch.no_grad()
    def local_buffer(self, k: int) -> torch.Tensor:
        """Device ``k``'s ``[dA | dB]`` of every layer, as :func:`~hdpissa_trl.engine.fold.local_delta_buffer` builds
        it."""
        parts = []
        for layer, (A, B) in zip(self.engine.layers, self.adapters[k]):
            sl = slice(k * layer.r, (k + 1) * layer.r)
            parts.append((A - layer.A0_all[sl]).reshape(-1))
            parts.append((B - layer.B0_all[:, sl]).reshape(-1))
        return torch.cat(parts).to(torch.float32)

    @torch.no_grad()
    def reset_adapters(self) -> None:
        """Every device's adapters back to its slice of the initial factors (after a fold, or a restored state)."""
        for k in range(self.world_size):
            for layer, (A, B) in zip(self.engine.layers, self.adapters[k]):
                sl = slice(k * layer.r, (k + 1) * layer.r)
                A.copy_(layer.A0_all[sl])
                B.copy_(layer.B0_all[:, sl])

    @torch.no_grad()
    def reduce_slice_gradients(self) -> None:
        """``slice_gradient="global"``: after every device's backward of the step, each device's adapters get its
        slice's gradient summed over all devices (in rank order) and divided by K: what the reduce of a real run
        returns; every device's buffers are emptied. A real run's collective may add the K buffers in another order
        (gloo's ring does at K > 2), so from K = 3 on the two agree up to float rounding, not bit for bit."""
        from .model import install_slice_gradients, slice_gradient_buffer, zero_slice_gradients

        if self.slice_grads is None:
            raise RuntimeError("reduce_slice_gradients needs HDPiSSAConfig(slice_gradient='global').")
        layers = self.engine.layers
        flat = slice_gradient_buffer(layers, self.world_size, self.slice_grads[0])
        for k in range(1, self.world_size):
            flat += slice_gradient_buffer(layers, self.world_size, self.slice_grads[k])
        chunk = flat.numel() // self.world_size
        for k in range(self.world_size):
            install_slice_gradients(layers, flat[k * chunk:(k + 1) * chunk] / self.world_size,
                                    params=self.adapters[k])
        for device in self.slice_grads:
            zero_slice_gradients(device)

    @torch.no_grad()
    def fold(self) -> FoldStats:
        """The fold of a K-process run: the K local buffers in rank order (the all-gather's result), folded into W
        layer by layer with the engine's updaters; then the subspace schedule and a reset of every device's adapters."""
        engine = self.engine
        layers = engine.layers
        stats = FoldStats(fold_timer=Stopwatch(layers[0].base_layer.weight.device if layers else None))
        engine.step += 1
        gathered = torch.stack([self.local_buffer(k) for k in range(self.world_size)])
        fold_gathered(layers, engine.updaters, gathered, engine.step, engine.subspace.moves_factors, reset=False)
        engine.factors_changed = engine.subspace.after_fold(engine)
        self.reset_adapters()
        stats.update_rank_bound = update_rank_bound(layers, self.world_size)
        stats.fold_timer.stop()
        return stats
