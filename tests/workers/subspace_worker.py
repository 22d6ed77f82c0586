"""One device of a real multi-process HD-PiSSA run with a subspace schedule (``HDPiSSAConfig.subspace``), launched by
``tests/test_subspace.py`` with torchrun (gloo). Records W, the factors and the collectives of every fold."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from engine_worker import batch, make_model

from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
from hdpissa_trl.launch import end_worker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--subspace", default="fixed")
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eps", type=float, default=1e-8, help="AdamW eps")
    ap.add_argument("--slice_gradient", default="local")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = make_model()
    cfg = HDPiSSAConfig(r=2, lora_alpha=4.0, sync_check_steps=1, subspace=args.subspace, subspace_steps=args.every,
                        slice_gradient=args.slice_gradient)
    engine = inject_hdpissa(model, cfg, show_progress=False)
    opt = torch.optim.AdamW(engine.adapter_parameters(), lr=args.lr, eps=args.eps, weight_decay=0.0)
    calls = {"n": 0, "reduce": 0}
    orig, orig_reduce = dist.broadcast, dist.all_reduce

    def counted(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    def counted_reduce(*a, **k):
        calls["reduce"] += 1
        return orig_reduce(*a, **k)

    dist.broadcast = counted
    record = {"rank": rank, "world": world, "changed": [], "fold_collectives": [], "broadcasts": [], "checks_ok": [],
              "reduces": []}
    for step in range(args.steps):
        ids = batch(step, rank)
        model(input_ids=ids, labels=ids).loss.backward()
        if engine.global_slice_gradients:  # before the optimizer (and before any clipping)
            dist.all_reduce = counted_reduce
            engine.reduce_slice_gradients()
            dist.all_reduce = orig_reduce
            record["reduces"].append(calls["reduce"])
            calls["reduce"] = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        before = calls["n"]
        stats = engine.fold()  # sync_check_steps=1: every fold also compares W's checksums across ranks (raises)
        record["fold_collectives"].append(stats.num_collectives)
        record["broadcasts"].append(calls["n"] - before)
        record["changed"].append(engine.factors_changed)
        record["checks_ok"].append(engine.last_check.ok)
        if engine.factors_changed:
            opt.state.clear()
    record["W"] = {n: lyr.weight.detach().clone() for n, lyr in zip(engine.names, engine.layers)}
    record["A0_all"] = {n: lyr.A0_all.clone() for n, lyr in zip(engine.names, engine.layers)}
    torch.save(record, os.path.join(args.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
    end_worker()  # a torchrun child ends here: barrier, destroy the process group, exit
