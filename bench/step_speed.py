"""Speed and memory of one optimizer step: HD-PiSSA vs PEFT LoRA vs PEFT PiSSA vs full FT vs official-style.

Same Llama-style model (built from a config), same data, same r, same batch for every method. All methods live in
each process at once and are timed INTERLEAVED (round-robin, rotating order), so load from other jobs on the
machine hits them alike; medians over all measured steps, a step counted as slow as its slowest rank.

    python -m bench.step_speed                      # CPU: gloo, 2 and 4 processes, preset "cpu"
    python -m bench.step_speed --nproc 2 --rounds 2 --steps 2 --no-memory   # quicker
    python -m bench.step_speed --device cuda --backend nccl --dtype bf16 --preset 1b --nproc 1 --batch 4 --seq 1024

Per method it reports forward+backward time (data-parallel baselines include their DDP gradient all-reduce there),
optimizer(+fold) time, the fold and gather time, and memory: bytes of weights / gradients / optimizer state /
saved activations counted tensor by tensor, and the peak RSS of a separate process per method (CPU) or
``torch.cuda.max_memory_allocated`` (GPU). The fold+gather fraction at the paper's accumulation (64) is projected
from the measured micro-step and optimizer/fold times: ``fold / (64·fwd_bwd + opt_fold)``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from bench import _common as common
from hdpissa_trl.engine.distributed import world_and_rank

ALL_METHODS = ("hdpissa", "lora", "pissa", "full", "official")
# Not in the default set (its tables predate it): HD-PiSSA with slice_gradient="global" (--methods ...,hdpissa_global).
OPTIONAL_METHODS = ("hdpissa_global",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TIME_KEYS = ("step", "fwd_bwd", "opt_fold", "fold", "gather", "wait")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, nargs="+", default=[2, 4], help="process counts K to run (one run each)")
    ap.add_argument("--preset", default="cpu", help="model preset: tiny | cpu | 1b")
    ap.add_argument("--methods", default=",".join(ALL_METHODS),
                    help=f"comma-separated, from {', '.join(ALL_METHODS + OPTIONAL_METHODS)} (default: all but "
                         f"{', '.join(OPTIONAL_METHODS)})")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--batch", type=int, default=4, help="micro-batch size per process")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per measured optimizer step")
    ap.add_argument("--paper_accum", type=int, default=64, help="accumulation used for the projected fraction")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per method per round")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default=None, help="gloo (CPU default) or nccl")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes")
    ap.add_argument("--tag", default="", help="suffix of the result/figure file names")
    common.add_output_args(ap, worker=True)
    return ap


# ---------------------------------------------------------------------------------------------------- one device
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_batches(step: int, rank: int, accum: int, batch: int, seq: int, vocab: int, device: str) -> list:
    """Micro-batches of random tokens, different per (step, rank, micro), identical across methods."""
    out = []
    for i in range(accum):
        g = torch.Generator().manual_seed(1_000_003 * step + 1009 * rank + i)
        out.append(torch.randint(0, vocab, (batch, seq), generator=g).to(device))
    return out


def train_step(setup, opt, batches: list, device: str) -> dict:
    """One optimizer step over ``batches`` (gradient accumulation), timed in its two phases.

    ``fwd_bwd``: all micro-batches' forward+backward (DDP's gradient all-reduce included); ``opt_fold``: the rest
    (optimizer, then for HD-PiSSA / official-style a rank barrier ``wait`` and the ``fold`` with its ``gather``).
    """
    accum = len(batches)
    _sync(device)
    t0 = time.perf_counter()
    total = 0.0
    for i, ids in enumerate(batches):
        with setup.no_sync(last_micro=i == accum - 1):
            loss = setup.model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
        total += float(loss.detach())
    _sync(device)
    t1 = time.perf_counter()
    if setup.after_backward is not None:
        setup.after_backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    wait = 0.0
    if setup.after_step is not None and world_and_rank()[0] > 1:
        # The fold's gather is the first point where the ranks meet: without this barrier its time would include
        # waiting for the slowest rank (load skew), which is not communication. Timed apart as `wait`; it stays
        # in the step time (DDP baselines pay the same skew inside their backward all-reduce).
        tw = time.perf_counter()
        dist.barrier()
        wait = time.perf_counter() - tw
    fold = setup.after_step() if setup.after_step is not None else {"seconds": 0.0, "gather_seconds": 0.0}
    _sync(device)
    t2 = time.perf_counter()
    return {"step": t2 - t0, "fwd_bwd": t1 - t0, "opt_fold": t2 - t1, "fold": fold["seconds"],
            "gather": fold["gather_seconds"], "wait": wait, "loss": total}


def accounted_memory(setup, opt, sample: torch.Tensor) -> dict:
    """Bytes per category, counted tensor by tensor (unique storages)."""
    inner = setup.inner
    state_storages: dict[int, int] = {}
    for t in list(inner.parameters()) + list(inner.buffers()):
        st = t.untyped_storage()
        state_storages[st.data_ptr()] = st.nbytes()
    weights = sum(state_storages.values())
    grads = sum(p.numel() * p.element_size() for p in setup.params)
    optim = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    extra = 0
    if setup.name in common.HDPISSA_METHODS:
        extra = sum(t.numel() * t.element_size() for u in setup.engine.updaters for t in u.state().values())
        # slice_gradient="global": the every-slice gradient buffers are gradient memory
        grads += sum(t.numel() * t.element_size() for layer in setup.engine.layers for t in (layer.slice_grads or ()))
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in state_storages:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = inner(input_ids=sample, labels=sample).loss
    del loss
    return {"weights_and_buffers": weights, "grads": grads, "optimizer_state": optim, "precision_state": extra,
            "saved_activations": sum(saved.values())}


def measure_methods(methods, preset="cpu", r=16, alpha=16.0, batch=4, seq=128, accum=1, rounds=4, steps=3,
                    lr=1e-4, device="cpu", dtype="fp32", rank=0, world=1, distributed=False) -> dict:
    """Set every method up on its own copy of the same model and time them interleaved. Returns raw records.

    Works in a single process (``distributed=False``) as well as on every rank of a torchrun job.
    """
    setups, opts = {}, {}
    for name in methods:
        model = common.build_llama(preset, seed=0, dtype=DTYPES[dtype]).to(device)
        setups[name] = common.setup_method(name, model, r, alpha, world=world, rank=rank, distributed=distributed)
        opts[name] = torch.optim.AdamW(setups[name].params, lr=lr, weight_decay=0.0)
    vocab = setups[methods[0]].inner.config.vocab_size
    records = {name: [] for name in methods}
    step_no = 0
    for rnd in range(rounds):
        order = list(methods[rnd % len(methods):]) + list(methods[:rnd % len(methods)])
        for name in order:
            n = steps + (1 if rnd == 0 else 0)  # one warm-up step per method in the first round
            for i in range(n):
                batches = make_batches(step_no, rank, accum, batch, seq, vocab, device)
                if distributed:
                    dist.barrier()
                rec = train_step(setups[name], opts[name], batches, device)
                if not (rnd == 0 and i == 0):
                    records[name].append(rec)
                step_no += 1
    sample = make_batches(0, rank, 1, batch, seq, vocab, device)[0]
    memory = {name: accounted_memory(setups[name], opts[name], sample) for name in methods}
    extra = {}
    if "hdpissa" in setups:
        eng = setups["hdpissa"].engine
        extra["hdpissa_update_rank_bound"] = eng.update_rank_bound()
        extra["num_adapted_layers"] = len(eng.layers)
    return {"records": records, "memory": memory, **extra}


def merge_ranks(all_records: list[dict]) -> dict:
    """Per method and step, the slowest rank's time (a step is as slow as its slowest device)."""
    merged = {}
    for name in all_records[0]:
        steps = []
        for recs in zip(*(r[name] for r in all_records)):
            steps.append({k: max(rec[k] for rec in recs) for k in TIME_KEYS} | {"loss": recs[0]["loss"]})
        merged[name] = steps
    return merged


def summarize(records: dict, accum: int, paper_accum: int) -> dict:
    """Medians per method and the ratios the issue's targets are about."""
    summary = {}
    for name, recs in records.items():
        summary[name] = {k: common.median(rec[k] for rec in recs) for k in TIME_KEYS}
        summary[name]["n_steps"] = len(recs)
    ratios = {}
    if "hdpissa" in summary:
        h = summary["hdpissa"]
        micro_h = h["fwd_bwd"] / accum
        ratios["hdpissa_fold_fraction_measured"] = h["fold"] / h["step"]
        ratios["hdpissa_gather_fraction_measured"] = h["gather"] / h["step"]
        ratios["hdpissa_fold_fraction_at_paper_accum"] = h["fold"] / (paper_accum * micro_h + h["opt_fold"])
        if "lora" in summary:
            lo = summary["lora"]
            ratios["hdpissa_over_lora_step"] = h["step"] / lo["step"]
            ratios["hdpissa_over_lora_fwd_bwd"] = h["fwd_bwd"] / lo["fwd_bwd"]
            ratios["hdpissa_over_lora_step_at_paper_accum"] = (paper_accum * micro_h + h["opt_fold"]) / (
                paper_accum * lo["fwd_bwd"] / accum + lo["opt_fold"])
        for other in ("official", "full", "pissa", "hdpissa_global"):
            if other in summary:
                ratios[f"{other}_over_hdpissa_step"] = summary[other]["step"] / h["step"]
        if "official" in summary:
            o = summary["official"]
            ratios["official_over_hdpissa_step_at_paper_accum"] = (
                paper_accum * o["fwd_bwd"] / accum + o["opt_fold"]) / (paper_accum * micro_h + h["opt_fold"])
            ratios["official_fold_over_hdpissa_fold"] = o["fold"] / h["fold"] if h["fold"] else float("nan")
    return {"per_method": summary, "ratios": ratios}


def worker(args) -> None:
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
    if args.memory_only:
        out = _memory_only(args, rank, world, device)
    else:
        res = measure_methods(args.methods.split(","), args.preset, args.r, args.alpha, args.batch, args.seq,
                              args.accum, args.rounds, args.steps, args.lr, device if args.device == "cuda" else "cpu",
                              args.dtype, rank, world, distributed=True)
        gathered = [None] * world
        dist.all_gather_object(gathered, res["records"])
        out = dict(res, records=merge_ranks(gathered))
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def _memory_only(args, rank: int, world: int, device: str) -> dict:
    """One method in a fresh process: peak RSS (CPU) or peak allocated GPU memory over a few steps."""
    name = args.memory_only
    # Warm up imports and allocator with the tiny preset first, so the baseline excludes library import memory.
    warm = common.setup_method(name, common.build_llama("tiny", seed=0).to(device), 2, 2.0, world=world, rank=rank,
                        distributed=True)
    ids = torch.zeros(1, 8, dtype=torch.long, device=device)
    warm.model(input_ids=ids, labels=ids).loss.backward()
    del warm, ids
    base_rss = common.rss_bytes()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = common.build_llama(args.preset, seed=0, dtype=DTYPES[args.dtype]).to(device)
    setup = common.setup_method(name, model, args.r, args.alpha, world=world, rank=rank, distributed=True)
    opt = torch.optim.AdamW(setup.params, lr=args.lr, weight_decay=0.0)
    vocab = setup.inner.config.vocab_size
    for step in range(3):
        train_step(setup, opt, make_batches(step, rank, args.accum, args.batch, args.seq, vocab, device), args.device)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else common.peak_rss_bytes() - base_rss
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    return {"method": name, "peak_bytes": max(peaks), "kind": "cuda_max_allocated" if args.device == "cuda"
            else "peak_rss_minus_import_baseline"}


# ------------------------------------------------------------------------------------------------------ launcher
def _run_worker(args, nproc: int, extra: dict, timeout: float = 600) -> dict:
    """Launch this module under torchrun; the workers read their settings from a JSON file (no CLI re-parsing)."""
    cfg = {k: v for k, v in vars(args).items() if k not in ("results_dir", "figures_dir")}
    return common.launch_workers(__spec__.name, nproc, dict(cfg, **extra), timeout, threads=args.threads)


def report(results: dict, args) -> None:
    methods = args.methods.split(",")
    for key, res in results["runs"].items():
        s = res["summary"]["per_method"]
        rows = []
        for m in methods:
            mem = res["memory"][m]
            state = mem["weights_and_buffers"] + mem["grads"] + mem["optimizer_state"] + mem["precision_state"]
            peak = res.get("peak", {}).get(m)
            rows.append([common.METHOD_LABELS[m], f"{s[m]['step'] * 1e3:.1f}", f"{s[m]['step'] / s['lora']['step']:.3f}"
                         if "lora" in s else "-", f"{s[m]['fwd_bwd'] * 1e3:.1f}", f"{s[m]['opt_fold'] * 1e3:.1f}",
                         f"{s[m]['fold'] * 1e3:.1f}", f"{s[m]['gather'] * 1e3:.1f}", f"{s[m]['wait'] * 1e3:.1f}",
                         common.fmt_bytes(state),
                         common.fmt_bytes(mem["saved_activations"]), common.fmt_bytes(peak) if peak is not None else "-"])
        common.print_table(["method", "step ms", "× LoRA", "fwd+bwd ms", "opt+fold ms", "fold ms", "gather ms",
                     "rank wait ms", "weights+grads+optim", "saved activations", "peak mem"], rows,
                    title=f"K = {key} processes, accum {args.accum}, micro-batch {args.batch}×{args.seq}, r={args.r} "
                          f"({common.env_line(res['env'])}); medians of {s[methods[0]]['n_steps']} steps")
        rat = res["summary"]["ratios"]
        print("ratios:", json.dumps({k: round(v, 4) for k, v in rat.items()}, sort_keys=True))


def plot(results: dict, args, figures_dir: str | None) -> str:
    methods = args.methods.split(",")
    runs = list(results["runs"].items())
    fig = common.new_figure(figsize=(5.2 * len(runs), 4.6), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    colors = {"fwd_bwd": "#4C72B0", "opt": "#55A868", "fold": "#C44E52"}
    for ax, (key, res) in zip(axes, runs):
        s = res["summary"]["per_method"]
        xs = range(len(methods))
        fb = [s[m]["fwd_bwd"] * 1e3 for m in methods]
        fold = [s[m]["fold"] * 1e3 for m in methods]
        wait = [s[m]["wait"] * 1e3 for m in methods]
        opt = [max(s[m]["opt_fold"] * 1e3 - f - w, 0.0) for m, f, w in zip(methods, fold, wait)]
        bottom = list(fb)
        ax.bar(xs, fb, color=colors["fwd_bwd"], label="forward+backward (DDP all-reduce incl.)")
        for vals, color, label in ((opt, colors["opt"], "optimizer"), (wait, "0.7", "rank wait (load skew)"),
                                   (fold, colors["fold"], "fold (incl. gather)")):
            ax.bar(xs, vals, bottom=bottom, color=color, label=label)
            bottom = [a + b for a, b in zip(bottom, vals)]
        ax.set_xticks(list(xs), [common.METHOD_LABELS[m].replace(" (", "\n(") for m in methods], fontsize=8)
        ax.set_ylabel("ms per optimizer step (median)")
        ax.set_ylim(0, 1.18 * max(bottom))
        ax.set_title(f"K = {key} processes, micro-batch {args.batch}×{args.seq}, accum {args.accum}", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Step time, Llama-style preset '{args.preset}', r={args.r} (lower is better)")
    info = dict(next(iter(results["runs"].values()))["env"])
    info["processes"] = "/".join(str(k) for k in results["runs"])
    return common.save_figure(fig, f"step_speed{args.tag}.png", info, figures_dir)


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_or_run_worker(build_parser(), lambda settings: worker(argparse.Namespace(**settings)), argv)
    results = {"args": {k: v for k, v in vars(args).items() if k not in ("results_dir", "figures_dir", "worker")},
               "runs": {}}
    for nproc in args.nproc:
        info = common.env_info(nproc=nproc, backend=args.backend or ("nccl" if args.device == "cuda" else "gloo"),
                        device=args.device, threads=args.threads)
        print(f"[step_speed] K={nproc}: timing {args.methods} interleaved ...", flush=True)
        raw = _run_worker(args, nproc, {"memory_only": None})
        res = {"env": info, "records": raw["records"], "memory": raw["memory"],
               "summary": summarize(raw["records"], args.accum, args.paper_accum),
               "hdpissa_update_rank_bound": raw.get("hdpissa_update_rank_bound"),
               "num_adapted_layers": raw.get("num_adapted_layers")}
        if args.memory:
            res["peak"] = {}
            for m in args.methods.split(","):
                print(f"[step_speed] K={nproc}: peak memory of {m} in a fresh process ...", flush=True)
                res["peak"][m] = _run_worker(args, nproc, {"memory_only": m})["peak_bytes"]
        common.finish_env(info)
        results["runs"][str(nproc)] = res
    report(results, args)
    if args.figure:
        print("figure:", os.path.relpath(plot(results, args, args.figures_dir)))
    common.write_json(f"step_speed{args.tag}.json", results, args.results_dir)
    return results


if __name__ == "__main__":
    main()
