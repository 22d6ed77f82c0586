"""One process of a real ``accelerate launch`` run of HDPiSSADPOTrainer with precomputed reference log-probabilities.

Writes ``--record_dir/rank{k}.pt``: the training rows as the trainer holds them (token ids and the precomputed
``ref_chosen_logps`` / ``ref_rejected_logps``), the first logged loss and margins, or the error the trainer raised.
``--data memory`` gives an in-memory dataset (``Dataset.from_list``); ``--data file`` one backed by Arrow cache files
in ``--cache_dir`` (TRL's own precompute path, through a cache file). ``--shuffle_per_process`` shuffles each process's
copy with its own seed, as an unseeded split or shuffle would.
"""

from __future__ import annotations

import argparse
import os

import torch
from datasets import Dataset, load_dataset
from trl import DPOConfig

from hdpissa_trl import HDPiSSAConfig, HDPiSSADPOTrainer
from hdpissa_trl.launch import end_worker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--data", choices=("memory", "file"), default="memory")
    ap.add_argument("--cache_dir", default=None)
    ap.add_argument("--shuffle_per_process", action="store_true")
    ap.add_argument("--method", default="hdpissa")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--record_dir", required=True)
    args = ap.parse_args()

    rank = int(os.environ.get("RANK", "0"))
    rows = load_dataset("json", data_files=args.jsonl, split="train", cache_dir=args.cache_dir)
    rows = rows.select(range(args.n))
    if args.data == "memory":
        rows = Dataset.from_list(list(rows))
    if args.shuffle_per_process:
        rows = rows.shuffle(seed=rank)
    config = DPOConfig(output_dir=args.output_dir, use_cpu=True, bf16=False, max_steps=1, learning_rate=1e-2,
                       per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to=[], seed=3,
                       max_length=64, gradient_checkpointing=False, precompute_ref_log_probs=True)
    record: dict = {"rank": rank}
    try:
        trainer = HDPiSSADPOTrainer(model=args.model, args=config, train_dataset=rows,
                                    hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4), method=args.method)
    except ValueError as exc:
        record["error"] = str(exc)
    else:
        data = trainer.train_dataset
        record["rows"] = {c: data[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps",
                                               "ref_rejected_logps")}
        trainer.train()
        record["first_log"] = next(h for h in trainer.state.log_history if "loss" in h)
    os.makedirs(args.record_dir, exist_ok=True)
    torch.save(record, os.path.join(args.record_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
    end_worker()  # a launched child ends here
