"""The fixed-subspace ceiling on a real model, measured by what it costs in held-out loss.

HD-PiSSA's paper scheme (``subspace="fixed"``) can only move W inside ``{U·X + Y·Vᵀ}``, U and V the initial top-k
singular directions (k = K·r). How much of full fine-tuning's *gain* lies in that set? For SmolLM2-135M-Instruct and
the ΔW of a full fine-tuning run of the real-model study (``bench/sim_train.py``, ``save_final``):

* the share of ‖ΔW‖ outside the set, ``‖(I−P_U)ΔW(I−P_V)‖/‖ΔW‖``, beside what a random matrix of the same shape gives
  (``sqrt((m−k)(n−k)/(mn))`` in expectation for i.i.d. entries: the share alone says little when it sits there);
* the share of full FT's held-out loss improvement that survives projecting ΔW onto the set:
  ``(L(W0) − L(W0 + P_k ΔW)) / (L(W0) − L(W0 + ΔW))`` for k = K·r of the fixed scheme (4 at K = 2, r = 2), of K = 8
  (16, also rotate's whole pool at K = 2 with ``rotate_pool = 4``), and larger k;
* what a refactor costs: the factorisation of every adapted matrix (exact SVD and randomized top-K·r), measured here on
  one CPU thread, and projected to Llama-3.1-8B's shapes by the ratio of floating-point work.

    python -m bench.ceiling_real --full_ft DIR_WITH_linears.safetensors [--others NAME=DIR ...] [--ks 4 16 64 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench._common import REPO_ROOT, env_info, finish_env, quiet_hf
from bench.sim_train import TASKS, aggregate, encode, model_dir, read_rows, score_rows

# Llama-3.1-8B's adapted matrices per block (out, in) and its 32 blocks: for the refactor-cost projection.
LLAMA8B_BLOCK = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
LLAMA8B_BLOCKS = 32


def project_out(delta: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The part of ``delta`` outside ``{U·X + Y·Vᵀ}``: ``(I − UUᵀ) delta (I − VVᵀ)``."""
    left = delta - U @ (U.t() @ delta)
    return left - (left @ V) @ V.t()


def random_baseline(m: int, n: int, k: int) -> float:
    """Expected share of a random i.i.d. matrix's norm outside the top-k sets of both sides: sqrt((m−k)(n−k)/(mn))."""
    return (max(m - k, 0) * max(n - k, 0) / (m * n)) ** 0.5


def singular_bases(w0: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every matrix's left and right singular vectors (columns, by decreasing singular value), in the weights' dtype.

    One SVD per matrix, sliced to each k by the caller: ``hdpissa_trl.analysis.subspace.principal_bases`` returns one
    k's fp64 bases per call, which would repeat the factorisation for every k of the study."""
    bases = {}
    for name, w in w0.items():
        U, _, Vh = torch.linalg.svd(w, full_matrices=False)
        bases[name] = (U, Vh.t())
    return bases


def projected_gains(w0: dict, deltas: dict, bases: dict, ks: list[int], loss_with, log: bool = False) -> dict:
    """For each k: the share of every ΔW outside the top-k set (mean / min / max, and the random-matrix expectation
    beside it) and the loss of ``W0 + ΔW`` projected onto the set, as the share of full ΔW's loss gain it keeps:
    ``(L(W0) − L(W0 + P_k ΔW)) / (L(W0) − L(W0 + ΔW))``. ``loss_with(weights)`` evaluates a dict of full weights."""
    L0 = loss_with(w0)
    Lfull = loss_with({k: w0[k] + deltas[k] for k in w0})
    if log:
        print(f"[ceiling] held-out loss: base {L0:.4f}, full FT {Lfull:.4f}", flush=True)
    res: dict = {"loss_base": L0, "loss_full": Lfull, "sets": {}}
    for k in ks:
        outside, baseline, projected = [], [], {}
        for name, d in deltas.items():
            U, V = bases[name][0][:, :k], bases[name][1][:, :k]
            out = project_out(d, U, V)
            outside.append(float(out.norm() / d.norm().clamp_min(1e-30)))
            baseline.append(random_baseline(*d.shape, k))
            projected[name] = w0[name] + (d - out)
        Lk = loss_with(projected)
        entry = {"outside_mean": sum(outside) / len(outside), "outside_min": min(outside),
                 "outside_max": max(outside), "random_baseline_mean": sum(baseline) / len(baseline),
                 "loss_projected": Lk, "recovered_share": (L0 - Lk) / (L0 - Lfull)}
        res["sets"][str(k)] = entry
        if log:
            print(f"[ceiling] k={k}: outside {entry['outside_mean']:.3f} (random {entry['random_baseline_mean']:.3f}), "
                  f"loss {Lk:.4f}, recovered {entry['recovered_share']:.1%}", flush=True)
    return res


def svd_cost(shapes: list[tuple[int, int]], k: int | None) -> float:
    """Floating-point work (arbitrary units) of factoring these matrices: ~m·n·min(m, n) for an exact SVD, ~m·n·k for a
    randomized top-k one (a few passes of products with an n×2k sketch)."""
    return float(sum(m * n * (min(m, n) if k is None else 2 * k) for m, n in shapes))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full_ft", required=True, help="directory with linears.safetensors of a full fine-tuning run")
    ap.add_argument("--others", nargs="*", default=[], help="NAME=DIR: other runs' ΔW outside shares (e.g. HD-PiSSA)")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--heldout_limit", type=int, default=100, help="rows per task for the held-out losses")
    ap.add_argument("--K", type=int, default=2, help="devices of the refactor-cost measurement (top K·r directions)")
    ap.add_argument("--r", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "ceiling_real.json"))
    args = ap.parse_args(argv)
    quiet_hf()
    torch.set_num_threads(1)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = env_info(threads=1)
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(".weight") and "_proj." in k}
    full = load_file(os.path.join(args.full_ft, "linears.safetensors"))
    missing = sorted(set(w0) - set(full))
    if missing:
        raise SystemExit(f"{args.full_ft}/linears.safetensors lacks {len(missing)} of the model's {len(w0)} adapted "
                         f"linears (first: {missing[0]}): is it the final weights of a SmolLM2 full fine-tuning run?")
    deltas = {k: full[k] - w0[k] for k in w0}
    sets = {t: [encode(tok, r["prompt"], r["completion"], 256) for r in read_rows(f"{t}_test.jsonl")[:args.heldout_limit]]
            for t in TASKS}

    def loss_with(weights: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            for k, v in weights.items():
                model.get_parameter(k).copy_(v)
        return aggregate({t: score_rows(model, tok, e) for t, e in sets.items()})["eval_loss"]

    t0 = time.time()
    bases = singular_bases(w0)
    print(f"[ceiling] SVD of {len(w0)} matrices: {time.time() - t0:.0f}s", flush=True)
    res: dict = {"env": info, "layers": len(w0), "ks": args.ks, "others": {}}
    res.update(projected_gains(w0, deltas, bases, args.ks, loss_with, log=True))
    for spec in args.others:
        label, _, d = spec.partition("=")
        other = load_file(os.path.join(d, "linears.safetensors"))
        res["others"][label] = {}
        for k in args.ks:
            vals = [float(project_out(other[n] - w0[n], bases[n][0][:, :k], bases[n][1][:, :k]).norm()
                          / (other[n] - w0[n]).norm().clamp_min(1e-30)) for n in w0]
            res["others"][label][str(k)] = sum(vals) / len(vals)
    # What a refactor costs: every adapted matrix factored again (exact SVD, and randomized top-K·r).
    kr = args.K * args.r
    shapes = [tuple(w.shape) for w in w0.values()]
    t0 = time.time()
    for w in w0.values():
        torch.linalg.svd(w, full_matrices=False)
    exact_s = time.time() - t0
    t0 = time.time()
    for w in w0.values():
        torch.svd_lowrank(w, q=min(max(2 * kr, kr + 8), min(w.shape)), niter=4)
    rand_s = time.time() - t0
    big = LLAMA8B_BLOCK * LLAMA8B_BLOCKS
    res["refactor"] = {
        "K": args.K, "r": args.r, "exact_svd_s": exact_s, "randomized_s": rand_s,
        "llama8b_exact_projected_s": exact_s * svd_cost(big, None) / svd_cost(shapes, None),
        "llama8b_randomized_projected_s_K8_r16": rand_s * svd_cost(big, 128) / svd_cost(shapes, kr),
    }
    print(f"[ceiling] refactor on this CPU (1 thread): exact {exact_s:.1f}s, randomized {rand_s:.1f}s; projected to "
          f"Llama-3.1-8B by flop count: exact {res['refactor']['llama8b_exact_projected_s']:.0f}s, randomized K=8 r=16 "
          f"{res['refactor']['llama8b_randomized_projected_s_K8_r16']:.0f}s", flush=True)
    finish_env(info)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
