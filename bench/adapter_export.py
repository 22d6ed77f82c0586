"""The run's update as a PEFT LoRA adapter (``save_adapter``): size, export time, and what it costs in held-out loss.

Reads the output of a recipe run made with ``--save_adapter true`` (the merged model in ``RUN_DIR``, the adapter in
``RUN_DIR/adapter``) and measures, against the model the run started from:

* sizes: ``adapter_model.safetensors`` against the merged model's safetensors;
* the export's own figures from the adapter card (rank, relative error of ΔW, export time), and the error again from
  the files alone (``‖W_merged − W_base − B·A‖ / ‖W_merged − W_base‖``, float64, A and B as PEFT loads them);
* held-out loss (mean NLL per completion token on the SmolLM2 recipe's test rows, chat-formatted as in training) of
  the base model, the merged model and base + adapter through plain PEFT;
* with ``--factorizations exact,refined,svd``: each factorisation of ``engine/export.py`` recomputed from the files
  (ΔW = merged − base; U, V = the top K·r singular vectors of each starting W, which is what the exact-SVD init
  owns), at the adapter's rank: its error, its time, and the held-out loss of base + that adapter (its factors put
  into the PEFT model in place of the saved ones).

    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml --num_processes 2 recipes/sft_multitask.py \\
      --config recipes/smollm2-135m/multitask.yaml --lora_r 2 --lora_alpha 2 --max_steps 30 --eval_tasks "" \\
      --save_strategy no --save_adapter true --output_dir RUN_DIR
    python -m bench.adapter_export --run_dir RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench._common import env_info, finish_env, quiet_hf, write_json


def _files_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def _weights(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, f)))
    return out


def card_figures(card: str) -> dict:
    """The export's own numbers, as its card states them."""
    def row(label: str) -> str | None:
        m = re.search(rf"^\| {re.escape(label)}[^|]*\| ([^|]+) \|", card, re.M)
        return m.group(1).strip() if m else None

    pct = lambda s: float(s.split(" %")[0]) / 100 if s else None  # noqa: E731
    return {"relative_error": pct(row("relative error of the update, whole model")),
            "largest_layer_error": pct(row("largest per-layer error")),
            "lora_rank": int(row("LoRA rank").split()[0]),
            "export_seconds": float(row("export time").split()[0])}


def lora_modules(peft_model):
    return [(name, module) for name, module in peft_model.base_model.model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A]


@torch.no_grad()
def errors_from_files(base: dict, merged: dict, peft_model) -> dict:
    """Per layer and overall: the saved adapter's error, from the files alone."""
    num = den = 0.0
    layers = {}
    for name, module in lora_modules(peft_model):
        A, B = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
        delta = merged[f"{name}.weight"].double() - base[f"{name}.weight"].double()
        err = (delta - module.scaling["default"] * B @ A).norm().item()
        d = delta.norm().item()
        layers[name] = {"rank": A.shape[0], "delta_norm": d, "relative_error": err / d if d else 0.0}
        num, den = num + err ** 2, den + d ** 2
    return {"relative_error": (num / den) ** 0.5, "layers": layers}


_BASES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


@torch.no_grad()
def recompute(base: dict, merged: dict, names: list[str], rank: int, how: str) -> tuple[dict, dict]:
    """One factorisation of every layer's ΔW from the files: ``{name: (A, B)}`` and its figures."""
    from hdpissa_trl.engine.export import factor_update, overall_relative_error

    factors, ups, seconds = {}, [], 0.0
    for name in names:
        w0 = base[f"{name}.weight"].float()
        delta = merged[f"{name}.weight"].float() - w0
        bases = None
        if how != "svd":
            if name not in _BASES:  # the exact-SVD init's directions (computed once for every factorisation)
                U, _, Vh = torch.linalg.svd(w0, full_matrices=False)
                _BASES[name] = (U[:, :rank // 2].contiguous(), Vh[:rank // 2].t().contiguous())
            bases = _BASES[name]
        t0 = time.perf_counter()
        up = factor_update(delta, bases=bases, rank=rank, factorization=how)
        seconds += time.perf_counter() - t0
        factors[name] = (up.A, up.B)
        ups.append(up)
    return factors, {"relative_error": overall_relative_error(ups), "factor_seconds": seconds,
                     "largest_layer_error": max(u.relative_error for u in ups)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_dir", required=True, help="output_dir of a recipe run made with --save_adapter true")
    ap.add_argument("--base", default=None, help="the starting checkpoint (default: the adapter config's)")
    ap.add_argument("--limit", type=int, default=100, help="held-out rows per task")
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--factorizations", default="", help="comma-separated: exact, refined, svd (recomputed)")
    ap.add_argument("--results_dir", default=None)
    ap.add_argument("--name", default="adapter_export.json")
    args = ap.parse_args(argv)
    quiet_hf()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.sim_train import TASKS, encode, heldout, read_rows

    info = env_info()
    adapter = os.path.join(args.run_dir, "adapter")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    base_dir = args.base or config["base_model_name_or_path"]
    with open(os.path.join(adapter, "README.md"), encoding="utf-8") as f:
        figures = card_figures(f.read())
    tok = AutoTokenizer.from_pretrained(args.run_dir)
    sets = {t: [encode(tok, r["prompt"], r["completion"], args.max_length)
                for r in read_rows(f"{t}_test.jsonl")[:args.limit]] for t in TASKS}
    rec: dict = {"run_dir": os.path.basename(os.path.abspath(args.run_dir)), "lora_rank": config["r"],
                 "layers": len(config["target_modules"]), "heldout_rows_per_task": args.limit,
                 "adapter_bytes": os.path.getsize(os.path.join(adapter, "adapter_model.safetensors")),
                 "merged_model_bytes": _files_bytes(args.run_dir), "card": figures}
    rec["size_ratio"] = rec["adapter_bytes"] / rec["merged_model_bytes"]
    losses, scored = {}, {}
    t0 = time.perf_counter()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                           adapter)
    rec["peft_load_seconds"] = time.perf_counter() - t0
    base_w, merged_w = _weights(base_dir), _weights(args.run_dir)
    rec["from_files"] = errors_from_files(base_w, merged_w, peft_model)

    def score(label: str, model) -> None:
        t0 = time.perf_counter()
        losses[label], scored[label] = heldout(model, tok, sets)
        print(f"[adapter_export] {label}: held-out loss {losses[label]['eval_loss']:.5f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    score("base+adapter", peft_model)
    score("merged", AutoModelForCausalLM.from_pretrained(args.run_dir, dtype=torch.float32))
    score("base", AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
    rec["recomputed"] = {}
    saved = {name: (m.lora_A["default"].weight.clone(), m.lora_B["default"].weight.clone())
             for name, m in lora_modules(peft_model)}
    for how in [h for h in args.factorizations.split(",") if h]:
        factors, figures = recompute(base_w, merged_w, list(saved), config["r"], how)
        with torch.no_grad():
            for name, m in lora_modules(peft_model):
                A, B = factors[name]
                m.lora_A["default"].weight.copy_(A)
                m.lora_B["default"].weight.copy_(B)
        score(f"base+{how}", peft_model)
        rec["recomputed"][how] = figures
        print(f"[adapter_export] {how}: error {figures['relative_error']:.4%}, {figures['factor_seconds']:.1f} s",
              flush=True)
    rec["heldout"] = losses
    # Per row: how far base + adapter is from the merged model, against how far the run moved the row.
    gaps, moves = [], []
    for task in TASKS:
        for a, m, b in zip(scored["base+adapter"][task], scored["merged"][task], scored["base"][task]):
            gaps.append(abs(a[0] - m[0]) / max(m[1], 1))
            moves.append(abs(b[0] - m[0]) / max(m[1], 1))
    rec["row_loss_gap_mean"] = sum(gaps) / len(gaps)
    rec["row_loss_move_mean"] = sum(moves) / len(moves)
    rec["env"] = finish_env(info)
    path = write_json(args.name, rec, args.results_dir)
    print(json.dumps({k: v for k, v in rec.items() if k not in ("from_files", "env")}, indent=1))
    print(f"[adapter_export] error of the saved adapter from the files {rec['from_files']['relative_error']:.4%}; "
          f"wrote {path}")


if __name__ == "__main__":
    main()
