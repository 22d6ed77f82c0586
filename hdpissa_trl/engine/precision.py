"""How the full weight ``W`` absorbs a fold update, per precision mode.

A bf16 weight has an 8-bit mantissa: adding an update smaller than about ``2^-9·|w|`` rounds back to ``w``, so a
fine-tuning run whose per-step updates are tiny (lr 2e-5) silently stops learning when ``W`` is stored in plain
bf16. The modes here keep the update:

* ``fp32``: an fp32 master copy absorbs the update; the model's weight is its cast (the master IS the weight when
  the model is already fp32).
* ``bf16_kahan``: the weight stays bf16; a bf16 compensation buffer carries what rounding dropped to the next step.
* ``bf16_sr``: the weight stays bf16; the fp32 sum is rounded up or down at random with probability proportional to
  the distance, so rounding is unbiased in expectation. The random bits come from a generator seeded by
  ``(seed, step, layer)``, identical on every device, so all devices still hold the same bits.
* ``model``: plain in-place add in the model dtype (the baseline that loses small updates in bf16).

Every function is deterministic given its inputs: same inputs on every device give the same bits.
"""

from __future__ import annotations

import warnings

import torch

# The weight dtypes each mode can update. ``bf16_sr`` rounds to bfloat16 bits, so an fp16 weight cannot take it.
SUPPORTED_DTYPES = {
    "fp32": (torch.float32, torch.bfloat16, torch.float16),
    "bf16_kahan": (torch.float32, torch.bfloat16, torch.float16),
    "bf16_sr": (torch.float32, torch.bfloat16),
    "model": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}


def check_precision_supported(mode: str, weights: dict[str, torch.Tensor]) -> None:
    """Refuse a precision mode the adapted weights cannot take, before anything is modified; warn when it is a no-op.

    ``bf16_sr`` on an fp16 weight is an error (stochastic rounding produces bfloat16 bits). ``bf16_kahan`` /
    ``bf16_sr`` on fp32 weights warn: the fold is then applied exactly in fp32 and the mode changes nothing.
    """
    allowed = SUPPORTED_DTYPES.get(mode, ())
    for name, w in weights.items():
        if w.dtype not in allowed:
            fitting = [m for m, dtypes in SUPPORTED_DTYPES.items() if w.dtype in dtypes]
            raise ValueError(
                f"precision={mode!r} cannot update layer {name!r}: its weight is {w.dtype}, the mode supports "
                f"{[str(d).replace('torch.', '') for d in allowed]}. Use precision in {fitting} for these weights, "
                f"or load the model in another dtype."
            )
    if mode in ("bf16_kahan", "bf16_sr") and weights and all(w.dtype == torch.float32 for w in weights.values()):
        warnings.warn(
            f"precision={mode!r} has no effect: the adapted weights are float32, so every fold is applied exactly "
            f"in fp32. The mode matters when the model is loaded in bfloat16.", UserWarning, stacklevel=3
        )


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round an fp32 tensor to bf16, up or down at random with probability proportional to the distance.

    bf16 is the top 16 bits of an fp32; adding uniform random bits to the low 16 bits before truncation rounds up
    with exactly the right probability.
    """
    x = x.to(torch.float32).contiguous()
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & ~0xFFFF
    # Keep NaN/inf as they are (the bit trick could turn a large finite value into inf only when it should overflow).
    out = rounded.view(torch.float32)
    out = torch.where(torch.isfinite(x), out, x)
    return out.to(torch.bfloat16)


class WeightUpdater:
    """Applies fold updates to one layer's weight in the configured precision mode.

    Holds the extra state of the mode (fp32 master or Kahan compensation); that state is part of checkpoints.
    """

    def __init__(self, weight: torch.Tensor, mode: str, seed: int = 0, layer_index: int = 0):
        if weight.dtype not in SUPPORTED_DTYPES.get(mode, ()):
            raise ValueError(f"precision={mode!r} cannot update a {weight.dtype} weight (layer {layer_index}); "
                             f"see hdpissa_trl.engine.precision.SUPPORTED_DTYPES for the modes each dtype takes.")
        self.mode = mode
        self.seed = seed
        self.layer_index = layer_index
        self.master: torch.Tensor | None = None
        self.compensation: torch.Tensor | None = None
        low_precision = weight.dtype in (torch.bfloat16, torch.float16)
        if mode == "fp32" and weight.dtype != torch.float32:
            self.master = weight.detach().to(torch.float32).clone()
        elif mode == "bf16_kahan" and low_precision:
            self.compensation = torch.zeros_like(weight)

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.master is not None:
            out["master"] = self.master
        if self.compensation is not None:
            out["compensation"] = self.compensation
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("master", "compensation"):
            cur = getattr(self, key)
            if (key in state) != (cur is not None):
                raise ValueError(f"Precision state mismatch for layer {self.layer_index}: checkpoint has "
                                 f"{sorted(state)} but mode {self.mode!r} expects {key} to be "
                                 f"{'present' if cur is not None else 'absent'}.")
            if cur is not None:
                cur.copy_(state[key])

    def full_precision_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The most precise value of ``W`` known (the master when there is one)."""
        return self.master if self.master is not None else weight

    @torch.no_grad()
    def addmm(self, weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float, step: int) -> None:
        """``W += alpha · left @ right`` (fp32 factors) in this mode, in place.

        An fp32 weight with no master copy takes the product in place (``addmm_``: no m×n temporary); every other
        case forms the fp32 product once and hands it to :meth:`apply`.
        """
        if self.master is None and weight.dtype == torch.float32:
            weight.addmm_(left, right, alpha=alpha)
            return
        delta = torch.mm(left, right)
        delta.mul_(alpha)
        self.apply(weight, delta, step)

    @torch.no_grad()
    def apply(self, weight: torch.Tensor, delta: torch.Tensor, step: int) -> None:
        """``W += delta`` (``delta`` fp32) in this mode, in place. The constructor refused any other dtype/mode."""
        if self.master is not None:  # fp32 mode on a bf16/fp16 weight
            self.master.add_(delta)
            weight.copy_(self.master)
        elif weight.dtype == torch.float32 or self.mode == "model":
            weight.add_(delta.to(weight.dtype))
        elif self.compensation is not None:  # bf16_kahan on a bf16/fp16 weight
            # Kahan: y = delta - c; t = w + y; c = (t - w) - y; w = t. Done with the fp32 delta for y so the
            # small update is not rounded before it meets the compensation.
            y = delta - self.compensation.to(torch.float32)
            t = (weight.to(torch.float32) + y).to(weight.dtype)
            self.compensation.copy_(((t.to(torch.float32) - weight.to(torch.float32)) - y).to(weight.dtype))
            weight.copy_(t)
        else:  # bf16_sr on a bfloat16 weight
            gen = torch.Generator(device=weight.device)
            gen.manual_seed((self.seed * 1_000_003 + step * 8191 + self.layer_index) % (2**63 - 1))
            weight.copy_(stochastic_round_to_bf16(weight.to(torch.float32) + delta, generator=gen))
