"""One of 2 processes (``torchrun``, gloo, CPU) taking the code paths that only a GPU launch takes, as far as a CPU can.

* ``scaler``: fp16 with ``ShardedGradScaler`` (what accelerate gives FSDP runs on versions before its plain-GradScaler
  FSDP2 path): an inf gradient on rank 1 only; :func:`hdpissa_trl.trainer.amp.agree_on_skip` must make both ranks skip
  and back off together (the scaler's own all-reduce sums the flags, ours takes the max on top).
* ``fsdp2``: the trainer with W sharded by rows (FSDP2 settings from the launch environment, as ``cpu_fsdp2.yaml``
  exports them), then the two calls that on GPUs run with accelerate's distributed type FSDP: ``Accelerator.prepare``
  (its ``_prepare_fsdp2``, not the ``prepare_model`` the DDP guard patches) and ``clip_grad_norm_`` (its FSDP2 branch).
  The accelerator's state is switched to FSDP for those two calls only (the rest of accelerate's FSDP type, e.g. its
  CUDA barriers, cannot run on CPU).

Writes ``--record_dir/{phase}_rank{k}.pt``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from hdpissa_trl.launch import end_worker


def scaler_phase(record_dir: str) -> None:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from hdpissa_trl.trainer.amp import agree_on_skip

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.5)
    scaler = ShardedGradScaler(device="cpu", init_scale=2.0**10)
    steps = []
    for step in range(3):
        opt.zero_grad()
        scaler.scale((p * torch.arange(4.0)).sum()).backward()
        if step == 1 and rank == 1:
            p.grad[2] = float("inf")  # an fp16 overflow on one device
        skipped = agree_on_skip(scaler, opt)
        scaler.step(opt)
        scaler.update()
        steps.append({"skipped": skipped, "scale": scaler.get_scale(), "p": p.detach().clone()})
    torch.save({"steps": steps}, os.path.join(record_dir, f"scaler_rank{rank}.pt"))


def fsdp2_phase(model_dir: str, record_dir: str) -> None:
    from accelerate.utils import DistributedType
    from trl import SFTConfig
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer
    from hdpissa_trl.trainer.fsdp import requested_fsdp_plugin

    cfg = SFTConfig(output_dir=os.path.join(record_dir, "out"), use_cpu=True, bf16=False, max_steps=1,
                    per_device_train_batch_size=4, report_to=[], max_length=32, save_strategy="no", seed=7)
    trainer = HDPiSSASFTTrainer(model=model_dir, args=cfg, train_dataset=make_dataset(16),
                                hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
    acc, eng, rank = trainer.accelerator, trainer.hdpissa_engine, trainer.accelerator.process_index
    model = trainer.model
    trainer.create_optimizer()
    adapters = list(eng.adapter_parameters())
    assert trainer.hdpissa_sharded, "W is sharded by rows here"
    state = acc.state
    saved = state.distributed_type, getattr(state, "fsdp_plugin", None)  # none on CPU (MULTI_CPU)
    state.fsdp_plugin, state.distributed_type = requested_fsdp_plugin(cfg, acc), DistributedType.FSDP
    calls = {"unscale": 0, "dtensor_clip": 0}
    unscale, dtensor_clip = acc.unscale_gradients, acc._clip_grad_norm_dtensor_aware

    def count(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    acc.unscale_gradients = count("unscale", unscale)
    acc._clip_grad_norm_dtensor_aware = count("dtensor_clip", dtensor_clip)
    try:
        assert acc.is_fsdp2
        prepared, optimizer = acc.prepare(model, trainer.optimizer)  # what Trainer calls under FSDP2 (GPUs)
        params = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        loss = prepared(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}).loss
        acc.backward(loss)
        grads = [p.grad.detach().clone() for p in adapters]
        norm = acc.clip_grad_norm_(prepared.parameters(), 1e-3)  # Trainer's call; the FSDP2 branch
        clipped = [p.grad.detach().clone() for p in adapters]
    finally:
        state.distributed_type, state.fsdp_plugin = saved
        acc.unscale_gradients, acc._clip_grad_norm_dtensor_aware = unscale, dtensor_clip
    torch.save({"same_model": prepared is model, "same_params": len(params) == len(adapters) and all(
        a is b for a, b in zip(params, adapters)), "grads": grads, "norm": norm.detach().clone(), "clipped": clipped,
        "calls": calls}, os.path.join(record_dir, f"fsdp2_rank{rank}.pt"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=("scaler", "fsdp2"), required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--record_dir", required=True)
    args = ap.parse_args()
    os.makedirs(args.record_dir, exist_ok=True)
    if args.phase == "scaler":
        scaler_phase(args.record_dir)
    else:
        fsdp2_phase(args.model, args.record_dir)


if __name__ == "__main__":
    main()
    end_worker()
