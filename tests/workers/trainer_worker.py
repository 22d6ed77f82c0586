"""One process of a real ``accelerate launch`` run of HDPiSSASFTTrainer on a tiny offline model.

Writes what the tests compare into ``--record_dir/rank{k}.pt``: world size seen by the trainer, each device's adapter
slice after set-up, its adapter gradients at the first optimizer step, W after training and the loss curve.
"""

from __future__ import annotations

import argparse
import os

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig

from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer


def make_dataset(n: int = 96, fmt: str = "prompt_completion") -> Dataset:
    """A learnable toy task: copy a short digit string, reversed."""
    g = torch.Generator().manual_seed(123)
    rows = []
    for _ in range(n):
        digits = "".join(str(int(d)) for d in torch.randint(0, 10, (4,), generator=g))
        prompt, completion = f"reverse {digits} =", f" {digits[::-1]}"
        if fmt == "text":
            rows.append({"text": prompt + completion})
        elif fmt == "messages":
            rows.append({"messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": completion}]})
        else:
            rows.append({"prompt": prompt, "completion": completion})
    return Dataset.from_list(rows)


class Recorder(TrainerCallback):
    """Placed BEFORE the fold callback: sees each device's A, B right after the optimizer step, before the fold."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.first_grads = None
        self.stepped = []  # per optimizer step: {name: (A, B)} of this device

    def on_optimizer_step(self, args, state, control, **kwargs):
        eng = self.trainer.hdpissa_engine
        if eng is not None:
            self.stepped.append({n: (lyr.lora_A.detach().clone(), lyr.lora_B.detach().clone())
                                 for n, lyr in zip(eng.names, eng.layers)})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        eng = self.trainer.hdpissa_engine
        if self.first_grads is None and eng is not None:
            self.first_grads = {n: (lyr.lora_A.grad.clone(), lyr.lora_B.grad.clone())
                                for n, lyr in zip(eng.names, eng.layers)}


class StopAfter(TrainerCallback):
    """Ends training after N steps (after that step's checkpoint), as an interruption would, same schedule."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.n:
            control.should_training_stop = True
            control.should_save = True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--record_dir", required=True)
    ap.add_argument("--max_steps", type=int, default=6)
    ap.add_argument("--save_steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--stop_after", type=int, default=0, help="simulate an interruption after this many steps")
    ap.add_argument("--method", default="hdpissa")
    ap.add_argument("--fmt", default="prompt_completion")
    ap.add_argument("--grad_accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--optim", default="adamw_torch")
    args = ap.parse_args()

    cfg = SFTConfig(
        output_dir=args.output_dir, use_cpu=True, bf16=False, max_steps=args.max_steps, learning_rate=args.lr,
        per_device_train_batch_size=4, gradient_accumulation_steps=args.grad_accum, logging_steps=1,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, report_to=[],
        max_length=32, seed=7, optim=args.optim, lr_scheduler_type="cosine", warmup_steps=1, dataloader_num_workers=0,
        max_grad_norm=1.0,
    )
    trainer = HDPiSSASFTTrainer(model=args.model, args=cfg, train_dataset=make_dataset(fmt=args.fmt),
                                hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4, sync_check_steps=2),
                                method=args.method)
    rec = Recorder(trainer)
    trainer.callback_handler.callbacks.insert(0, rec)
    if args.stop_after:
        trainer.add_callback(StopAfter(args.stop_after))
    rank = trainer.accelerator.process_index
    eng = trainer.hdpissa_engine
    record = {"world_size": trainer.accelerator.num_processes, "args_world_size": trainer.args.world_size,
              "dist_world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}
    if eng is not None:
        record["A_setup"] = {n: lyr.lora_A.detach().clone() for n, lyr in zip(eng.names, eng.layers)}
        record["W_start"] = {n: lyr.base_layer.weight.detach().clone() for n, lyr in zip(eng.names, eng.layers)}
        record["A0_all"] = {n: lyr.A0_all.clone() for n, lyr in zip(eng.names, eng.layers)}
        record["B0_all"] = {n: lyr.B0_all.clone() for n, lyr in zip(eng.names, eng.layers)}
        record["scale"] = eng.config.scale
    trainer.train(resume_from_checkpoint=args.resume)
    # The model object trained is never a DDP wrapper.
    record["wrapped_type"] = type(trainer.model_wrapped).__name__
    if eng is not None:
        record["folds"] = eng.step
        record["W"] = {n: lyr.base_layer.weight.detach().clone() for n, lyr in zip(eng.names, eng.layers)}
        record["checksums"] = eng.checksums()
    record["first_grads"] = rec.first_grads
    record["stepped"] = rec.stepped
    record["log_history"] = trainer.state.log_history
    trainer.save_model()
    os.makedirs(args.record_dir, exist_ok=True)
    torch.save(record, os.path.join(args.record_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
