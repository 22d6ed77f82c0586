"""Precision modes of the full weight W: memory, and their effect on training loss vs an fp32 run.

Modes (``HDPiSSAConfig.precision``) on a bf16 model: ``fp32`` (fp32 master copy), ``bf16_kahan`` (bf16 W + bf16
compensation), ``bf16_sr`` (bf16 W, stochastic rounding), ``model`` (plain bf16 add — loses small updates); plus the
reference: the same model kept in fp32. Single process (K = 1), the multi-task demo data (``bench/_tasks.py``), the
same batches for every mode, all modes stepped INTERLEAVED (so their fold times are comparable), two learning rates.

    python -m bench.precision
    python -m bench.precision --steps 50 --lrs 1e-4

Reported: bytes per adapted weight entry and in total (weights + precision state + adapters) measured from the
engine's tensors, and projected to the "1b" preset; final eval loss; and how well the accumulated update survives:
``‖ΔW_mode − ΔW_ref‖ / ‖ΔW_ref‖`` and ``‖ΔW_mode‖ / ‖ΔW_ref‖`` with ΔW_ref the bf16 + fp32-master run (same forward
arithmetic) — plain bf16 keeps only part of the update, the compensated modes should track fp32.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from bench._common import (
    PRESETS,
    add_output_args,
    env_info,
    env_line,
    finish_env,
    fmt_bytes,
    median,
    new_figure,
    print_table,
    quiet_hf,
    save_figure,
    write_json,
)
from hdpissa_trl import HDPiSSAConfig, inject_hdpissa

# (label, model dtype, precision mode)
MODES = [
    ("fp32 weights (reference)", torch.float32, "fp32"),
    ("bf16 + fp32 master", torch.bfloat16, "fp32"),
    ("bf16 + Kahan", torch.bfloat16, "bf16_kahan"),
    ("bf16 + stochastic rounding", torch.bfloat16, "bf16_sr"),
    ("plain bf16", torch.bfloat16, "model"),
]
REF = "bf16 + fp32 master"


def adapted_numel(preset: dict) -> int:
    """Entries of all block linears of a Llama-style preset (what HD-PiSSA's 'all-linear' adapts)."""
    h, i, L = preset["hidden_size"], preset["intermediate_size"], preset["num_layers"]
    kv = h // preset["num_heads"] * preset["num_kv_heads"]
    return L * (2 * h * h + 2 * kv * h + 3 * h * i)


def memory_of(engine, model) -> dict:
    """Bytes measured from the tensors: W of adapted layers, precision state, adapters + A0/B0, whole model."""
    w = sum(lyr.base_layer.weight.numel() * lyr.base_layer.weight.element_size() for lyr in engine.layers)
    numel = sum(lyr.base_layer.weight.numel() for lyr in engine.layers)
    state = sum(t.numel() * t.element_size() for u in engine.updaters for t in u.state().values())
    adapters = sum(t.numel() * t.element_size() for lyr in engine.layers
                   for t in (lyr.lora_A, lyr.lora_B, lyr.A0_all, lyr.B0_all))
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) + state
    return {"adapted_entries": numel, "W_bytes": w, "precision_state_bytes": state,
            "bytes_per_entry": (w + state) / numel, "adapter_bytes": adapters, "model_total_bytes": total}


def run(base_dir: str, lrs=(1e-4, 1e-3), steps: int = 200, r: int = 8, eval_every: int = 25, seed: int = 0) -> dict:
    """Train one HD-PiSSA model per mode and lr (K = 1), interleaved step by step."""
    from bench._tasks import MultiTaskLM

    task = MultiTaskLM(base_dir, seed=seed, batch=8)
    out = {"runs": {}, "memory": {}}
    for lr in lrs:
        runs = {}
        for label, dtype, mode in MODES:
            model = task.new_student().to(dtype)
            w0 = {n: model.get_submodule(n).weight.detach().float().clone()
                  for n in [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                            and m is not model.get_output_embeddings()]}
            engine = inject_hdpissa(model, HDPiSSAConfig(r=r, lora_alpha=float(r), precision=mode, seed=seed,
                                                         sync_check_steps=0), show_progress=False)
            opt = torch.optim.AdamW(engine.adapter_parameters(), lr=lr, weight_decay=0.0)
            runs[label] = {"model": model, "engine": engine, "opt": opt, "w0": w0, "curve": [(0, task.evaluate(model))],
                           "fold_seconds": [], "train_loss": []}
            if lr == lrs[0]:
                out["memory"][label] = memory_of(engine, model)
        for step in range(steps):
            batch = task.train_batch(step, 0)
            for label in runs:  # interleaved: every mode does step `step` before any does `step + 1`
                run_ = runs[label]
                loss = task.loss(run_["model"], batch)
                loss.backward()
                run_["opt"].step()
                run_["opt"].zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                run_["engine"].fold()
                run_["fold_seconds"].append(time.perf_counter() - t0)
                run_["train_loss"].append(float(loss.detach()))
                if (step + 1) % eval_every == 0 or step + 1 == steps:
                    run_["curve"].append((step + 1, task.evaluate(run_["model"])))
        deltas = {}
        for label, run_ in runs.items():
            eng = run_["engine"]
            deltas[label] = {n: lyr.base_layer.weight.detach().float() - run_["w0"][n]
                             for n, lyr in zip(eng.names, eng.layers)}
        ref = deltas[REF]
        ref_norm = torch.sqrt(sum(d.pow(2).sum() for d in ref.values())).item()
        res = {}
        for label, run_ in runs.items():
            d = deltas[label]
            err = torch.sqrt(sum((d[n] - ref[n]).pow(2).sum() for n in ref)).item()
            norm = torch.sqrt(sum(v.pow(2).sum() for v in d.values())).item()
            res[label] = {"initial_eval_loss": run_["curve"][0][1]["eval_loss"],
                          "final_eval_loss": run_["curve"][-1][1]["eval_loss"],
                          "final_token_acc": run_["curve"][-1][1]["token_acc"],
                          "train_loss_last20": sum(run_["train_loss"][-20:]) / 20,
                          "curve": [(s, m["eval_loss"]) for s, m in run_["curve"]],
                          "deltaW_rel_error_vs_ref": err / ref_norm, "deltaW_norm_ratio_vs_ref": norm / ref_norm,
                          "fold_ms_median": 1e3 * median(run_["fold_seconds"][1:])}
        out["runs"][str(lr)] = res
    return out


def report(res: dict, info: dict, args) -> None:
    big = adapted_numel(PRESETS["1b"])
    rows = []
    for label, mem in res["memory"].items():
        rows.append([label, f"{mem['bytes_per_entry']:.2f}", fmt_bytes(mem["W_bytes"]),
                     fmt_bytes(mem["precision_state_bytes"]), fmt_bytes(mem["model_total_bytes"]),
                     fmt_bytes(mem["bytes_per_entry"] * big)])
    print_table(["mode", "bytes per W entry", "W (adapted layers)", "precision state", "model total",
                 "1b preset: W + state (projected)"], rows,
                title=f"Memory of the W precision modes (measured on the tensors; {env_line(info)})")
    for lr, runs in res["runs"].items():
        ref_loss = runs[MODES[0][0]]["final_eval_loss"]
        rows = []
        for label, v in runs.items():
            rows.append([label, f"{v['initial_eval_loss']:.4f}", f"{v['final_eval_loss']:.4f}", f"{v['final_eval_loss'] - ref_loss:+.4f}",
                         f"{v['final_token_acc']:.3f}", f"{v['deltaW_rel_error_vs_ref']:.4f}",
                         f"{v['deltaW_norm_ratio_vs_ref']:.3f}", f"{v['fold_ms_median']:.2f}"])
        print_table(["mode", "initial eval loss", "final eval loss", "vs fp32 weights", "token acc", "‖ΔW−ΔW_ref‖/‖ΔW_ref‖",
                     "‖ΔW‖/‖ΔW_ref‖", "fold ms (median)"], rows,
                    title=f"lr {lr}, {args.steps} steps, r={args.r}, K=1 (ΔW_ref: {REF})")


def plot(res: dict, info: dict, args, figures_dir) -> str:
    lrs = list(res["runs"])
    fig = new_figure(figsize=(5.5 * len(lrs), 4.2), layout="constrained")
    axes = fig.subplots(1, len(lrs), squeeze=False)[0]
    styles = ["k-", "C0-", "C2--", "C1-.", "C3:"]
    for ax, lr in zip(axes, lrs):
        for (label, _, _), st in zip(MODES, styles):
            curve = res["runs"][lr][label]["curve"]
            ax.plot([c[0] for c in curve], [c[1] for c in curve], st, label=label, linewidth=1.6)
        ax.set_title(f"HD-PiSSA K=1, r={args.r}, AdamW lr {lr}", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("eval completion loss (multi-task demo data)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Effect of the W precision mode on loss (bf16 model; reference: fp32 model)")
    return save_figure(fig, "precision.png", info, figures_dir)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--eval_every", type=int, default=25)
    ap.add_argument("--pretrain_steps", type=int, default=150)
    ap.add_argument("--quick", action="store_true", help="tiny model (smoke tests)")
    add_output_args(ap)
    return ap


def main(argv: list[str] | None = None) -> dict:
    from bench._tasks import prepare_multitask_base
    from bench.quality import MODEL, QUICK_MODEL

    args = build_parser().parse_args(argv)
    quiet_hf()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    info = env_info(nproc=1, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_multitask_base(os.path.join(tmp, "base"), dict(QUICK_MODEL if args.quick else MODEL,
                                                                      vocab_size=512), args.pretrain_steps)
        res = run(base, args.lrs, args.steps, args.r, args.eval_every)
    finish_env(info)
    report(res, info, args)
    res.update(env=info, args={k: v for k, v in vars(args).items() if k not in ("results_dir", "figures_dir")})
    if args.figure:
        print("figure:", os.path.relpath(plot(res, info, args, args.figures_dir)))
    write_json("precision.json" if not args.quick else "precision_quick.json", res, args.results_dir)
    return res


if __name__ == "__main__":
    main()
