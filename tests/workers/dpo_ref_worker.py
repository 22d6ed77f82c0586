"""One process of a real ``accelerate launch`` run of HDPiSSADPOTrainer with precomputed reference log-probabilities.

For each of ``--cases`` (one launch runs them one after the other) writes into ``--record_dir/rank{k}.pt``: the training
rows as the trainer holds them (token ids and the precomputed ``ref_chosen_logps`` / ``ref_rejected_logps``), the first
logged loss and margins, or the error the trainer raised. ``memory``: an in-memory dataset (``Dataset.from_list``);
``file``: one backed by Arrow cache files in ``--cache_dir`` (TRL's own precompute path, through a cache file);
``shuffled``: each process's in-memory copy shuffled with its own seed, as an unseeded split or shuffle would.
"""

from __future__ import annotations

import argparse
import os

import torch
from datasets import Dataset, load_dataset
from trl import DPOConfig

from hdpissa_trl import HDPiSSAConfig, HDPiSSADPOTrainer
from hdpissa_trl.launch import end_worker


def run_case(case: str, args, rank: int) -> dict:
    """``memory`` / ``file``: the rows as they are; ``shuffled``: in memory, each process's copy shuffled with its own
    seed."""
    rows = load_dataset("json", data_files=args.jsonl, split="train", cache_dir=args.cache_dir)
    rows = rows.select(range(args.n if case != "shuffled" else 24))
    if case in ("memory", "shuffled"):
        rows = Dataset.from_list(list(rows))
    if case == "shuffled":
        rows = rows.shuffle(seed=rank)
    config = DPOConfig(output_dir=os.path.join(args.output_dir, case), use_cpu=True, bf16=False, max_steps=1,
                       learning_rate=1e-2, per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                       report_to=[], seed=3, max_length=64, gradient_checkpointing=False, precompute_ref_log_probs=True)
    record: dict = {}
    try:
        trainer = HDPiSSADPOTrainer(model=args.model, args=config, train_dataset=rows,
                                    hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
    except ValueError as exc:
        record["error"] = str(exc)
        return record
    data = trainer.train_dataset
    record["rows"] = {c: data[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps",
                                           "ref_rejected_logps")}
    trainer.train()
    record["first_log"] = next(h for h in trainer.state.log_history if "loss" in h)
    return record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--cases", default="memory,file,shuffled")
    ap.add_argument("--cache_dir", default=None)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--record_dir", required=True)
    args = ap.parse_args()

    rank = int(os.environ.get("RANK", "0"))
    record = {case: run_case(case, args, rank) for case in args.cases.split(",")}
    os.makedirs(args.record_dir, exist_ok=True)
    torch.save(record, os.path.join(args.record_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
    end_worker()  # a launched child ends here
