"""Train a tiny HD-PiSSA model for 2 steps and ``trainer.push_to_hub()`` it, or download a pushed repo.

Run in a subprocess whose environment points ``HF_ENDPOINT`` at the test's local Hub server.
"""

from __future__ import annotations

import argparse
import sys

from huggingface_hub import constants, snapshot_download


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["push", "download"], required=True)
    ap.add_argument("--model")
    ap.add_argument("--output_dir")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--token")
    args = ap.parse_args()
    if not constants.ENDPOINT.startswith("http://127.0.0.1:"):
        sys.exit(f"refusing to talk to {constants.ENDPOINT}: tests only use a local server")
    if args.mode == "download":
        snapshot_download(args.repo, local_dir=args.output_dir)
        return
    from trl import SFTConfig
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer

    cfg = SFTConfig(output_dir=args.output_dir, use_cpu=True, bf16=False, max_steps=2, learning_rate=1e-2,
                    per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to=[], max_length=32,
                    push_to_hub=True, hub_model_id=args.repo, hub_token=args.token, gradient_checkpointing=False)
    trainer = HDPiSSASFTTrainer(model=args.model, args=cfg, train_dataset=make_dataset(16),
                                hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
    trainer.train()
    trainer.save_model()
    trainer.push_to_hub()
    print("PUSHED", trainer.hub_model_id)


if __name__ == "__main__":
    main()
