"""One device of a real multi-process run (torchrun, gloo) of HD-PiSSA with W sharded by rows (FSDP2).

In the same process it trains, on the same data, the replicated engine and the sharded engine (one model per
communication scheme), so the test compares the gathered full W of each sharded run with the replicated W. Runs are
named ``"<kind>/<scheme>"``: kind ``fp32`` / ``bf16`` (weights of that dtype, ``precision="fp32"``), ``bf16_kahan`` /
``bf16_sr`` (bf16 weights in that precision mode) and ``bucket`` (fp32, small receive buckets); scheme ``replicated``
or a sharded exchange. Every collective of each sharded fold is recorded as it is called (bytes in and out), and each
rank's own rows of W as the fold writes them. Optionally it writes sharded checkpoints, resumes from them, checks the
resume refusals, and saves the merged model.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
from hdpissa_trl.engine.sharded import fold_target, shard_model
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


class FoldTap:
    """Records every flat collective called inside the sharded fold (``fold_sharded``), as it is called: its kind,
    the bytes this rank sends (its input) and the size of the buffer it receives into (the output, own part included).
    Measured at ``torch.distributed``, not taken from the engine's own counts."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_to_all_single", "all_gather", "broadcast")

    def __init__(self):
        self.calls: list[dict] | None = None
        self.depth = 0

    def install(self) -> None:
        import hdpissa_trl.engine.sharded as sharded

        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))
        fold = sharded.fold_sharded

        def tapped_fold(*args, **kwargs):
            self.calls = []
            try:
                return fold(*args, **kwargs)
            finally:
                self.folds.append(self.calls)
                self.calls = None

        self.folds: list[list[dict]] = []
        sharded.fold_sharded = tapped_fold

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            if self.calls is not None and not self.depth:  # the outermost call (one collective may call another)
                out, inp = args[0], args[1]
                world, me = dist.get_world_size(kwargs.get("group")), dist.get_rank(kwargs.get("group"))
                if name == "all_to_all_single":
                    out_split, in_split = kwargs["output_split_sizes"], kwargs["input_split_sizes"]
                    sent, received = 4 * (sum(in_split) - in_split[me]), 4 * (sum(out_split) - out_split[me])
                else:
                    sent, received = inp.nbytes, out.nbytes - inp.nbytes
                self.calls.append({"name": name, "sent": sent, "received": received, "buffer": out.nbytes,
                                   "world": world})
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1

        return wrapped


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


def ckpt_dir(out: str, name: str) -> str:
    return os.path.join(out, "ckpt" if name == "fp32/all_gather" else f"ckpt-{name.replace('/', '-')}")


def precision_state(eng) -> dict[str, dict[str, torch.Tensor]]:
    """Every rank's view of the full precision state (fp32 master / Kahan compensation) of a sharded run."""
    return {n: {k[len("precision_"):]: v.full_tensor() for k, v in entry.items() if k.startswith("precision_")}
            for n, entry in eng.state_dict()["layers"].items()}


def state_after_fold(name: str, eng) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: the full W and the full precision state of a run (every rank's view)."""
    if name.endswith("/replicated"):
        return {n: {"W": lyr.base_layer.weight.detach().clone(), **{k: v.clone() for k, v in upd.state().items()}}
                for n, lyr, upd in zip(eng.names, eng.layers, eng.updaters)}
    merged = eng.merged_state_dict(rank0_only=False)
    state = precision_state(eng)
    return {n: {"W": merged[f"{n}.weight"], **state[n]} for n in eng.names}


def check_failures(eng, rank: int, perturb_rank: int) -> dict[str, str]:
    """On ``perturb_rank``: change one row of device 0's B0 held by this rank, then make the fold write W's rows into
    a tensor FSDP2 no longer gathers (what a weight replaced after injection does); each check must stop naming it."""
    out = {}
    layer = eng.layers[0]

    def attempt(what: str) -> None:
        try:
            eng.check_consistency(on_mismatch="resync")
            out[what] = "no error"
        except Exception as exc:  # recorded for the test to assert on
            out[what] = f"{type(exc).__name__}: {exc}"

    kept = layer.B0_rows[0, 0].item()
    if rank == perturb_rank:
        with torch.no_grad():
            layer.B0_rows[0, 0] += 1e-3
    attempt("B0")
    with torch.no_grad():
        layer.B0_rows[0, 0] = kept
    attempt("clean")
    if rank == perturb_rank:
        weight = layer.base_layer.weight
        with torch.no_grad():
            # The rows the fold writes become a copy that FSDP2's all-gather never reads (the DTensor's local tensor
            # gets new storage; FSDP2 keeps gathering its own buffer), then a fold-like change lands in that copy.
            weight._local_tensor.data = weight._local_tensor.detach().clone()
            fold_target(layer)[0, 0] += 1.0
    attempt("W")
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
    ap.add_argument("--precisions", default="",
                    help="bf16 weights in these precision modes (bf16_kahan, bf16_sr): a replicated run and one "
                         "sharded run with the first scheme each")
    ap.add_argument("--bucket_mb", type=float, default=0.0,
                    help="also run every scheme (fp32) with this bucket_size_mb, runs named bucket/<scheme>")
    ap.add_argument("--schemes", default="all_gather,all_to_all")
    ap.add_argument("--no_replicated", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="also a replicated and a sharded run (first scheme, fp32) with this lora_dropout, named "
                         "dropout/<scheme> (every run's masks are seeded per step and rank)")
    ap.add_argument("--init", default="svd", help="init_method of every run")
    ap.add_argument("--save_at", type=int, default=0, help="write sharded checkpoints after this many steps")
    ap.add_argument("--save_runs", default="", help="runs to checkpoint (default: the first sharded run)")
    ap.add_argument("--resume", default="",
                    help="a checkpoint directory (resumes the first sharded run), or 'auto': every sharded run resumes "
                         "from its own checkpoint under --ckpt_root")
    ap.add_argument("--ckpt_root", default="")
    ap.add_argument("--resume_refusals", action="store_true",
                    help="before resuming, load the first run's checkpoint into a run with another lora_dropout")
    ap.add_argument("--merged_dir", default="")
    ap.add_argument("--refusals", action="store_true",
                    help="record the errors of unsupported sharding layouts (a linear sharded on its own, a 2-D mesh)")
    ap.add_argument("--perturb_a0_rank", type=int, default=-1,
                    help="after training, this rank perturbs one A0 of the first sharded run: check raise and resync")
    ap.add_argument("--perturb_rank", type=int, default=-1,
                    help="after training, this rank perturbs B0, then W's fold target, of the first sharded run")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    record: dict = {"rank": rank, "world": world, "error": None}
    tap = FoldTap()
    tap.install()

    def config(scheme: str, precision: str = "fp32", bucket_mb: float = 0.0, dropout: float = 0.0) -> HDPiSSAConfig:
        return HDPiSSAConfig(r=args.lora_r, lora_alpha=args.alpha, precision=precision, sharded_comm=scheme,
                             sync_check_steps=1, bucket_size_mb=bucket_mb, lora_dropout=dropout,
                             init_method=args.init)

    def sharded(dtype: torch.dtype, cfg: HDPiSSAConfig):
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if dtype == torch.bfloat16 else None
        model = shard_model(make_model(args.hidden, args.inter, args.kv_heads, dtype), mesh=mesh, mp_policy=mp)
        return model, inject_hdpissa(model, cfg, show_progress=False)

    if args.refusals:
        record["refusals"] = refusals(args, world)
    schemes = args.schemes.split(",")
    runs = {}
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        if not args.no_replicated:
            model = make_model(args.hidden, args.inter, args.kv_heads, dtype)
            runs[f"{dname}/replicated"] = (model, inject_hdpissa(model, config("auto"), show_progress=False))
        for scheme in schemes:
            runs[f"{dname}/{scheme}"] = sharded(dtype, config(scheme))
    for precision in filter(None, args.precisions.split(",")):
        if not args.no_replicated:
            model = make_model(args.hidden, args.inter, args.kv_heads, torch.bfloat16)
            runs[f"{precision}/replicated"] = (model, inject_hdpissa(model, config("auto", precision),
                                                                     show_progress=False))
        runs[f"{precision}/{schemes[0]}"] = sharded(torch.bfloat16, config(schemes[0], precision))
    if args.bucket_mb:
        for scheme in schemes:
            runs[f"bucket/{scheme}"] = sharded(torch.float32, config(scheme, bucket_mb=args.bucket_mb))
    if args.dropout:
        if not args.no_replicated:
            model = make_model(args.hidden, args.inter, args.kv_heads)
            runs["dropout/replicated"] = (model, inject_hdpissa(model, config("auto", dropout=args.dropout),
                                                                show_progress=False))
        runs[f"dropout/{schemes[0]}"] = sharded(torch.float32, config(schemes[0], dropout=args.dropout))
    optims = {name: torch.optim.AdamW(eng.adapter_parameters(), lr=args.lr, weight_decay=0.0)
              for name, (_, eng) in runs.items()}
    first = next(name for name in runs if not name.endswith("/replicated"))
    save_runs = args.save_runs.split(",") if args.save_runs else [first]
    start = 0
    if args.resume_refusals:
        _, other = sharded(DTYPES[args.dtypes.split(",")[0]], config(schemes[0], dropout=0.25))
        try:
            load_sharded_checkpoint(args.resume if args.resume != "auto" else ckpt_dir(args.ckpt_root, first), other)
            record["refused_dropout"] = "no error"
        except Exception as exc:  # recorded for the test to assert on
            record["refused_dropout"] = f"{type(exc).__name__}: {exc}"
    if args.resume:
        resumed = [first] if args.resume != "auto" else [n for n in runs if not n.endswith("/replicated")]
        try:
            for name in resumed:
                src = args.resume if args.resume != "auto" else ckpt_dir(args.ckpt_root, name)
                meta = load_sharded_checkpoint(src, runs[name][1], optims[name])
                start = int(meta["step"])
        except Exception as exc:  # recorded for the test to assert on
            record["error"] = f"{type(exc).__name__}: {exc}"
            torch.save(record, os.path.join(args.out, f"rank{rank}.pt"))
            dist.destroy_process_group()
            return
    record["A_init"] = {name: eng.layers[0].lora_A.detach().clone() for name, (_, eng) in runs.items()}
    record["A0_all"] = {name: [lyr.A0_all.clone() for lyr in eng.layers] for name, (_, eng) in runs.items()}
    record["ranks"] = {name: [lyr.r for lyr in eng.layers] for name, (_, eng) in runs.items()}
    record["comm_bytes"] = runs[first][1].comm_bytes()
    record["losses"] = {name: [] for name in runs}
    record["stats"] = {name: [] for name in runs}
    record["calls"] = {name: [] for name in runs}
    record["grads"] = {}
    for step in range(start, args.steps):
        ids = batch(step, rank)
        for name, (model, eng) in runs.items():
            optims[name].zero_grad(set_to_none=True)
            torch.manual_seed(10_000 * step + rank)  # the same dropout masks in every run of this rank
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if step == start:
                record["grads"][name] = eng.layers[0].lora_A.grad.detach().clone()
            optims[name].step()
            record["stats"][name].append(eng.fold().to_dict())
            if not name.endswith("/replicated"):
                record["calls"][name].append(tap.folds[-1])
            record["losses"][name].append(loss.item())
            if step == start and name.split("/")[0] in ("bf16", "bf16_kahan", "bf16_sr"):
                record.setdefault("first_fold", {})[name] = state_after_fold(name, eng)
        if args.save_at and step + 1 == args.save_at:
            for name in save_runs:
                save_sharded_checkpoint(ckpt_dir(args.out, name), runs[name][1], optims[name])
    record["W"], record["local_rows"], record["rows"] = {}, {}, {}
    for name, (_, eng) in runs.items():
        record.setdefault("last_check", {})[name] = vars(eng.last_check)
        if name.endswith("/replicated"):
            record["W"][name] = {n: lyr.base_layer.weight.detach().clone() for n, lyr in zip(eng.names, eng.layers)}
            record.setdefault("precision", {})[name] = {n: {k: v.clone() for k, v in upd.state().items()}
                                                        for n, upd in zip(eng.names, eng.updaters)}
            continue
        merged = eng.merged_state_dict(rank0_only=False)  # W in the model dtype
        record["W"][name] = {n: merged[f"{n}.weight"] for n in eng.names}
        record["local_rows"][name] = {n: lyr.base_layer.weight.to_local().detach().clone()
                                      for n, lyr in zip(eng.names, eng.layers)}
        record["rows"][name] = {n: lyr.rows for n, lyr in zip(eng.names, eng.layers)}
        record.setdefault("precision", {})[name] = precision_state(eng)
        record.setdefault("bytes", {})[name] = local_bytes(eng)
    # Kept under its old name: the fp32 master of every run that has one.
    record["master"] = {name: {n: st["master"] for n, st in per.items() if "master" in st}
                        for name, per in record["precision"].items()}
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
    if args.perturb_rank >= 0:  # last: it leaves the first run's W detached from FSDP2
        record["failures"] = check_failures(runs[first][1], rank, args.perturb_rank)
    torch.save(record, os.path.join(args.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
    end_worker()  # a torchrun child ends here: barrier, destroy the process group, exit
