"""What one fold costs at a real model's layer shapes: device and host time, kernels launched, temporaries.

The fold is everything after the all-gather of the adapter deltas: per layer one GEMM of inner dimension ``2·K·r``
into ``W`` (or its fp32 master) in the precision mode, then the reset of the adapters; and, every ``sync_check_steps``
folds, the checksums of ``W`` compared across devices. This script builds the adapted layers of Llama-3.1-8B (q, k, v,
o, gate, up, down per block; random values: the cost does not depend on them) with K devices' initial factors, fills
a ``(K, numel)`` buffer as the gather would, and folds it with the engine's own :func:`fold_gathered` and weight
updaters, once per precision mode:

    python -m bench.fold_speed                                   # CPU: one 8B block (7 layers), K = 8, r = 16
    python -m bench.fold_speed --device cuda --blocks 32         # GPU: all 224 layers of the 8B model

Per mode it prints the median fold time (device time: CUDA events on a GPU, the host clock on a CPU), the host time
until the fold call returns (on a GPU the kernels are queued, so this is the launch cost), the number of operators
(``aten`` ops called from Python) and, on a GPU, of kernels, the peak of the fold's temporaries, and whether two folds
from the same state give the same checksums of every ``W`` (what every device must compute). ``bench.gpu_check``
runs it as one of its sections.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench import _common as common
from bench.communication import LLAMA31_8B_SHAPES
from hdpissa_trl.engine.consistency import weight_checksums
from hdpissa_trl.engine.fold import Stopwatch, fold_gathered
from hdpissa_trl.engine.layer import HDPiSSALinear
from hdpissa_trl.engine.precision import WeightUpdater

# (out, in) of the 7 adapted linears of one Llama-3.1-8B block; "small" keeps their ratios at 1/16 of the width.
BLOCK_SHAPES = {
    "llama8b": LLAMA31_8B_SHAPES[:7],
    "small": [(m // 16, n // 16) for m, n in LLAMA31_8B_SHAPES[:7]],
}
# label -> (weight dtype, HDPiSSAConfig.precision)
MODES = {
    "fp32 W": (torch.float32, "fp32"),
    "bf16 W + fp32 master": (torch.bfloat16, "fp32"),
    "bf16 W + Kahan": (torch.bfloat16, "bf16_kahan"),
    "bf16 W + SR": (torch.bfloat16, "bf16_sr"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default="llama8b", choices=sorted(BLOCK_SHAPES))
    ap.add_argument("--blocks", type=int, default=1, help="decoder blocks (7 adapted layers each)")
    ap.add_argument("--K", type=int, default=8, help="simulated devices")
    ap.add_argument("--r", type=int, default=16, help="rank per device")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated labels of MODES")
    ap.add_argument("--repeats", type=int, default=1, help="timed folds per mode")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU; default: torch's)")
    common.add_output_args(ap)
    return ap


# ----------------------------------------------------------------------------------------------------- the layers
def build_layers(shapes: list[tuple[int, int]], K: int, r: int, dtype: torch.dtype, precision: str,
                 device: str, seed: int = 0) -> tuple[list[HDPiSSALinear], list[WeightUpdater]]:
    """Adapted layers of the given ``(out, in)`` shapes as device 0 of K holds them (random W and factors)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    layers, updaters = [], []
    for i, (m, n) in enumerate(shapes):
        base = torch.nn.Linear(n, m, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(torch.randn(m, n, generator=gen, device=device).mul_(0.02))
        layer = HDPiSSALinear(base, r, 0, K, 1.0, name=f"layer{i}")
        layer.set_initial_factors(torch.randn(K * r, n, generator=gen, device=device).mul_(0.05),
                                  torch.randn(m, K * r, generator=gen, device=device).mul_(0.05))
        layers.append(layer)
        updaters.append(WeightUpdater(base.weight, precision, seed=seed, layer_index=i))
    return layers, updaters


def gathered_buffer(layers: list[HDPiSSALinear], K: int, device: str, seed: int = 1) -> torch.Tensor:
    """A ``(K, numel)`` buffer as the all-gather returns it (every device's ``[dA | dB]`` of every layer)."""
    numel = sum(lyr.r * (lyr.in_features + lyr.out_features) for lyr in layers)
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(K, numel, generator=gen, device=device).mul_(1e-4)


def fold_all(layers, updaters, gathered: torch.Tensor, step: int) -> None:
    """The fold after the gather, as ``fold_deltas`` runs it on every device."""
    fold_gathered(layers, updaters, gathered, step)


def snapshot(layers, updaters) -> list[list[torch.Tensor]]:
    return [[lyr.base_layer.weight.detach().clone(), *(t.clone() for t in upd.state().values())]
            for lyr, upd in zip(layers, updaters)]


@torch.no_grad()
def restore(layers, updaters, saved) -> None:
    for lyr, upd, tensors in zip(layers, updaters, saved):
        for dst, src in zip([lyr.base_layer.weight, *upd.state().values()], tensors):
            dst.copy_(src)


# -------------------------------------------------------------------------------------------------- measurements
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# Operators that only make a view or an allocation: no kernel of their own.
NO_KERNEL_OPS = frozenset(f"aten::{name}" for name in (
    "view", "reshape", "slice", "select", "permute", "t", "transpose", "as_strided", "unsqueeze", "squeeze", "detach",
    "alias", "expand", "narrow", "_unsafe_view", "view_as", "flatten", "lift_fresh", "resolve_conj", "resolve_neg",
    "empty", "empty_like", "empty_strided", "split", "chunk", "unbind", "result_type", "_reshape_alias", "split_with_sizes",
    "contiguous"))


def _computes(event) -> bool:
    """Whether an operator (or one it calls) does work beyond views and allocations (``reshape`` may copy)."""
    return event.name not in NO_KERNEL_OPS or any(c.name.startswith("aten::") and _computes(c)
                                                  for c in event.cpu_children)


def op_profile(fn, device: str) -> dict:
    """Operators, kernels and the peak of the temporaries of one call of ``fn``.

    ``ops``: ``aten`` operators called from Python that do work (views and bare allocations left out; each launches
    at least one kernel on a GPU); ``kernels``: device
    kernels (GPU only); ``peak_temp_bytes``: on a GPU the allocator's peak above what was allocated before the call,
    on a CPU the peak of the running sum of every operator's own allocations minus frees, in time order.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with profile(activities=activities, profile_memory=device != "cuda") as prof:
        fn()
        _sync(device)
    events = prof.events()
    top = [e for e in events if e.cpu_parent is None and e.name.startswith("aten::")]
    out = {"ops": sum(1 for e in top if _computes(e)), "kernels": None}
    if device == "cuda":
        out["kernels"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        out["peak_temp_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        live = peak = 0
        for e in sorted(events, key=lambda e: e.time_range.start):
            live += e.self_cpu_memory_usage
            peak = max(peak, live)
        out["peak_temp_bytes"] = peak
    return out


def timed(fn, device: str, repeats: int) -> dict:
    """Median device time and host time (until ``fn`` returns) over ``repeats`` calls, in ms."""
    dev_ms, host_ms = [], []
    for _ in range(repeats):
        _sync(device)
        watch = Stopwatch(torch.device(device))
        t0 = time.perf_counter()
        fn()
        host_ms.append((time.perf_counter() - t0) * 1e3)
        watch.stop()
        dev_ms.append(watch.seconds * 1e3)
    return {"ms": common.median(dev_ms), "host_ms": common.median(host_ms), "ms_all": dev_ms, "host_ms_all": host_ms}


def measure_mode(shapes, K: int, r: int, label: str, device: str, repeats: int = 1) -> dict:
    """Fold and checksum cost of one precision mode, and whether two folds from one state give the same bits.

    From one saved state: ``repeats`` timed folds (the first after a warm-up fold on a GPU), then one profiled fold;
    the checksums after the first timed and after the profiled fold must be equal (same inputs, same bits).
    """
    dtype, precision = MODES[label]
    layers, updaters = build_layers(shapes, K, r, dtype, precision, device)
    gathered = gathered_buffer(layers, K, device)
    saved = snapshot(layers, updaters)
    if device == "cuda":  # allocator, cuBLAS handles, compiled kernels
        fold_all(layers, updaters, gathered, 1)
        restore(layers, updaters, saved)
        torch.cuda.synchronize()
    fold = timed(lambda: fold_all(layers, updaters, gathered, 1), device, 1)
    sums = [weight_checksums(layers, updaters)]
    for _ in range(repeats - 1):
        more = timed(lambda: fold_all(layers, updaters, gathered, 1), device, 1)
        fold["ms_all"] += more["ms_all"]
        fold["host_ms_all"] += more["host_ms_all"]
    fold["ms"], fold["host_ms"] = common.median(fold["ms_all"]), common.median(fold["host_ms_all"])
    restore(layers, updaters, saved)
    fold.update(op_profile(lambda: fold_all(layers, updaters, gathered, 1), device))
    sums.append(weight_checksums(layers, updaters))
    del saved
    check = timed(lambda: weight_checksums(layers, updaters), device, repeats)
    check.update(op_profile(lambda: weight_checksums(layers, updaters), device))
    numel = sum(m * n for m, n in shapes)
    return {"label": label, "precision": precision, "weight_dtype": str(dtype).replace("torch.", ""),
            "fold_matmul": updaters[0].matmul if hasattr(updaters[0], "matmul") else "ieee",
            "layers": len(shapes), "weight_numel": numel, "fold": fold, "checksum": check,
            "same_checksums_twice": bool(torch.equal(sums[0], sums[1]))}


@torch.no_grad()
def tf32_effect(m: int = 1024, n: int = 4096, K: int = 8, r: int = 16, lr: float = 2e-5, seed: int = 0) -> dict:
    """What ``fold_matmul="tf32"`` does to one fold's update, against the exact (fp64) one.

    W: random ``m × n`` (scale 0.02, as an initialised linear), its top ``K·r`` singular factors as the engine makes
    them (s = 1), deltas of an Adam step (±``lr`` per element, random signs). The TF32 operands are cut to 10 mantissa
    bits as tensor cores read them (:func:`~hdpissa_trl.engine.precision.round_to_tf32`).
    """
    from hdpissa_trl.engine.init import top_singular_factors
    from hdpissa_trl.engine.precision import round_to_tf32

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) * 0.02
    A0, B0 = top_singular_factors(W, K * r, "svd")
    dA = lr * torch.randint(0, 2, A0.shape, generator=g).mul(2).sub(1).float()
    dB = lr * torch.randint(0, 2, B0.shape, generator=g).mul(2).sub(1).float()
    left, right = torch.cat([dB, B0], 1), torch.cat([A0 + dA, dA], 0)
    exact = left.double() @ right.double()
    out = {"shape": [m, n], "K": K, "r": r, "lr": lr}
    for mode, (lft, rgt) in {"ieee": (left, right), "tf32": (round_to_tf32(left), round_to_tf32(right))}.items():
        delta = lft @ rgt
        err = (delta.double() - exact).norm() / exact.norm()
        w_new = W + delta  # what an fp32 W (or master) holds after the fold
        w_ref = (W.double() + exact).float()  # the exact update, rounded once into fp32
        ulp = (torch.nextafter(w_ref.abs(), torch.tensor(float("inf"))) - w_ref.abs()).double()
        off = ((w_new.double() - w_ref.double()).abs() / ulp)
        out[mode] = {"update_rel_error": err.item(), "W_elements_off_by_an_ulp_or_more": (off >= 1).float().mean().item(),
                     "W_median_ulps_off": off.median().item()}
    out["update_rel_to_W"] = (exact.norm() / W.double().norm()).item()
    return out


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    common.quiet_hf()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = common.env_info(device=args.device)
    shapes = BLOCK_SHAPES[args.shapes] * args.blocks
    rows, table = [], []
    for label in [s.strip() for s in args.modes.split(",") if s.strip()]:
        rec = measure_mode(shapes, args.K, args.r, label, args.device, args.repeats)
        rows.append(rec)
        f, c = rec["fold"], rec["checksum"]
        table.append([label, f"{f['ms']:.1f}", f"{f['host_ms']:.1f}", f["ops"], f["kernels"] or "-",
                      common.fmt_bytes(f["peak_temp_bytes"]), f"{c['ms']:.1f}", c["ops"],
                      "yes" if rec["same_checksums_twice"] else "NO"])
        if args.device == "cuda":
            torch.cuda.empty_cache()
    common.finish_env(info)
    common.print_table(["mode", "fold ms", "fold host ms", "fold ops", "fold kernels", "fold temporaries",
                        "checksum ms", "checksum ops", "same bits twice"], table,
                       title=f"Fold of {len(shapes)} layers ({args.shapes} shapes), K = {args.K}, r = {args.r} — "
                             f"{common.env_line(info)}")
    eff = tf32_effect(K=args.K, r=args.r) if args.shapes == "llama8b" else tf32_effect(256, 1024, args.K, args.r)
    common.print_table(["fold GEMM", "update error (relative, vs fp64)", "fp32 W entries off the exact fold"],
                       [[mode, f"{eff[mode]['update_rel_error']:.2e}",
                         f"{100 * eff[mode]['W_elements_off_by_an_ulp_or_more']:.1f} %"] for mode in ("ieee", "tf32")],
                       title=f"One fold's update of a {eff['shape'][0]}x{eff['shape'][1]} fp32 W (K = {args.K}, "
                             f"r = {args.r}, Adam-sized deltas ±{eff['lr']:g}; update/W = {eff['update_rel_to_W']:.1e})")
    result = {"env": info, "shapes": args.shapes, "blocks": args.blocks, "K": args.K, "r": args.r, "rows": rows,
              "tf32_effect": eff}
    path = common.write_json(f"fold_speed_{args.device}.json", result, args.results_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
