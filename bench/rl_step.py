"""DPO and GRPO training steps: HD-PiSSA vs PEFT LoRA at equal r, through the real trainers, K gloo processes.

Each configuration is a real ``HDPiSSADPOTrainer`` / ``HDPiSSAGRPOTrainer`` run (``method="hdpissa"`` or ``"lora"``:
TRL's own PEFT path, same data, schedule, batch and r) in fresh torchrun processes. Configurations alternate round by
round (``--rounds``), so load from other jobs hits them alike; a step is timed from ``on_step_begin`` to
``on_step_end`` on every rank and counted as its slowest rank; the first ``--warmup`` steps are dropped.

    python -m bench.rl_step                               # DPO and GRPO, K=2, preset "cpu"-sized model
    python -m bench.rl_step --trainers dpo --rounds 1 --steps 6

DPO runs both reference set-ups of HD-PiSSA (``precompute_ref_log_probs=True``: no second model; and a frozen copy of
the starting model) against LoRA with TRL's default reference (the adapter disabled: no copy needed). Memory per
process: bytes of the policy's weights, trainable parameters, gradients and optimizer state and of the reference
model, counted tensor by tensor after the run, and the peak RSS increase during training (``/proc/self/clear_refs``
resets the high-water mark after set-up; indicative only, the allocator caches).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from bench import _common as common
from bench._runlog import peak_rss, reset_peak_rss

# (trainer, label, method, extra config): the configurations compared.
CONFIGS = {
    "dpo": [("HD-PiSSA, precomputed reference", "hdpissa", {"precompute_ref_log_probs": True}),
            ("HD-PiSSA, frozen reference copy", "hdpissa", {"precompute_ref_log_probs": False}),
            ("PEFT LoRA, adapter-disabled reference", "lora", {"precompute_ref_log_probs": False}),
            ("PEFT LoRA, precomputed reference", "lora", {"precompute_ref_log_probs": True})],
    "grpo": [("HD-PiSSA", "hdpissa", {}), ("PEFT LoRA", "lora", {})],
}
# A Llama-style model the size of bench/_common.py's "cpu" preset (hidden 512, 4 blocks), with the offline tokenizer.
MODEL = dict(hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8, num_kv_heads=4)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trainers", default="dpo,grpo")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    ap.add_argument("--rounds", type=int, default=2, help="runs per configuration (interleaved)")
    ap.add_argument("--batch", type=int, default=8, help="per-device batch (DPO pairs / GRPO completions)")
    ap.add_argument("--max_completion_length", type=int, default=32, help="GRPO generation length")
    ap.add_argument("--model_dir", default=None, help="an existing model dir (default: build the preset offline)")
    common.add_output_args(ap, worker=True)
    return ap


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def memory_breakdown(trainer) -> dict[str, int]:
    """Bytes held by the policy, its trainable state and the reference model (one process)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    buffers = list(model.buffers())  # A0/B0 of every slice for HD-PiSSA
    opt = [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    ref = getattr(trainer, "ref_model", None)
    master = 0
    if trainer.hdpissa_engine is not None:
        master = sum(_tensor_bytes(u.state().values()) for u in trainer.hdpissa_engine.updaters)
    return {"weights": _tensor_bytes(params) + _tensor_bytes(buffers) + master,
            "trainable": _tensor_bytes(trainable),
            "optimizer_state": _tensor_bytes(opt),
            "reference_model": _tensor_bytes(ref.parameters()) if ref is not None else 0}


def build_trainer(kind: str, method: str, extra: dict, settings: dict):
    """One HD-PiSSA / LoRA trainer of the benchmark (same data, schedule and r for every method)."""
    import json

    from datasets import Dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSADPOTrainer, HDPiSSAGRPOTrainer
    from hdpissa_trl.launch import REPO_ROOT
    from hdpissa_trl.rewards import digit_reward

    common = dict(output_dir=settings["output_dir"], use_cpu=True, bf16=False, max_steps=settings["steps"],
                  learning_rate=1e-4, per_device_train_batch_size=settings["batch"], logging_steps=1000,
                  save_strategy="no", report_to=[], seed=0, gradient_checkpointing=False, disable_tqdm=True)
    config = HDPiSSAConfig(r=settings["r"], lora_alpha=settings["r"], sync_check_steps=0)
    kind_file = "preference" if kind == "dpo" else "prompts"
    with open(os.path.join(REPO_ROOT, f"recipes/demo/data_rl/{kind_file}_train.jsonl"), encoding="utf-8") as f:
        data = Dataset.from_list([json.loads(line) for line in f])
    if kind == "dpo":
        from trl import DPOConfig

        return HDPiSSADPOTrainer(model=settings["model_dir"], args=DPOConfig(**common, max_length=64, **extra),
                                 train_dataset=data, hdpissa_config=config, method=method)
    from trl import GRPOConfig

    args = GRPOConfig(**common, num_generations=8, max_completion_length=settings["max_completion_length"], **extra)
    return HDPiSSAGRPOTrainer(model=settings["model_dir"], reward_funcs=digit_reward, args=args, train_dataset=data,
                              hdpissa_config=config, method=method)


def worker(settings: dict) -> None:
    """One torchrun process: build the trainer, time its steps, count its memory; rank 0 writes the result."""
    import json

    import torch.distributed as dist
    from transformers import TrainerCallback

    common.quiet_hf()
    trainer = build_trainer(settings["trainer"], settings["method"], settings["extra"], settings)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    trainer.add_callback(timer)
    rss_before, reset = common.rss_bytes(), reset_peak_rss()
    trainer.train()
    peak_increase = peak_rss() - rss_before if reset else float("nan")
    times = torch.tensor(timer.times, dtype=torch.float64)
    peak = torch.tensor([peak_increase], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if trainer.accelerator.is_main_process:
        with open(settings["out"], "w", encoding="utf-8") as f:
            json.dump({"step_s": times.tolist(), "peak_rss_increase": peak.item(),
                       "memory": memory_breakdown(trainer)}, f)


def run(kinds: list[str], nproc: int, r: int, steps: int, warmup: int, rounds: int, batch: int,
        max_completion_length: int, model_dir: str | None) -> dict:
    """Launch every configuration ``rounds`` times, interleaved; return per-configuration records."""
    from hdpissa_trl.testing_utils import save_tiny_model

    records: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dir or save_tiny_model(os.path.join(tmp, "model"), arch="llama", **MODEL)
        for _ in range(rounds):
            for kind in kinds:
                for label, method, extra in CONFIGS[kind]:
                    cfg = dict(trainer=kind, method=method, extra=extra, r=r, steps=steps, batch=batch,
                               max_completion_length=max_completion_length, model_dir=model_dir,
                               output_dir=os.path.join(tmp, "out"))
                    res = common.launch_workers("bench.rl_step", nproc, cfg, timeout=3600, threads=1)
                    rec = records.setdefault(kind, {}).setdefault(label, {"step_s": [], "peak": [], "memory": None})
                    rec["step_s"] += res["step_s"][warmup:]
                    rec["peak"].append(res["peak_rss_increase"])
                    rec["memory"] = res["memory"]
    return records


def summarize(records: dict) -> dict:
    """Median step and ratio to the LoRA configuration of the same trainer (TRL's default reference for DPO)."""
    out = {}
    for kind, by_label in records.items():
        lora = next(label for label in by_label if label.startswith("PEFT LoRA"))
        base = common.median(by_label[lora]["step_s"])
        out[kind] = {label: {"step_ms": 1000 * common.median(rec["step_s"]), "x_lora": common.median(rec["step_s"]) / base,
                             "peak_rss_increase": max(rec["peak"]), **rec["memory"]}
                     for label, rec in by_label.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    args = common.parse_or_run_worker(build_parser(), worker, argv, quiet=False)
    kinds = [k.strip() for k in args.trainers.split(",") if k.strip()]
    info = common.env_info(nproc=args.nproc, backend="gloo", threads=1)
    records = run(kinds, args.nproc, args.r, args.steps, args.warmup, args.rounds, args.batch,
                  args.max_completion_length, args.model_dir)
    summary = summarize(records)
    common.finish_env(info)
    for kind, rows in summary.items():
        common.print_table(["configuration", "step ms", "× LoRA", "policy weights", "trainable", "optimizer state",
                     "reference model", "peak RSS increase"],
                    [[label, f"{v['step_ms']:.1f}", f"{v['x_lora']:.3f}", common.fmt_bytes(v["weights"]),
                      common.fmt_bytes(v["trainable"]), common.fmt_bytes(v["optimizer_state"]), common.fmt_bytes(v["reference_model"]),
                      common.fmt_bytes(v["peak_rss_increase"])] for label, v in rows.items()],
                    title=f"{kind.upper()}, K={args.nproc}, r={args.r}, batch {args.batch}: {common.env_line(info)}")
    settings = {k: v for k, v in vars(args).items() if k not in ("results_dir", "figures_dir", "worker", "model_dir")}
    path = common.write_json("rl_step.json", {"env": info, "settings": settings, "summary": summary, "records": records},
                      args.results_dir)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
