"""Init: exact fp32 SVD vs randomized SVD (``torch.svd_lowrank``, n_iter 2 and 4) for the top K·r directions.

Both run through the engine's own :func:`hdpissa_trl.engine.init.top_singular_factors` (randomized uses
``q = K·r + 8``); one more row, ``q=2k``, calls ``torch.svd_lowrank`` with twice the subspace (not an engine setting)
to show what more oversampling buys.
Test matrices are ``W = U diag(σ) Vᵀ`` with random orthogonal ``U, V`` and a power-law spectrum ``σ_i = i^(−α)``
(trained weights decay slowly; α = 0.5 by default, 1.0 as a faster-decaying contrast), so the true top-k singular
subspaces are known exactly. Timings are interleaved (rotating order) and repeated; medians reported.

    python -m bench.init_svd                          # 1024², 2048², 4096²; K·r = 32 and 128
    python -m bench.init_svd --sizes 512 1024 --reps 1

Agreement with the true top-k subspace: principal angles θ between the estimated and the true right (and left)
singular subspaces; ``mean cos²θ`` (1 = identical subspaces), ``min cos²θ`` (worst direction), the worst
per-device slice (r = 16 directions each) and the Frobenius error of ``W − B0A0`` relative to the optimal rank-k one.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench._common import (
    add_output_args,
    env_info,
    env_line,
    finish_env,
    median,
    new_figure,
    print_table,
    save_figure,
    write_json,
)
from hdpissa_trl.engine.init import top_singular_factors

# label -> (init_method, n_iter, oversampling q). q=None is the engine's own choice (K·r + 8).
METHODS = {"exact": ("svd", 0, None), "rand n_iter=2": ("randomized", 2, None),
           "rand n_iter=4": ("randomized", 4, None), "rand n_iter=4, q=2k": ("randomized", 4, "2k")}


def factors(W: torch.Tensor, k: int, method: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's ``top_singular_factors``; the ``q=2k`` variant (NOT an engine setting) calls
    ``torch.svd_lowrank`` the same way with twice the subspace size, to show what more oversampling buys."""
    kind, n_iter, q = METHODS[method]
    if q is None:
        return top_singular_factors(W, k, kind, n_iter=n_iter, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=min(2 * k, min(W.shape)), niter=n_iter)
    root = S[:k].sqrt()
    return (root[:, None] * V[:, :k].t()).contiguous(), (U[:, :k] * root[None, :]).contiguous()


def test_matrix(n: int, alpha: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W = U diag(σ) Vᵀ`` (n × n, fp32) with ``σ_i = i^(−α)``; returns ``W, U, σ, V`` (U, V orthogonal)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.arange(1, n + 1, dtype=torch.float64).pow(-alpha)
    W = ((U * s) @ V.t()).to(torch.float32)
    return W, U.to(torch.float32), s.to(torch.float32), V.to(torch.float32)


def factors_to_subspaces(A0: torch.Tensor, B0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ``A0 = sqrt(S)·Vhᵀ`` rows and ``B0 = U·sqrt(S)`` columns back to ``U (m×k), S (k), V (n×k)``."""
    S = A0.pow(2).sum(dim=1)  # rows of Vh have unit norm
    root = S.sqrt().clamp_min(1e-30)
    return B0 / root[None, :], S, (A0 / root[:, None]).t()


def agreement(U_ref, V_ref, s_ref, W, A0, B0, r: int) -> dict:
    """Subspace agreement of estimated factors with the true top-k singular subspaces."""
    k = A0.shape[0]
    U, _, V = factors_to_subspaces(A0, B0)
    cv = torch.linalg.svdvals(V_ref[:, :k].t() @ V).clamp(max=1.0)
    cu = torch.linalg.svdvals(U_ref[:, :k].t() @ U).clamp(max=1.0)
    slices = []
    for j in range(k // r):
        sl = slice(j * r, (j + 1) * r)
        c = torch.linalg.svdvals(V_ref[:, sl].t() @ V[:, sl]).clamp(max=1.0)
        slices.append(float(c.pow(2).mean()))
    err = torch.linalg.matrix_norm(W.double() - B0.double() @ A0.double()).item()  # fp64: no reduction error
    opt = s_ref[k:].double().pow(2).sum().sqrt().item()
    return {"mean_cos2_right": float(cv.pow(2).mean()), "min_cos2_right": float(cv.min().pow(2)),
            "mean_cos2_left": float(cu.pow(2).mean()), "min_cos2_left": float(cu.min().pow(2)),
            "worst_slice_mean_cos2": min(slices) if slices else float("nan"),
            "rel_frob_error_vs_optimal": err / opt if opt > 0 else float("nan")}


def run(sizes=(1024, 2048, 4096), ks=(32, 128), alphas=(0.5, 1.0), reps=3, r=16, threads=1,
        time_exact_all_alphas=False) -> dict:
    """Time the three methods interleaved and measure agreement; returns rows (one per size, α, k, method)."""
    torch.set_num_threads(threads)
    rows = []
    for n in sizes:
        for ai, alpha in enumerate(alphas):
            W, U_ref, s_ref, V_ref = test_matrix(n, alpha, seed=n)
            ks_here = [k for k in ks if k <= n]
            # Every configuration (method, k) is one "contender"; exact SVD computes all k at once.
            contenders = [("exact", max(ks_here))] if (ai == 0 or time_exact_all_alphas) else []
            contenders += [(m, k) for m in METHODS if m != "exact" for k in ks_here]
            times = {c: [] for c in contenders}
            last = {}
            for rep in range(reps):
                order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
                for method, k in order:
                    t0 = time.perf_counter()
                    A0, B0 = factors(W, k, method, seed=rep)
                    times[(method, k)].append(time.perf_counter() - t0)
                    last[(method, k)] = (A0, B0)
            for method, kmax in contenders:
                A0, B0 = last[(method, kmax)]
                for k in (ks_here if method == "exact" else [kmax]):
                    agree = agreement(U_ref, V_ref, s_ref, W, A0[:k], B0[:, :k], r)
                    rows.append({"n": n, "alpha": alpha, "k": k, "method": method,
                                 "seconds_median": median(times[(method, kmax)]), "seconds": times[(method, kmax)],
                                 **agree})
            print(f"[init_svd] {n}² α={alpha}: done", flush=True)
    return {"rows": rows}


def report(res: dict, info: dict) -> None:
    rows = res["rows"]
    exact_t = {(row["n"]): row["seconds_median"] for row in rows if row["method"] == "exact"}
    table = []
    for row in rows:
        speedup = exact_t.get(row["n"], float("nan")) / row["seconds_median"]
        table.append([f"{row['n']}²", row["alpha"], row["k"], row["method"], f"{row['seconds_median']:.3f}",
                      f"{speedup:.1f}×", f"{row['mean_cos2_right']:.4f}", f"{row['min_cos2_right']:.3f}",
                      f"{row['mean_cos2_left']:.4f}", f"{row['worst_slice_mean_cos2']:.3f}",
                      f"{row['rel_frob_error_vs_optimal']:.5f}"])
    print_table(["matrix", "α", "K·r", "method", "seconds", "speed-up vs exact", "mean cos² (V)", "min cos² (V)",
                 "mean cos² (U)", "worst slice mean cos²", "‖W−B0A0‖/optimal"], table,
                title=f"Init of the top K·r directions ({env_line(info)}); medians of repeated, interleaved runs")


def plot(res: dict, info: dict, figures_dir) -> str:
    rows = res["rows"]
    fig = new_figure(figsize=(14, 4.6), layout="constrained")
    ax_t, ax_a = fig.subplots(1, 2)
    sizes = sorted({row["n"] for row in rows})
    alphas = sorted({row["alpha"] for row in rows})
    ks = sorted({row["k"] for row in rows})
    styles = {"exact": ("k", "o"), "rand n_iter=2": ("#DD8452", "s"), "rand n_iter=4": ("#4C72B0", "^"),
              "rand n_iter=4, q=2k": ("#55A868", "D")}
    for method, (color, marker) in styles.items():
        for k in ks if method != "exact" else [None]:
            pts = [(row["n"], row["seconds_median"]) for row in rows if row["method"] == method
                   and row["alpha"] == alphas[0] and (k is None or row["k"] == k)]
            if method == "exact":
                pts = sorted(dict(pts).items())
            if pts:
                ax_t.plot(*zip(*pts), color=color, marker=marker, linestyle="-" if k in (None, ks[0]) else ":",
                          label=method if k is None else f"{method}, K·r={k}")
    ax_t.set_xscale("log", base=2)
    ax_t.set_yscale("log")
    ax_t.set_xticks(sizes, [f"{n}²" for n in sizes])
    ax_t.set_xlabel("matrix")
    ax_t.set_ylabel("seconds (median)")
    ax_t.set_title("Time to the top K·r factors (one CPU thread)", fontsize=10)
    ax_t.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    for method, (color, marker) in styles.items():
        for alpha in alphas:
            for k in ks:
                pts = [(row["n"], row["mean_cos2_right"]) for row in rows if row["method"] == method
                       and row["alpha"] == alpha and row["k"] == k]
                if pts:
                    ax_a.plot(*zip(*pts), color=color, marker=marker, alpha=1.0 if alpha == alphas[0] else 0.5,
                              linestyle="-" if k == ks[0] else ":", label=f"{method}, K·r={k}, α={alpha}")
    ax_a.set_xscale("log", base=2)
    ax_a.set_xticks(sizes, [f"{n}²" for n in sizes])
    ax_a.set_xlabel("matrix")
    ax_a.set_ylabel("mean cos² of principal angles (right subspace)")
    ax_a.set_title("Agreement with the true top-K·r subspace (σ_i = i^−α)", fontsize=10)
    ax_a.grid(True, alpha=0.3)
    ax_a.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, "init_svd.png", info, figures_dir)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--ks", type=int, nargs="+", default=[32, 128], help="K·r values (e.g. 2·16, 8·16)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0], help="power-law exponents of σ_i")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--r", type=int, default=16, help="per-device slice width for the per-slice agreement")
    ap.add_argument("--threads", type=int, default=1)
    add_output_args(ap)
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    info = env_info(threads=args.threads)
    res = run(args.sizes, args.ks, args.alphas, args.reps, args.r, args.threads)
    info["threads_per_process"] = args.threads
    finish_env(info)
    report(res, info)
    res.update(env=info, args={k: v for k, v in vars(args).items() if k not in ("results_dir", "figures_dir")})
    if args.figure:
        print("figure:", os.path.relpath(plot(res, info, args.figures_dir)))
    write_json("init_svd.json", res, args.results_dir)
    return res


if __name__ == "__main__":
    main()
