"""One device of a real multi-process run (torchrun, gloo) of HD-PiSSA with W sharded by rows (FSDP2).

In the same process it trains, on the same data, the replicated engine and the sharded engine (one model per
communication scheme), so the test compares the gathered full W of each sharded run with the replicated W.
Optionally it writes a sharded checkpoint, resumes from one, and saves the merged model.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
from hdpissa_trl.engine.sharded import shard_model
from hdpissa_trl.launch import end_worker
from hdpissa_trl.testing_utils import build_tiny_model
from hdpissa_trl.trainer.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint

VOCAB = 97
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_model(hidden: int, inter: int, kv_heads: int = 2, dtype: torch.dtype = torch.float32):
    return build_tiny_model("llama", seed=0, vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                            num_layers=2, num_heads=4, num_kv_heads=kv_heads).to(dtype)


def batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


def local_bytes(engine) -> dict[str, int]:
    """Bytes this rank really holds for the adapted weights and their precision state (storage, not the config)."""
    w = sum(layer.base_layer.weight.to_local().untyped_storage().nbytes() for layer in engine.layers)
    state = sum(t.untyped_storage().nbytes() for upd in engine.updaters for t in upd.state().values())
    full = sum(layer.out_features * layer.in_features * layer.base_layer.weight.element_size() for layer in engine.layers)
    return {"W": w, "precision_state": state, "W_full": full}


def refusals(args, world: int) -> dict[str, str]:
    """Inject into sharding layouts the sharded engine cannot fold; each must fail with a clear error."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def linear_alone(model):  # what a size-based wrap policy does to a large linear: its own FSDP unit
        fully_shard(model.model.layers[0].mlp.up_proj, mesh=mesh)
        shard_model(model, mesh=mesh)

    def two_dim_mesh(model):  # HSDP: replicate x shard
        shard_model(model, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("rep", "shard")))

    out = {}
    cases = {"linear_sharded_alone": linear_alone, "two_dim_mesh": two_dim_mesh}
    for name, shard in cases.items():
        model = make_model(args.hidden, args.inter, args.kv_heads)
        shard(model)
        try:
            inject_hdpissa(model, HDPiSSAConfig(r=args.lora_r, lora_alpha=args.alpha), show_progress=False)
            out[name] = "no error"
        except Exception as exc:  # recorded for the test to assert on
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora_r", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--inter", type=int, default=48)
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32",
                    help="per dtype a replicated run and a sharded run per scheme; bf16: bf16 weights with the fp32 "
                         "master (precision='fp32') and MixedPrecisionPolicy(param_dtype=bf16) on the sharded model")
    ap.add_argument("--schemes", default="all_gather,all_to_all")
    ap.add_argument("--no_replicated", action="store_true")
    ap.add_argument("--save_at", type=int, default=0, help="write a sharded checkpoint after this many steps")
    ap.add_argument("--resume", default="", help="resume the (first) sharded run from this checkpoint")
    ap.add_argument("--merged_dir", default="")
    ap.add_argument("--refusals", action="store_true",
                    help="record the errors of unsupported sharding layouts (a linear sharded on its own, a 2-D mesh)")
    ap.add_argument("--perturb_a0_rank", type=int, default=-1,
                    help="after training, this rank perturbs one A0 of the first sharded run: check raise and resync")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    record: dict = {"rank": rank, "world": world, "error": None}

    def config(scheme: str) -> HDPiSSAConfig:
        return HDPiSSAConfig(r=args.lora_r, lora_alpha=args.alpha, precision="fp32", sharded_comm=scheme,
                             sync_check_steps=1)

    if args.refusals:
        record["refusals"] = refusals(args, world)
    runs = {}
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        if not args.no_replicated:
            model = make_model(args.hidden, args.inter, args.kv_heads, dtype)
            runs[f"{dname}/replicated"] = (model, inject_hdpissa(model, config("auto"), show_progress=False))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if dtype == torch.bfloat16 else None
        for scheme in args.schemes.split(","):
            model = shard_model(make_model(args.hidden, args.inter, args.kv_heads, dtype), mesh=mesh, mp_policy=mp)
            runs[f"{dname}/{scheme}"] = (model, inject_hdpissa(model, config(scheme), show_progress=False))
    optims = {name: torch.optim.AdamW(eng.adapter_parameters(), lr=args.lr, weight_decay=0.0)
              for name, (_, eng) in runs.items()}
    first = next(name for name in runs if not name.endswith("/replicated"))
    start = 0
    if args.resume:
        try:
            meta = load_sharded_checkpoint(args.resume, runs[first][1], optims[first])
            start = int(meta["step"])
        except Exception as exc:  # recorded for the test to assert on
            record["error"] = f"{type(exc).__name__}: {exc}"
            torch.save(record, os.path.join(args.out, f"rank{rank}.pt"))
            dist.destroy_process_group()
            return
    record["A_init"] = {name: eng.layers[0].lora_A.detach().clone() for name, (_, eng) in runs.items()}
    record["comm_bytes"] = runs[first][1].comm_bytes()
    record["losses"] = {name: [] for name in runs}
    record["stats"] = {name: [] for name in runs}
    record["grads"] = {}
    for step in range(start, args.steps):
        ids = batch(step, rank)
        for name, (model, eng) in runs.items():
            optims[name].zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if step == start:
                record["grads"][name] = eng.layers[0].lora_A.grad.detach().clone()
            optims[name].step()
            record["stats"][name].append(eng.fold().to_dict())
            record["losses"][name].append(loss.item())
        if args.save_at and step + 1 == args.save_at:
            save_sharded_checkpoint(os.path.join(args.out, "ckpt"), runs[first][1], optims[first])
    record["W"] = {}
    for name, (_, eng) in runs.items():
        if name.endswith("/replicated"):
            record["W"][name] = {n: lyr.base_layer.weight.detach().clone() for n, lyr in zip(eng.names, eng.layers)}
            record.setdefault("master", {})[name] = {n: upd.master.clone() for n, upd in zip(eng.names, eng.updaters)
                                                     if upd.master is not None}
            continue
        merged = eng.merged_state_dict(rank0_only=False)  # W in the model dtype
        record["W"][name] = {n: merged[f"{n}.weight"] for n in eng.names}
        masters = {n: entry["precision_master"].full_tensor() for n, entry in eng.state_dict()["layers"].items()
                   if "precision_master" in entry}
        record.setdefault("master", {})[name] = masters
        record.setdefault("bytes", {})[name] = local_bytes(eng)
        record.setdefault("last_check", {})[name] = vars(eng.last_check)
    record["names"] = runs[first][1].names
    if args.perturb_a0_rank >= 0:
        eng = runs[first][1]
        record["mismatch"] = {}
        for mode in ("raise", "resync"):
            if rank == args.perturb_a0_rank:
                with torch.no_grad():
                    eng.layers[1].A0_all[0, 0] += 1e-3
            try:
                record["mismatch"][mode] = eng.check_consistency(on_mismatch=mode)
            except Exception as exc:  # recorded for the test to assert on
                record["mismatch"][mode] = f"{type(exc).__name__}: {exc}"
                if rank == args.perturb_a0_rank:
                    with torch.no_grad():
                        eng.layers[1].A0_all[0, 0] -= 1e-3
        record["A0_after_resync"] = eng.layers[1].A0_all.clone()
    if args.merged_dir:
        eng = runs[first][1]
        state = eng.merged_state_dict()
        if rank == 0:
            runs[first][0].save_pretrained(args.merged_dir, state_dict=state, max_shard_size="40KB")
        dist.barrier()
    torch.save(record, os.path.join(args.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
    end_worker()  # a torchrun child ends here: barrier, destroy the process group, exit
