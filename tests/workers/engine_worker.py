"""One device of a real multi-process HD-PiSSA run on a tiny model (launched by tests with torchrun, gloo).

Also importable: the tests' reference uses ``make_model`` and ``batch`` so it sees the same model and data.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch
import torch.distributed as dist

from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
from hdpissa_trl.launch import end_worker
from hdpissa_trl.testing_utils import build_tiny_model

VOCAB = 97


def make_model(arch: str = "llama"):
    return build_tiny_model(arch, seed=0, vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                            num_heads=4, num_kv_heads=2)


def batch(step: int, rank: int) -> torch.Tensor:
    """Different data on every device and step, reproducible anywhere."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


def make_optimizer(params, name: str, lr: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora_r", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--optim", default="adamw")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--bucket_size_mb", type=float, default=0.0)
    ap.add_argument("--perturb_rank", type=int, default=-1, help="rank whose W gets perturbed before the last step")
    ap.add_argument("--on_sync_mismatch", default="raise")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = make_model(args.arch)
    cfg = HDPiSSAConfig(r=args.lora_r, lora_alpha=args.alpha, sync_check_steps=args.steps if args.perturb_rank >= 0 else 0,
                        bucket_size_mb=args.bucket_size_mb, on_sync_mismatch=args.on_sync_mismatch)
    engine = inject_hdpissa(model, cfg, show_progress=False)
    opt = make_optimizer(engine.adapter_parameters(), args.optim, args.lr)

    # Count every collective the fold issues.
    counts = {"all_gather_single": 0, "all_gather_into_tensor": 0, "all_gather": 0, "all_reduce": 0, "broadcast": 0}
    for name in counts:
        orig = getattr(dist, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            counts[_name] += 1
            return _orig(*a, **k)

        setattr(dist, name, wrapped)

    record = {"rank": rank, "world": world, "losses": [], "fold_collectives": [], "stats": [], "error": None}
    record["A_init"] = {n: lyr.lora_A.detach().clone() for n, lyr in zip(engine.names, engine.layers)}
    record["A0_all"] = {n: lyr.A0_all.clone() for n, lyr in zip(engine.names, engine.layers)}
    record["B0_all"] = {n: lyr.B0_all.clone() for n, lyr in zip(engine.names, engine.layers)}
    try:
        for step in range(args.steps):
            opt.zero_grad(set_to_none=True)
            ids = batch(step, rank)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if step == 0:
                record["grads"] = {n: (lyr.lora_A.grad.clone(), lyr.lora_B.grad.clone())
                                   for n, lyr in zip(engine.names, engine.layers)}
            opt.step()
            if step == args.steps - 1 and rank == args.perturb_rank:
                with torch.no_grad():
                    engine.layers[1].base_layer.weight[0, 0] += 1e-3
            before = dict(counts)
            stats = engine.fold()
            record["fold_collectives"].append({k: counts[k] - before[k] for k in counts})
            record["stats"].append(stats.to_dict())
            record["losses"].append(loss.item())
    except Exception as exc:  # recorded for the test to assert on
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["W"] = {n: lyr.base_layer.weight.detach().clone() for n, lyr in zip(engine.names, engine.layers)}
    record["last_check"] = dataclasses.asdict(engine.last_check)
    torch.save(record, os.path.join(args.out, f"rank{rank}.pt"))
    if record["error"] is None:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_worker()  # a torchrun child ends here
