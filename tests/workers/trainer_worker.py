"""One process of a real ``accelerate launch`` run of HDPiSSASFTTrainer on a tiny offline model.

Writes what the tests compare into ``--record_dir/rank{k}.pt``: world size seen by the trainer, each device's adapter
slice after set-up, its adapter gradients at the first optimizer step, W after training and the loss curve.

``--fault KIND:STEP:RANK`` injects a fault on one rank (see :func:`install_fault`); the rank that fires it first writes
``--record_dir/fault_rank{RANK}.json`` so a test can check the fault really happened where it was meant to.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig

from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer
from hdpissa_trl.launch import end_worker


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
        elif fmt == "conversations":  # ShareGPT style
            rows.append({"conversations": [{"from": "user", "value": prompt}, {"from": "assistant", "value": completion}]})
        else:
            rows.append({"prompt": prompt, "completion": completion})
    return Dataset.from_list(rows)


class Recorder(TrainerCallback):
    """Placed BEFORE the fold callback: sees each device's A, B right after the optimizer step, before the fold."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.first_grads = None
        self.stepped = []  # per optimizer step: {name: (A, B)} of this device
        self.steps = []  # per optimizer step: see on_step_end
        self.A_wrapped = None

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

    def on_train_begin(self, args, state, control, **kwargs):
        """After the model was prepared (wrapped, if anything wrapped it): each device's adapter slice then."""
        eng = self.trainer.hdpissa_engine
        if eng is not None:
            self.A_wrapped = {n: lyr.lora_A.detach().clone() for n, lyr in zip(eng.names, eng.layers)}

    def on_step_end(self, args, state, control, **kwargs):
        """Per optimizer step, after the fold: skipped?, loss scale, learning rate, W checksums."""
        eng, acc = self.trainer.hdpissa_engine, self.trainer.accelerator
        scaler = getattr(acc, "scaler", None)
        self.steps.append({"skipped": acc.optimizer_step_was_skipped,
                           "scale": scaler.get_scale() if scaler is not None else None,
                           "lr": self.trainer.lr_scheduler.get_last_lr()[0],
                           "checksums": eng.checksums() if eng is not None else None})


class StopAfter(TrainerCallback):
    """Ends training after N steps (after that step's checkpoint), as an interruption would, same schedule."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.n:
            control.should_training_stop = True
            control.should_save = True


FAULTS = ("backward", "fold", "checkpoint", "hang", "exit", "perturb", "inf")


def setup_record(trainer) -> dict:
    """World sizes as each layer sees them, and every device's slice and W right after set-up (before ``train()``):
    what the multi-process tests compare across ranks and feed to :func:`check_w_against_fold_formula`."""
    record = {"world_size": trainer.accelerator.num_processes, "args_world_size": trainer.args.world_size,
              "dist_world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}
    eng = trainer.hdpissa_engine
    if eng is not None:
        record["A_setup"] = {n: lyr.lora_A.detach().clone() for n, lyr in zip(eng.names, eng.layers)}
        record["W_start"] = {n: lyr.base_layer.weight.detach().clone() for n, lyr in zip(eng.names, eng.layers)}
        record["A0_all"] = {n: lyr.A0_all.clone() for n, lyr in zip(eng.names, eng.layers)}
        record["B0_all"] = {n: lyr.B0_all.clone() for n, lyr in zip(eng.names, eng.layers)
                            if hasattr(lyr, "B0_all")}  # W sharded: each rank keeps only its rows of B0
        record["scale"] = eng.config.scale
    return record


def record_slice_reduces(eng, record: dict) -> None:
    """``slice_gradient="global"``: count the engine's reduces and keep the first one's input (this device's
    all-slices buffers) and output (its adapters' gradients), before the trainer clips them."""
    record["reduces"] = 0
    original = eng.reduce_slice_gradients

    def reduce():
        if record["reduces"] == 0:
            record["slice_grads_local"] = {n: tuple(t.clone() for t in lyr.slice_grads)
                                           for n, lyr in zip(eng.names, eng.layers)}
        out = original()
        if record["reduces"] == 0:
            record["slice_grads_reduced"] = {n: (lyr.lora_A.grad.clone(), lyr.lora_B.grad.clone())
                                             for n, lyr in zip(eng.names, eng.layers)}
        record["reduces"] += 1
        return out

    eng.reduce_slice_gradients = reduce


def check_w_against_fold_formula(r0: dict, r1: dict, steps: int) -> None:
    """Both ranks hold the same W, and it equals the fold formula applied by hand (float64) to what each device's
    optimizer produced at every step: ``W = W_start + s·Σ_steps Σ_k (B_k A_k − B0_k A0_k)``."""
    s = r0["scale"]
    for n in r0["W"]:
        assert torch.equal(r0["W"][n], r1["W"][n])
        ref = r0["W_start"][n].double().clone()
        A0, B0 = r0["A0_all"][n].double(), r0["B0_all"][n].double()
        r = A0.shape[0] // 2
        for step in range(steps):
            for k, rec in enumerate((r0, r1)):
                A, B = (t.double() for t in rec["stepped"][step][n])
                ref += s * (B @ A - B0[:, k * r:(k + 1) * r] @ A0[k * r:(k + 1) * r])
        torch.testing.assert_close(r0["W"][n].double(), ref, rtol=0, atol=1e-5)


def install_fault(trainer, spec: str, record_dir: str) -> None:
    """Arm one fault ``KIND:STEP:RANK`` on rank RANK at optimizer step STEP (1-based, gradient accumulation 1).

    * ``backward``: SIGKILL inside the backward pass of step STEP (from a gradient hook of the last adapted layer);
    * ``fold``: SIGKILL inside the fold of step STEP, after the all-gather and after the first layer's W was updated,
      before the other layers' (W is half-folded in memory);
    * ``checkpoint``: SIGKILL while checkpoint STEP is being written: the Trainer's files are in
      ``.tmp-checkpoint-STEP``, the HD-PiSSA state and the completion marker are not;
    * ``hang`` / ``exit``: sleep for an hour / ``os._exit(3)`` right before the fold of step STEP (the other ranks
      wait in the fold's all-gather);
    * ``perturb``: add 1e-3 to one entry of the first adapted layer's W after step STEP (a device that drifted);
    * ``inf``: an inf gradient of the last adapted layer's lora_A in the backward of step STEP (fp16 overflow on one
      device; with ``--grad_scaler`` its GradScaler finds it).
    """
    kind, step, rank = spec.split(":")
    step, rank = int(step), int(rank)
    if kind not in FAULTS:
        raise ValueError(f"unknown fault {kind!r}; choose one of {FAULTS}")
    if trainer.accelerator.process_index != rank:
        return
    eng = trainer.hdpissa_engine

    def fire(note: str) -> None:
        os.makedirs(record_dir, exist_ok=True)
        with open(os.path.join(record_dir, f"fault_rank{rank}.json"), "w") as f:
            json.dump({"kind": kind, "step": step, "rank": rank, "note": note, "time": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        if kind in ("backward", "fold", "checkpoint"):
            os.kill(os.getpid(), signal.SIGKILL)

    if kind == "inf":
        def inf_hook(grad):
            if trainer.state.global_step == step - 1:
                fire("inf gradient injected in backward")
                return torch.full_like(grad, float("inf"))
            return grad

        eng.layers[-1].lora_A.register_hook(inf_hook)
    elif kind == "backward":
        def hook(grad):
            if trainer.state.global_step == step - 1:  # global_step counts completed steps
                fire("in backward, from the gradient hook of the last adapted layer's lora_A")
            return grad

        eng.layers[-1].lora_A.register_hook(hook)
    elif kind == "fold":
        import hdpissa_trl.engine.fold as fold_module

        original, calls = fold_module.fold_layer, []

        def fold_layer(layer, gathered, offset, updater, fold_step, *rest, **options):
            if fold_step == step:
                calls.append(layer.name)
                if len(calls) == 2:
                    fire(f"mid-fold: deltas gathered, W of {calls[0]} updated, {layer.name} and later not yet")
            return original(layer, gathered, offset, updater, fold_step, *rest, **options)

        fold_module.fold_layer = fold_layer
    elif kind == "checkpoint":
        original_save = trainer._save_hdpissa_state

        def save_hdpissa_state(ckpt_dir):
            if trainer.state.global_step == step:
                fire(f"mid-checkpoint: {sorted(os.listdir(ckpt_dir))} written to {os.path.basename(ckpt_dir)}")
            return original_save(ckpt_dir)

        trainer._save_hdpissa_state = save_hdpissa_state
    elif kind in ("hang", "exit"):
        original_fold = eng.fold

        def fold():
            if eng.step + 1 == step:
                fire(f"{kind} before the fold of step {step}")
                if kind == "hang":
                    time.sleep(3600)
                os._exit(3)
            return original_fold()

        eng.fold = fold
    else:
        class Perturb(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    with torch.no_grad():
                        eng.layers[0].base_layer.weight[0, 0] += 1e-3
                    fire(f"perturbed W[0, 0] of {eng.names[0]} after step {step}")

        trainer.add_callback(Perturb())


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
    ap.add_argument("--fault", default=None, help="KIND:STEP:RANK, see install_fault")
    ap.add_argument("--ddp_timeout", type=int, default=1800)
    ap.add_argument("--on_sync_mismatch", default="raise")
    ap.add_argument("--hub_token", default=None)
    ap.add_argument("--hub_model_id", default=None, help="push to this repo (hub_strategy='checkpoint')")
    ap.add_argument("--grad_scaler", action="store_true", help="an fp16-style GradScaler (CPU), as on a GPU")
    ap.add_argument("--save_on_each_node", action="store_true")
    ap.add_argument("--save_total_limit", type=int, default=None)
    ap.add_argument("--slice_gradient", default="local")
    args = ap.parse_args()

    cfg = SFTConfig(
        output_dir=args.output_dir, use_cpu=True, bf16=False, max_steps=args.max_steps, learning_rate=args.lr,
        per_device_train_batch_size=4, gradient_accumulation_steps=args.grad_accum, logging_steps=1,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, report_to=[],
        max_length=32, seed=7, optim=args.optim, lr_scheduler_type="cosine", warmup_steps=1, dataloader_num_workers=0,
        max_grad_norm=0.0 if args.grad_scaler else 1.0, ddp_timeout=args.ddp_timeout, hub_token=args.hub_token,
        save_on_each_node=args.save_on_each_node, save_total_limit=args.save_total_limit,
        push_to_hub=args.hub_model_id is not None, hub_model_id=args.hub_model_id, hub_strategy="checkpoint",
        log_level="info" if args.hub_token else "passive",
    )
    if args.hub_token:
        print(cfg)  # what a script that echoes its configuration prints
    trainer = HDPiSSASFTTrainer(model=args.model, args=cfg, train_dataset=make_dataset(fmt=args.fmt),
                                hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4, sync_check_steps=2,
                                                              on_sync_mismatch=args.on_sync_mismatch,
                                                              slice_gradient=args.slice_gradient),
                                method=args.method)
    rec = Recorder(trainer)
    trainer.callback_handler.callbacks.insert(0, rec)
    if args.stop_after:
        trainer.add_callback(StopAfter(args.stop_after))
    if args.fault:
        install_fault(trainer, args.fault, args.record_dir)
    if args.grad_scaler:
        # accelerate makes a GradScaler only for fp16 on a GPU; this CPU one takes its place (backward scales the
        # loss, the prepared optimizer steps through it), so a GPU fp16 run's skip logic runs here.
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    forwards = []
    trainer.model.register_forward_pre_hook(lambda module, inputs: forwards.append(1) if module.training else None)
    rank = trainer.accelerator.process_index
    eng = trainer.hdpissa_engine
    record = setup_record(trainer)
    if eng is not None and eng.global_slice_gradients:
        record_slice_reduces(eng, record)
    trainer.train(resume_from_checkpoint=True if args.resume == "last" else args.resume)
    # The model object trained is never a DDP wrapper.
    record["wrapped_type"] = type(trainer.model_wrapped).__name__
    if eng is not None:
        record["folds"] = eng.step
        record["W"] = {n: lyr.base_layer.weight.detach().clone() for n, lyr in zip(eng.names, eng.layers)}
        record["checksums"] = eng.checksums()
    record["first_grads"] = rec.first_grads
    record["stepped"] = rec.stepped
    record["steps"] = rec.steps
    record["A_wrapped"] = rec.A_wrapped
    record["forwards"] = len(forwards)
    record["log_history"] = trainer.state.log_history
    trainer.save_model()
    if args.hub_model_id:
        trainer.push_to_hub()
    os.makedirs(args.record_dir, exist_ok=True)
    torch.save(record, os.path.join(args.record_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
    end_worker()  # a launched child ends here
