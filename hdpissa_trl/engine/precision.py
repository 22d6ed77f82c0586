"""How the full weight ``W`` absorbs a fold update, per precision mode.

A bf16 weight has an 8-bit mantissa: adding an update smaller than about ``2^-9·|w|`` rounds back to ``w``, so a
fine-tuning run whose per-step updates are tiny (lr 2e-5) silently stops learning when ``W`` is stored in plain
bf16. The modes here keep the update:

* ``fp32``: an fp32 master copy absorbs the update; the model's weight is its cast (the master IS the weight when
  the model is already fp32).
* ``bf16_kahan``: the weight stays bf16; a bf16 compensation buffer carries what rounding dropped to the next step.
* ``bf16_sr``: the weight stays bf16; the fp32 sum is rounded up or down at random with probability proportional to
  the distance, so rounding is unbiased in expectation. The random bits are a hash of ``(seed, step, layer, element)``,
  identical on every device, so all devices still hold the same bits.
* ``model``: plain in-place add in the model dtype (the baseline that loses small updates in bf16).

Every function is deterministic given its inputs: same inputs on every device give the same bits.

Speed (a fold touches every adapted weight once per optimizer step): the product goes straight into the fp32 weight or
master (``addmm_``, no m×n temporary); on a GPU the fold's GEMM uses TF32 by default (``fold_matmul``, below); the
Kahan and stochastic-rounding updates are one fused elementwise kernel on CUDA (``torch.compile``; the same function
runs eagerly elsewhere, in chunks, and both give the same bits: floating-point additions, integer operations and
casts only, nothing a compiler could contract into a fused multiply-add). ``HDPISSA_TRL_FUSED=0`` turns the compiled
kernels off.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .config import FOLD_MATMUL

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


# --------------------------------------------------------------------------------------------- the fold's GEMM
def resolve_fold_matmul(choice: str, device: torch.device) -> str:
    """``"ieee"`` or ``"tf32"`` for a weight on ``device``: ``"auto"`` is TF32 on CUDA, plain fp32 elsewhere."""
    if choice not in FOLD_MATMUL:
        raise ValueError(f"fold_matmul must be one of {FOLD_MATMUL}, got {choice!r}.")
    if choice == "auto":
        return "tf32" if device.type == "cuda" else "ieee"
    return choice


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) with only the first 10 mantissa bits kept, as TF32 tensor cores read an fp32 input (PyTorch's
    numerical-accuracy notes); inf and NaN are kept. A copy: ``x`` is not changed."""
    bits = x.contiguous().view(torch.int32) & ~0x1FFF
    return torch.where(torch.isfinite(x), bits.view(torch.float32), x)


@contextlib.contextmanager
def fp32_matmul_precision(device: torch.device, precision: str):
    """cuBLAS's fp32 GEMMs use ``precision`` (``"ieee"`` / ``"tf32"``) inside the block; the setting is restored
    after it. A no-op off CUDA (see :meth:`WeightUpdater.addmm` for TF32 there)."""
    matmul = torch.backends.cuda.matmul
    if device.type != "cuda":
        yield
        return
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; the legacy flag must not be mixed with it
        old = matmul.fp32_precision
        if old == precision:
            yield
            return
        matmul.fp32_precision = precision
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old = matmul.allow_tf32
        matmul.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32 = old


# ------------------------------------------------------------------------------- elementwise updates (fusable)
# Elements per pass of the eager (unfused) updates: bounds their temporaries (stochastic rounding's integer hash
# holds a few int64 tensors of this size) whatever the size of the weight. On a CPU the passes then stay in cache (a
# pass of 2^16 elements ran Kahan 5x and the hash 2.7x faster than one of 2^24); on a GPU without the fused kernels,
# larger passes keep the number of kernel launches down.
UPDATE_CHUNK = 1 << 16
UPDATE_CHUNK_GPU = 1 << 22
_M32 = 0xFFFFFFFF


def _update_chunk(device: torch.device) -> int:
    return UPDATE_CHUNK if device.type == "cpu" else UPDATE_CHUNK_GPU


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of ``x`` (int64 holding values in ``[0, 2^32)``) into ``[0, 2^32)``, in place: xor-shift-multiply
    rounds whose products stay below 2^63 (no overflow, so every backend computes the same values)."""
    x.bitwise_xor_(x >> 16)
    x.mul_(0x21F0AAAD).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x735A2D97).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 15)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def rounding_key(seed: int, step: int, layer_index: int) -> int:
    """The 64-bit key of one layer's stochastic rounding at one fold (the same on every device)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & 0xFFFFFFFFFFFFFFFF) ^ step) ^ layer_index)


def rounding_noise(index: torch.Tensor, key_lo, key_hi) -> torch.Tensor:
    """16 random bits (int32 in ``[0, 2^16)``) per element ``index`` (int64) for the key ``(key_lo, key_hi)``: a pure
    function of the element's position and the key, so any chunking, device or kernel gives the same bits."""
    h = _mix32((index & _M32).add_(key_lo).bitwise_and_(_M32))
    h = _mix32(h.bitwise_xor_(key_hi).add_(index >> 32).bitwise_and_(_M32))
    return h.bitwise_right_shift_(16).to(torch.int32)


def _sr_bits(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) rounded to bfloat16 bits: up with probability (distance to the lower value) / ulp. bf16 is the top
    16 bits of an fp32; adding 16 random low bits before truncating does exactly that. inf / NaN are kept."""
    rounded = ((x.view(torch.int32) + noise) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def _stochastic_round_flat(weight: torch.Tensor, delta: torch.Tensor, key_lo, key_hi, start: int) -> None:
    """``weight ← SR(weight + delta)`` on 1-D views whose first element is element ``start`` of the layer."""
    index = torch.arange(start, start + weight.numel(), dtype=torch.int64, device=weight.device)
    weight.copy_(_sr_bits(weight.float().add_(delta), rounding_noise(index, key_lo, key_hi)))


def _kahan_flat(weight: torch.Tensor, compensation: torch.Tensor, delta: torch.Tensor) -> None:
    """Kahan: ``y = delta − c; t = w + y; c = (t − w) − y; w = t``, with the fp32 delta for ``y`` so the small update
    is not rounded before it meets the compensation."""
    w = weight.float()
    y = delta - compensation.float()
    t = (w + y).to(weight.dtype)
    compensation.copy_(((t.float() - w) - y).to(compensation.dtype))
    weight.copy_(t)


_COMPILED: dict[str, object] = {}
_COMPILED_RAN: set[str] = set()


def compile_elementwise(fn):
    """``fn`` under ``torch.compile`` as the engine compiles its fused passes: one graph, dynamic shapes (one build
    for every layer shape), and every cast to a low-precision dtype kept (``emulate_precision_casts``: by default
    Inductor skips the rounding of a bf16 value that is cast back to fp32 in the same kernel, which would turn Kahan's
    compensation, the rounding error itself, into zero)."""
    return torch.compile(fn, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


def fused_available() -> bool:
    """Whether the fused CUDA passes can be built here (Triton present, ``HDPISSA_TRL_FUSED`` not ``0``)."""
    if os.environ.get("HDPISSA_TRL_FUSED", "1") == "0":
        return False
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:
        return False


def _fused(name: str, fn):
    """``fn`` compiled once for CUDA tensors, or None when compiling is off or unavailable."""
    if not fused_available():
        return None
    if name not in _COMPILED:
        try:
            _COMPILED[name] = compile_elementwise(fn)
        except Exception:  # no compiler here: the eager path computes the same bits
            _COMPILED[name] = None
    return _COMPILED[name]


def _run_fused(name: str, fn, *args) -> bool:
    """Run the compiled ``fn`` on CUDA tensors; False (nothing changed) when it is unavailable or its first call fails
    to build (compilation comes before any kernel runs). Errors of later calls are raised."""
    compiled = _fused(name, fn)
    if compiled is None:
        return False
    if name in _COMPILED_RAN:
        compiled(*args)
        return True
    try:
        compiled(*args)
    except Exception as exc:
        warnings.warn(f"hdpissa_trl: the fused {name} kernel could not be built ({type(exc).__name__}: {exc}); "
                      f"using the unfused path, which computes the same bits.", RuntimeWarning, stacklevel=3)
        _COMPILED[name] = None
        return False
    _COMPILED_RAN.add(name)
    return True


def kahan_update(weight: torch.Tensor, compensation: torch.Tensor, delta: torch.Tensor,
                 fused: bool | None = None) -> None:
    """``W += delta`` with Kahan compensation, in place (``weight``, ``compensation``: bf16/fp16; ``delta``: fp32).

    ``fused``: one compiled kernel (default: on CUDA when available); otherwise eager passes of ``UPDATE_CHUNK``
    elements. Both give the same bits.
    """
    w, c, d = weight.detach().view(-1), compensation.view(-1), delta.reshape(-1)
    if (fused if fused is not None else w.is_cuda) and _run_fused("kahan", _kahan_flat, w, c, d):
        return
    chunk = _update_chunk(w.device)
    for a in range(0, w.numel(), chunk):
        _kahan_flat(w[a:a + chunk], c[a:a + chunk], d[a:a + chunk])


def stochastic_round_update(weight: torch.Tensor, delta: torch.Tensor, key: int, fused: bool | None = None) -> None:
    """``W ← SR_bf16(W + delta)`` in place (``weight`` bf16, ``delta`` fp32); the random bits come from ``key`` and
    each element's position (:func:`rounding_noise`). ``fused`` as in :func:`kahan_update`."""
    w, d = weight.detach().view(-1), delta.reshape(-1)
    if (fused if fused is not None else w.is_cuda) and _run_fused(
            "stochastic rounding", _stochastic_round_flat, w, d, key & _M32, key >> 32, 0):
        return  # (the key's halves are dynamic integer arguments: no recompilation per step or layer)
    chunk = _update_chunk(w.device)
    for a in range(0, w.numel(), chunk):
        _stochastic_round_flat(w[a:a + chunk], d[a:a + chunk], key & _M32, key >> 32, a)


def stochastic_round_to_bf16(x: torch.Tensor, key: int = 0) -> torch.Tensor:
    """Round an fp32 tensor to bf16, up or down at random with probability proportional to the distance.

    The random bits are :func:`rounding_noise` of each element's position and ``key``: the same key gives the same
    bits on any device. bf16 is the top 16 bits of an fp32; adding uniform random bits to the low 16 bits before
    truncation rounds up with exactly the right probability.
    """
    x = x.to(torch.float32).contiguous()
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    flat_x, flat_out = x.view(-1), out.view(-1)
    chunk = _update_chunk(x.device)
    for a in range(0, flat_x.numel(), chunk):
        part = flat_x[a:a + chunk]
        index = torch.arange(a, a + part.numel(), dtype=torch.int64, device=x.device)
        flat_out[a:a + chunk] = _sr_bits(part, rounding_noise(index, key & _M32, key >> 32))
    return out


class WeightUpdater:
    """Applies fold updates to one layer's weight in the configured precision mode.

    Holds the extra state of the mode (fp32 master or Kahan compensation); that state is part of checkpoints.
    """

    def __init__(self, weight: torch.Tensor, mode: str, seed: int = 0, layer_index: int = 0,
                 fold_matmul: str = "auto"):
        if weight.dtype not in SUPPORTED_DTYPES.get(mode, ()):
            raise ValueError(f"precision={mode!r} cannot update a {weight.dtype} weight (layer {layer_index}); "
                             f"see hdpissa_trl.engine.precision.SUPPORTED_DTYPES for the modes each dtype takes.")
        self.mode = mode
        self.seed = seed
        self.layer_index = layer_index
        self.matmul = resolve_fold_matmul(fold_matmul, weight.device)  # "ieee" or "tf32"
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

        ``alpha`` scales ``left`` before the GEMM (pass 1.0 when it already is), so no kernel ever multiplies the m×n
        product. The fp32 weight, or the fp32 master, takes the product in place (``addmm_``: no m×n temporary; the
        bf16 weight is then one cast of the master); Kahan and stochastic rounding form the fp32 product once and
        update ``W`` in one fused pass (:meth:`apply`). The GEMM runs in ``self.matmul`` precision: ``"tf32"`` uses
        TF32 tensor cores on CUDA and, elsewhere, the same rounding of the inputs before a plain fp32 GEMM.
        """
        if alpha != 1.0:
            left = left * alpha
        if self.matmul == "tf32" and weight.device.type != "cuda":
            left, right = round_to_tf32(left), round_to_tf32(right)
        with fp32_matmul_precision(weight.device, self.matmul):
            if self.master is None and weight.dtype == torch.float32:
                weight.addmm_(left, right)
            elif self.master is not None:  # fp32 mode on a bf16/fp16 weight
                self.master.addmm_(left, right)
                weight.copy_(self.master)
            else:
                self.apply(weight, torch.mm(left, right), step)

    @torch.no_grad()
    def apply(self, weight: torch.Tensor, delta: torch.Tensor, step: int) -> None:
        """``W += delta`` (``delta`` fp32) in this mode, in place. The constructor refused any other dtype/mode."""
        if self.master is not None:  # fp32 mode on a bf16/fp16 weight
            self.master.add_(delta)
            weight.copy_(self.master)
        elif weight.dtype == torch.float32 or self.mode == "model":
            weight.add_(delta.to(weight.dtype))
        elif not weight.is_contiguous():  # the fused passes work on flat views
            work = weight.contiguous()
            self.apply(work, delta, step)
            weight.copy_(work)
        elif self.compensation is not None:  # bf16_kahan on a bf16/fp16 weight
            kahan_update(weight, self.compensation, delta)
        else:  # bf16_sr on a bfloat16 weight
            stochastic_round_update(weight, delta, rounding_key(self.seed, step, self.layer_index))
