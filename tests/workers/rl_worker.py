"""One process of a real ``accelerate launch`` run of HDPiSSADPOTrainer, HDPiSSAGRPOTrainer or HDPiSSATrainer.

``--trainer dpo|grpo|plain`` picks the trainer (demo preference pairs, demo prompts with ``digit_reward``, or a plain
``Trainer`` with a hand-written causal-LM loss). Writes ``--record_dir/rank{k}.pt`` with what the tests compare, as
``trainer_worker.py`` does for the SFT trainer: world sizes, each device's adapter slice after set-up and gradients at
the first optimizer step, the fold count, W after training and the log history.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from datasets import Dataset
from workers.trainer_worker import Recorder, StopAfter, make_dataset, setup_record

from hdpissa_trl import HDPiSSAConfig, HDPiSSADPOTrainer, HDPiSSAGRPOTrainer, HDPiSSATrainer
from hdpissa_trl.launch import end_worker
from hdpissa_trl.rewards import digit_reward

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def demo_rows(kind: str, n: int) -> Dataset:
    with open(os.path.join(REPO, f"recipes/demo/data_rl/{kind}_train.jsonl")) as f:
        return Dataset.from_list([json.loads(line) for line, _ in zip(f, range(n))])


class CausalLMTrainer(HDPiSSATrainer):
    """A custom loss, written out: mean next-token cross-entropy over the non-padding tokens."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        targets = inputs["input_ids"][:, 1:].masked_fill(inputs["attention_mask"][:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                 ignore_index=-100)
        return (loss, logits) if return_outputs else loss


def build_trainer(kind: str, model: str, common: dict, hdpissa_config: HDPiSSAConfig, method: str):
    if kind == "dpo":
        from trl import DPOConfig

        # Precomputed reference on an in-memory dataset: TRL's cache file would be per-process (see
        # hdpissa_trl/trainer/dpo_trainer.py).
        args = DPOConfig(**common, max_length=64, gradient_checkpointing=False, precompute_ref_log_probs=True)
        return HDPiSSADPOTrainer(model=model, args=args, train_dataset=demo_rows("preference", 64),
                                 hdpissa_config=hdpissa_config, method=method)
    if kind == "grpo":
        from trl import GRPOConfig

        args = GRPOConfig(**common, num_generations=4, max_completion_length=6, gradient_checkpointing=False)
        return HDPiSSAGRPOTrainer(model=model, reward_funcs=digit_reward, args=args,
                                  train_dataset=demo_rows("prompts", 64), hdpissa_config=hdpissa_config, method=method)
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = make_dataset(96, "text").map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    args = TrainingArguments(**common)
    return CausalLMTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=args, train_dataset=rows,
                           data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                           processing_class=tokenizer, hdpissa_config=hdpissa_config, method=method)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", choices=("dpo", "grpo", "plain"), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--record_dir", required=True)
    ap.add_argument("--max_steps", type=int, default=4)
    ap.add_argument("--save_steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--stop_after", type=int, default=0, help="simulate an interruption after this many steps")
    ap.add_argument("--method", default="hdpissa")
    ap.add_argument("--grad_accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()

    common = dict(output_dir=args.output_dir, use_cpu=True, bf16=False, max_steps=args.max_steps,
                  learning_rate=args.lr, per_device_train_batch_size=4, gradient_accumulation_steps=args.grad_accum,
                  logging_steps=1, save_strategy="steps" if args.save_steps else "no",
                  save_steps=args.save_steps or 500, report_to=[], seed=7, lr_scheduler_type="cosine",
                  warmup_steps=1, dataloader_num_workers=0, max_grad_norm=1.0)
    trainer = build_trainer(args.trainer, args.model, common, HDPiSSAConfig(r=2, lora_alpha=4, sync_check_steps=2),
                            args.method)
    rec = Recorder(trainer)
    trainer.callback_handler.callbacks.insert(0, rec)
    if args.stop_after:
        trainer.add_callback(StopAfter(args.stop_after))
    rank = trainer.accelerator.process_index
    eng = trainer.hdpissa_engine
    record = setup_record(trainer)
    trainer.train(resume_from_checkpoint=args.resume)
    record["wrapped_type"] = type(trainer.model_wrapped).__name__
    if eng is not None:
        record["folds"] = eng.step
        record["W"] = {n: lyr.base_layer.weight.detach().clone() for n, lyr in zip(eng.names, eng.layers)}
    record["first_grads"] = rec.first_grads
    record["stepped"] = rec.stepped
    record["log_history"] = trainer.state.log_history
    trainer.save_model()
    os.makedirs(args.record_dir, exist_ok=True)
    torch.save(record, os.path.join(args.record_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
    end_worker()  # a launched child ends here
