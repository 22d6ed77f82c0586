"""One process of a real ``accelerate launch`` HD-PiSSA run that ends with ``save_adapter`` (and, with ``--repo``,
``push_adapter_to_hub`` to the test's local Hub server). Rank 0 writes the export's figures to
``--output_dir/export.json`` for the test to compare with its own reference."""

from __future__ import annotations

import argparse
import json
import os

from trl import SFTConfig
from workers.trainer_worker import make_dataset

from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer
from hdpissa_trl.launch import end_worker

REPORT = {"results": {"reverse": {"metric": "accuracy", "value": 0.75, "dataset": "reverse-digits", "n": 8}}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--base_name", default=None)
    ap.add_argument("--repo", default=None)
    ap.add_argument("--token", default=None)
    args = ap.parse_args()
    cfg = SFTConfig(output_dir=args.output_dir, use_cpu=True, bf16=False, max_steps=args.steps,
                    learning_rate=args.lr, per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                    report_to=[], max_length=32, gradient_checkpointing=False, hub_token=args.token)
    trainer = HDPiSSASFTTrainer(model=args.model, args=cfg, train_dataset=make_dataset(32),
                                hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
    trainer.train()
    trainer.save_model()
    result = trainer.save_adapter(base_model_name_or_path=args.base_name, eval_report=REPORT,
                                  run_info={"base model": args.base_name})
    if args.repo:
        trainer.push_adapter_to_hub(args.repo)
    if result is not None:
        with open(os.path.join(args.output_dir, "export.json"), "w") as f:
            json.dump(result.to_dict(), f)
    end_worker()


if __name__ == "__main__":
    main()
