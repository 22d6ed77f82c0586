"""Quality at equal per-device rank and equal steps: HD-PiSSA vs LoRA vs PiSSA vs full FT, K = 1, 2, 4 processes.

Real torchrun gloo processes, one launch per K. Data-parallel baselines average their gradients over the K processes
(one flat all_reduce per step: DDP's arithmetic); HD-PiSSA keeps per-device gradients and folds every step. Every
method sees the same K·batch examples per step. Two tasks (see ``bench/_tasks.py``):

(a) teacher–student: the student must absorb a FULL-RANK change of the teacher's block linears (regression on the
    teacher's logits; eval = MSE relative to the initial student's, 1.0 = no progress);
(b) multi-task mix: the demo data's math + code + text completions, on a tiny Llama pretrained on the prompts
    (eval = completion loss averaged over the three held-out sets, and teacher-forced token accuracy).

Several seeds (model, teacher change, data order, LoRA init), mean ± standard deviation. Each method runs at its own
learning rate for the task and K (``DEFAULT_LR``, picked by ``--sweep``). Also the singular values of
the accumulated update ΔW = W_final − W_init per method (numerical rank and entropy effective rank computed with
``hdpissa_trl.analysis.update_spectrum``), and PNG plots of loss curves and spectra.

    python -m bench.quality                          # K = 1, 2, 4; 3 seeds; ~7-10 min on 2 CPU cores
    python -m bench.quality --nproc 1 2 --seeds 0 --steps 40      # quick look
    python -m bench.quality --sweep                  # the learning-rate probe behind DEFAULT_LR (K = 1, 2, 4)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist

from bench import _common as common
from hdpissa_trl.analysis.update_spectrum import effective_rank, numerical_rank

METHODS = ("hdpissa", "lora", "pissa", "full")
TASK_NAMES = ("teacher_student", "multitask")
# Learning rates (AdamW, constant) per task, K and method: the picks of `--sweep` (first seed, best final eval loss
# over SWEEP_GRID, separately for every K — the best rate of HD-PiSSA moves with K because K slices' updates add up);
# see BENCHMARKS.md for the probe's table.
DEFAULT_LR = {
    "teacher_student": {"1": {"hdpissa": 1e-2, "lora": 3e-3, "pissa": 3e-3, "full": 1e-3},
                        "2": {"hdpissa": 3e-3, "lora": 3e-3, "pissa": 1e-2, "full": 1e-3},
                        "4": {"hdpissa": 3e-3, "lora": 3e-3, "pissa": 1e-2, "full": 1e-3}},
    "multitask": {"1": {"hdpissa": 1e-2, "lora": 1e-2, "pissa": 1e-2, "full": 1e-3},
                  "2": {"hdpissa": 3e-3, "lora": 1e-2, "pissa": 1e-2, "full": 3e-3},
                  "4": {"hdpissa": 3e-3, "lora": 1e-2, "pissa": 1e-2, "full": 3e-3}},
}
SWEEP_GRID = {"hdpissa": [1e-3, 3e-3, 1e-2, 3e-2], "lora": [1e-3, 3e-3, 1e-2, 3e-2],
              "pissa": [1e-3, 3e-3, 1e-2, 3e-2], "full": [3e-4, 1e-3, 3e-3]}
MODEL = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
QUICK_MODEL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)


def lr_table(overrides: list[str]) -> dict:
    """``DEFAULT_LR`` plus ``METHOD=LR`` overrides (which apply to every task and K)."""
    out = {"by_task_K": DEFAULT_LR, "override": {}}
    for item in overrides:
        method, _, value = item.partition("=")
        if method not in METHODS or not value:
            raise SystemExit(f"--lr expects METHOD=LR with METHOD in {METHODS}, got {item!r}")
        out["override"][method] = float(value)
    return out


def lr_for(lrs: dict, task: str, K: int, method: str) -> float:
    """The learning rate of ``method`` on ``task`` with K processes (the nearest tabulated K if K is not listed)."""
    if method in lrs["override"]:
        return lrs["override"][method]
    by_k = lrs["by_task_K"][task]
    key = str(K) if str(K) in by_k else min(by_k, key=lambda k: abs(int(k) - K))
    return by_k[key][method]


def make_task(name: str, seed: int, cfg: dict):
    from bench._tasks import MultiTaskLM, TeacherStudentTask

    if name == "teacher_student":
        return TeacherStudentTask(cfg["model"], seed=seed, batch=cfg["batch"], seq=cfg["seq"])
    return MultiTaskLM(cfg["base_dir"], seed=seed, batch=cfg["batch"])


def train_run(task, method: str, r: int, alpha: float, lr: float, steps: int, eval_every: int, seed: int,
              rank: int = 0, world: int = 1, distributed: bool = False, keep_spectra: bool = False,
              hdpissa_options: dict | None = None, ceiling_ks: tuple[int, ...] = ()) -> dict:
    """Train one method on one task for ``steps`` optimizer steps; eval curve, final metrics and ΔW spectra.

    ``hdpissa_options``: extra :class:`HDPiSSAConfig` fields (e.g. a subspace schedule). ``ceiling_ks``: at every
    eval point also record the mean share of ΔW outside the fixed top-k subspace set (``outside_k{k}``, see
    :mod:`hdpissa_trl.analysis.subspace`) for each k, and per layer at the end.
    """
    from bench._common import linear_weights
    from hdpissa_trl.analysis.subspace import outside_fractions, principal_bases

    model = task.new_student()
    names = common.block_linear_names(model)
    w0 = {n: model.get_submodule(n).weight.detach().float().clone() for n in names}
    torch.manual_seed(seed)  # identical LoRA init on every rank
    setup = common.setup_method(method, model, r, alpha, world=world, rank=rank, distributed=distributed, use_ddp=False,
                         hdpissa_options=hdpissa_options)
    opt = torch.optim.AdamW(setup.params, lr=lr, weight_decay=0.0)
    is_main = rank == 0
    bases = {k: {n: principal_bases(w, k) for n, w in w0.items()} for k in ceiling_ks} if is_main else {}

    def evaluate(step: int) -> dict:
        out = task.evaluate(setup.inner)
        if bases and step > 0:  # at step 0 ΔW is only the round-off of PEFT's W_res + s·B0A0
            w_now = linear_weights(setup)
            for k, b in bases.items():
                fr = outside_fractions(w0, w_now, k, b)
                out[f"outside_k{k}"] = sum(fr.values()) / len(fr)
                out[f"outside_k{k}_layers"] = fr
        return out

    curve = [(0, evaluate(0))] if is_main else []
    train_losses = []
    t0 = time.perf_counter()
    train_seconds = 0.0
    for step in range(steps):
        ts = time.perf_counter()
        loss = task.loss(setup.model, task.train_batch(step, rank))
        loss.backward()
        if setup.name in ("lora", "pissa", "full") and distributed:
            common.allreduce_mean_grads(setup.params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if setup.after_step is not None:
            setup.after_step()
            if getattr(setup.engine, "factors_changed", False):  # new subspace: a restart of the adapters' moments
                opt.state.clear()
        train_seconds += time.perf_counter() - ts
        train_losses.append(float(loss.detach()))
        if is_main and ((step + 1) % eval_every == 0 or step + 1 == steps):
            curve.append((step + 1, evaluate(step + 1)))
    seconds = time.perf_counter() - t0
    if not is_main:
        return {}
    w1 = linear_weights(setup)
    layers = {}
    for n in names:
        sv = torch.linalg.svdvals(w1[n] - w0[n])
        entry = {"shape": list(w0[n].shape), "numerical_rank": numerical_rank(sv),
                 "effective_rank": effective_rank(sv), "frobenius": float(sv.norm())}
        if keep_spectra:
            entry["singular_values"] = [float(f"{v:.5g}") for v in sv.tolist()]
        layers[n] = entry
    for k, b in bases.items():
        for n, fr in outside_fractions(w0, w1, k, b).items():
            layers[n][f"outside_k{k}"] = fr
    return {"method": method, "seed": seed, "lr": lr, "curve": curve, "final": curve[-1][1],
            "train_loss_last10": sum(train_losses[-10:]) / len(train_losses[-10:]), "seconds": seconds,
            "train_seconds": train_seconds, "train_losses": train_losses,
            "trainable_numel": sum(p.numel() for p in setup.params), "layers": layers}


def plan_runs(cfg: dict, K: int) -> list[dict]:
    """The (task, seed, method, lr) runs of one K: every method at its learning rate for that task and K."""
    return [{"task": t, "seed": seed, "method": m, "lr": lr_for(cfg["lr"], t, K, m)}
            for t in cfg["tasks"] for seed in cfg["seeds"] for m in cfg["methods"]]


def worker(cfg: dict) -> None:
    """One process of a K-process job: train every run of ``cfg["runs"]`` in order (rank 0 records)."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # tiny activations/optimizer states otherwise slow CPU kernels down a lot
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    runs = cfg.get("runs") or plan_runs(cfg, world)
    records, tasks = [], {}
    for run in runs:
        key = (run["task"], run["seed"])
        if key not in tasks:
            tasks.clear()  # one task alive at a time
            tasks[key] = make_task(run["task"], run["seed"], cfg)
        rec = train_run(tasks[key], run["method"], cfg["r"], cfg["alpha"], run["lr"], cfg["steps"],
                        cfg["eval_every"], run["seed"], rank, world, distributed=True,
                        keep_spectra=run["seed"] == cfg["seeds"][0] and not cfg.get("sweep"))
        if rank == 0:
            rec.update(task=run["task"], K=world)
            records.append(rec)
            print(f"[quality] K={world} {run['task']} seed={run['seed']} {run['method']} lr={run['lr']:g}: "
                  f"eval {rec['final']['eval_loss']:.4f} ({rec['seconds']:.1f}s)", flush=True)
    if rank == 0:
        with open(cfg["out"], "w", encoding="utf-8") as f:
            json.dump(records, f)
    dist.barrier()
    dist.destroy_process_group()


def run_K(K: int, cfg: dict, timeout: float = 1800) -> list[dict]:
    return common.launch_workers(__spec__.name, K, cfg, timeout, echo=True)  # this module


def sweep(cfg: dict, Ks: list[int]) -> dict:
    """Learning-rate probe: for every K (real processes), task and method, the grid ``SWEEP_GRID`` on the first
    seed; the best final eval loss picks the learning rate. Returns the table and the picks."""
    best: dict = {}
    rows = []
    for K in Ks:
        runs = [{"task": t, "seed": cfg["seeds"][0], "method": m, "lr": lr}
                for t in cfg["tasks"] for m in cfg["methods"] for lr in SWEEP_GRID[m]]
        records = run_K(K, dict(cfg, runs=runs, sweep=True))
        for rec in records:
            rows.append([rec["task"], K, common.METHOD_LABELS[rec["method"]], f"{rec['lr']:g}",
                         f"{rec['final']['eval_loss']:.4f}"])
            cur = best.setdefault(rec["task"], {}).setdefault(str(K), {}).get(rec["method"])
            if cur is None or rec["final"]["eval_loss"] < cur[0]:
                best[rec["task"]][str(K)][rec["method"]] = (rec["final"]["eval_loss"], rec["lr"])
    picks = {t: {k: {m: v[1] for m, v in ms.items()} for k, ms in byk.items()} for t, byk in best.items()}
    common.print_table(["task", "K", "method", "lr", "final eval loss"], rows,
                title=f"LR probe: first seed, {cfg['steps']} steps, r={cfg['r']} per device")
    print("best:", json.dumps(picks))
    return {"best_lr": picks, "rows": rows}


def summarize(records: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["task"], r["K"], r["method"]) for r in records},
                  key=lambda t: (TASK_NAMES.index(t[0]), t[1], METHODS.index(t[2])))
    for task, K, method in keys:
        rs = [r for r in records if (r["task"], r["K"], r["method"]) == (task, K, method)]
        finals = [r["final"]["eval_loss"] for r in rs]
        m, s = common.mean_std(finals)
        row = {"task": task, "K": K, "method": method, "n_seeds": len(rs), "eval_loss_mean": m, "eval_loss_std": s,
               "eval_loss_min": min(finals), "eval_loss_max": max(finals),
               "numerical_rank_mean": common.mean_std(common.mean_std([lay["numerical_rank"] for lay in r["layers"].values()])[0]
                                               for r in rs)[0],
               "effective_rank_mean": common.mean_std(common.mean_std([lay["effective_rank"] for lay in r["layers"].values()])[0]
                                               for r in rs)[0]}
        if "token_acc" in rs[0]["final"]:
            row["token_acc_mean"], row["token_acc_std"] = common.mean_std(r["final"]["token_acc"] for r in rs)
        out.append(row)
    return out


def report(summary: list[dict], info: dict, cfg: dict) -> None:
    for task in TASK_NAMES:
        rows = [s for s in summary if s["task"] == task]
        if not rows:
            continue
        headers = ["K", "method", "final eval loss (mean ± std)", "min … max", "ΔW numerical rank", "ΔW eff. rank"]
        if task == "multitask":
            headers.insert(4, "token acc")
        table = []
        for s in rows:
            row = [s["K"], common.METHOD_LABELS[s["method"]], f"{s['eval_loss_mean']:.4f} ± {s['eval_loss_std']:.4f}",
                   f"{s['eval_loss_min']:.4f} … {s['eval_loss_max']:.4f}", f"{s['numerical_rank_mean']:.1f}",
                   f"{s['effective_rank_mean']:.1f}"]
            if task == "multitask":
                row.insert(4, f"{s['token_acc_mean']:.3f} ± {s['token_acc_std']:.3f}")
            table.append(row)
        common.print_table(headers, table, title=f"{task}: r={cfg['r']} per device, {cfg['steps']} steps, "
                                          f"{s['n_seeds']} seeds ({common.env_line(info)})")


COLORS = {"hdpissa": "#C44E52", "lora": "#4C72B0", "pissa": "#55A868", "full": "0.3"}


def _panels(records: list[dict], draw, title: str, name: str, info: dict, figures_dir) -> str:
    """One panel per (task, K), drawn by ``draw(ax, task, K)``; the panels' frame and the saving are shared."""
    Ks = sorted({r["K"] for r in records})
    tasks = [t for t in TASK_NAMES if any(r["task"] == t for r in records)]
    fig = common.new_figure(figsize=(4.4 * len(Ks), 3.6 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), len(Ks), squeeze=False)
    for i, task in enumerate(tasks):
        for j, K in enumerate(Ks):
            draw(axes[i][j], task, K)
            axes[i][j].set_title(f"{task}, K = {K}", fontsize=10)
            axes[i][j].grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    return common.save_figure(fig, name, info, figures_dir)


def plot_curves(records: list[dict], info: dict, cfg: dict, figures_dir, tag: str = "") -> str:
    def draw(ax, task, K):
        for method in METHODS:
            rs = [r for r in records if r["task"] == task and r["K"] == K and r["method"] == method]
            if not rs:
                continue
            steps = [c[0] for c in rs[0]["curve"]]
            vals = torch.tensor([[c[1]["eval_loss"] for c in r["curve"]] for r in rs])
            ax.plot(steps, vals.mean(0), color=COLORS[method], label=common.METHOD_LABELS[method])
            ax.fill_between(steps, vals.min(0).values, vals.max(0).values, color=COLORS[method], alpha=0.15)
        ax.set(xlabel="optimizer step", yscale="log",
               ylabel="relative eval MSE" if task == "teacher_student" else "eval completion loss")

    title = f"Eval loss, r={cfg['r']} per device, mean over {len(cfg['seeds'])} seeds (band: min…max)"
    return _panels(records, draw, title, f"quality_loss_curves{tag}.png", info, figures_dir)


def plot_spectra(records: list[dict], info: dict, cfg: dict, figures_dir, tag: str = "") -> str:
    r = cfg["r"]

    def draw(ax, task, K):
        for method in METHODS:
            rs = [x for x in records if x["task"] == task and x["K"] == K and x["method"] == method
                  and any("singular_values" in lay for lay in x["layers"].values())]
            if not rs:
                continue
            svs = [torch.tensor(lay["singular_values"]) for lay in rs[0]["layers"].values()]
            n = min(len(s) for s in svs)
            norm = torch.stack([s[:n] / s[0].clamp_min(1e-30) for s in svs]).mean(0)
            ax.plot(range(1, n + 1), norm.clamp_min(1e-8), color=COLORS[method], label=common.METHOD_LABELS[method])
        ax.axvline(2 * K * r, color=COLORS["hdpissa"], linestyle=":", linewidth=1)
        ax.axvline(2 * r, color=COLORS["pissa"], linestyle=":", linewidth=1)
        ax.text(2 * K * r + 1, 1e-7, f"2·K·r = {2 * K * r}", fontsize=7, color=COLORS["hdpissa"])
        ax.set(yscale="log", ylim=(1e-8, 3), xlabel="singular value index i",
               ylabel="σ_i(ΔW) / σ_1, mean over layers")

    title = f"Spectrum of the accumulated update ΔW = W_final − W_init (first seed), r={r} per device"
    return _panels(records, draw, title, f"quality_update_spectrum{tag}.png", info, figures_dir)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tasks", default=",".join(TASK_NAMES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval_every", type=int, default=15)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--pretrain_steps", type=int, default=150)
    ap.add_argument("--quick", action="store_true", help="a tiny model and data budget (smoke tests)")
    ap.add_argument("--tag", default="", help="suffix of the result/figure file names")
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                    help="override a default learning rate for every task, e.g. --lr hdpissa=3e-2 (repeatable)")
    ap.add_argument("--sweep", action="store_true", help="run the K=1 learning-rate probe instead")
    common.add_output_args(ap, worker=True)
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_or_run_worker(build_parser(), worker, argv)
    from bench._tasks import prepare_multitask_base

    model = QUICK_MODEL if args.quick else MODEL
    tasks = args.tasks.split(",")
    info = common.env_info(nproc=max(args.nproc), backend="gloo", threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"model": model, "tasks": tasks, "methods": args.methods.split(","), "seeds": args.seeds,
               "steps": args.steps, "eval_every": args.eval_every, "r": args.r, "alpha": args.alpha,
               "batch": args.batch, "seq": args.seq, "lr": lr_table(args.lr), "base_dir": os.path.join(tmp, "base")}
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
        if "multitask" in tasks:
            t0 = time.perf_counter()
            prepare_multitask_base(cfg["base_dir"], dict(model, vocab_size=512), args.pretrain_steps)
            print(f"[quality] multitask base pretrained on prompts in {time.perf_counter() - t0:.1f}s", flush=True)
        if args.sweep:
            res = sweep(cfg, args.nproc)
            common.write_json("quality_lr_sweep.json", dict(res, env=common.finish_env(info)), args.results_dir)
            return res
        records = []
        for K in args.nproc:
            t0 = time.perf_counter()
            records += run_K(K, dict(cfg, runs=plan_runs(cfg, K)))
            print(f"[quality] K={K} done in {time.perf_counter() - t0:.0f}s", flush=True)
    common.finish_env(info)
    summary = summarize(records)
    report(summary, info, cfg)
    cfg.pop("base_dir")
    result = {"env": info, "config": cfg, "summary": summary, "records": records}
    if args.figure:
        print("figures:", os.path.relpath(plot_curves(records, info, cfg, args.figures_dir, args.tag)),
              os.path.relpath(plot_spectra(records, info, cfg, args.figures_dir, args.tag)))
    common.write_json(f"quality{'_quick' if args.quick else ''}{args.tag}.json", result, args.results_dir)
    return result


if __name__ == "__main__":
    main()
