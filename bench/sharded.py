"""W sharded by rows (FSDP2) vs replicated W: per-rank memory, step time and bytes; the largest model under a per-rank
memory budget; the communication of both sharded fold schemes projected to K = 64, r = 16 on a Llama-3.1-70B shape.

    python -m bench.sharded                         # K = 2, 4 with real gloo processes, preset "cpu", budget search
    python -m bench.sharded --no-budget             # side-by-side runs only (~3 min on 2 busy cores)
    python -m bench.sharded --quick                 # smoke: tiny preset, K = 2, 2 steps, no budget search
    python -m bench.sharded --loading               # host RAM per rank while HDPiSSASFTTrainer loads + shards a model
    python -m bench.sharded --projection            # the 70B projection (formulas) alone

Every mode runs in its own ``torchrun`` job (K gloo processes, one torch thread each) on the same model shape, data and
seeds. The replicated mode builds the whole model on every rank; the sharded mode builds it on the meta device,
``fully_shard``-s the blocks and the root, and only then allocates and initialises this rank's rows (no rank ever
holds the whole model) before HD-PiSSA is injected (layer-at-a-time SVD init). Per rank it reports:

* peak memory: the peak resident set size above the process's size right before the model is built (what the model,
  the HD-PiSSA state, the optimizer, the activations and the collectives' buffers cost), and the tensor bytes counted
  one by one (parameters' local storage, buffers, precision state, optimizer state). The workers run with a fixed
  glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``): with glibc's default, a freed large buffer (FSDP2 frees every
  block's gathered weights after use) raises the threshold and later ones stay in the heap after ``free``, so the
  resident size counts memory nobody holds (measured: +250 MiB over 3 steps of the sharded run);
* step time (forward + backward + optimizer + fold; median over steps, a step counted as slow as its slowest rank);
* bytes this rank sends and receives in the fold, counted by wrapping the ``torch.distributed`` collectives (and,
  apart, FSDP2's own parameter all-gathers during forward and backward), checked against the engine's
  ``comm_bytes()``.

The budget search finds, per mode, the largest number of transformer blocks whose per-rank peak stays under
``--budget_mib``: a linear fit through two sizes predicts it, then runs at the prediction and one block more confirm it.

``--loading`` measures the trainer's own loading path instead: ``HDPiSSASFTTrainer(model=DIR)`` under the FSDP2 launch
settings of ``recipes/accelerate_configs/cpu_fsdp2.yaml`` (exported as ``accelerate launch`` exports them), with
``fsdp_cpu_ram_efficient_loading`` on and off: per rank the peak resident size while the trainer is built (loading,
sharding, SVD init), above the size right before, against the size of the model.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from bench import _common as common
from bench._runlog import peak_rss, reset_peak_rss

MODES = ("replicated", "all_gather", "all_to_all")  # replicated W, or sharded W with one of the two fold schemes
WRAPPED = ("all_gather_single", "all_gather_into_tensor", "all_to_all_single", "reduce_scatter_single",
           "reduce_scatter_tensor", "all_reduce", "broadcast")

# Llama-3.1-70B: hidden 8192, intermediate 28672, 80 blocks, 64 query / 8 KV heads of 128, vocabulary 128256.
LLAMA31_70B = {"blocks": 80, "shapes": [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192),
                                        (28672, 8192), (8192, 28672)], "vocab": 128256, "hidden": 8192}


# ------------------------------------------------------------------------------------------------------- counting
class Traffic(common.CollectiveTap):
    """Bytes each rank sends to and receives from the others in the wrapped collectives, per phase."""

    names = WRAPPED

    def __init__(self):
        super().__init__()
        self.phase: str | None = None
        self.bytes: dict[str, dict[str, int]] = {}

    def _add(self, sent: int, received: int) -> None:
        entry = self.bytes.setdefault(self.phase, {"sent": 0, "received": 0, "calls": 0})
        entry["sent"] += sent
        entry["received"] += received
        entry["calls"] += 1

    def on_call(self, name: str, args: tuple, kwargs: dict) -> None:
        if self.phase is None:
            return
        group = kwargs.get("group")
        world = dist.get_world_size(group)

        def nbytes(t):
            return t.numel() * t.element_size()

        if name in ("all_gather_single", "all_gather_into_tensor"):
            out = args[0] if args else kwargs.get("output_tensor")
            inp = args[1] if len(args) > 1 else kwargs.get("input_tensor")
            self._add(nbytes(inp) if world > 1 else 0, nbytes(out) - nbytes(inp))
        elif name == "all_to_all_single":
            out, inp = args[0], args[1]
            me = dist.get_rank(group)
            in_split = kwargs.get("input_split_sizes") or [inp.shape[0] // world] * world
            out_split = kwargs.get("output_split_sizes") or [out.shape[0] // world] * world
            per = inp.element_size() * (inp[0].numel() if inp.dim() > 1 else 1)
            self._add(per * (sum(in_split) - in_split[me]), per * (sum(out_split) - out_split[me]))
        else:
            t = args[0] if args else None
            self._add(nbytes(t) if torch.is_tensor(t) else 0, nbytes(t) if torch.is_tensor(t) else 0)


def tensor_bytes(model, engine, optimizer) -> dict[str, int]:
    """Bytes of this rank's tensors, by kind, each storage counted once (a row shard counts its local storage)."""
    from torch.distributed.tensor import DTensor

    seen, out = set(), {"params": 0, "buffers": 0, "precision_state": 0, "optimizer": 0}

    def add(kind: str, t: torch.Tensor) -> None:
        t = t.to_local() if isinstance(t, DTensor) else t
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return
        seen.add(storage.data_ptr())
        out[kind] += storage.nbytes()

    for p in model.parameters():
        add("params", p)
    for b in model.buffers():
        add("buffers", b)
    for upd in engine.updaters:
        for t in upd.state().values():
            add("precision_state", t)
    for state in optimizer.state.values():
        for t in state.values():
            if torch.is_tensor(t):
                add("optimizer", t)
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------------------------------- worker
def build_model(cfg: dict, sharded: bool, mesh):
    """The Llama-style model of ``cfg["shape"]``: whole on this rank, or row-sharded without ever being whole."""
    from transformers import AutoModelForCausalLM

    from hdpissa_trl.engine.sharded import shard_model
    from hdpissa_trl.testing_utils import tiny_config

    config = tiny_config("llama", **cfg["shape"])
    torch.manual_seed(cfg["seed"])
    if not sharded:
        return AutoModelForCausalLM.from_config(config).float()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shard_model(model, mesh=mesh)
    model.to_empty(device="cpu")
    model.init_weights()  # initialises this rank's rows (and recomputes the rotary buffers)
    return model


def worker(cfg: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from hdpissa_trl import HDPiSSAConfig, inject_hdpissa

    torch.set_num_threads(1)
    common.quiet_hf()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    sharded = cfg["mode"] != "replicated"
    base = common.rss_bytes()
    t0 = time.perf_counter()
    model = build_model(cfg, sharded, mesh)
    hd = HDPiSSAConfig(r=cfg["r"], lora_alpha=float(cfg["r"]), sync_check_steps=0,
                       sharded_comm=cfg["mode"] if sharded else "auto")
    engine = inject_hdpissa(model, hd, show_progress=False)
    init_seconds = time.perf_counter() - t0
    opt = torch.optim.AdamW(engine.adapter_parameters(), lr=1e-4, weight_decay=0.0)
    vocab = model.config.vocab_size
    times, traffic_steps = [], []
    with Traffic() as traffic:
        for step in range(cfg["warmup"] + cfg["steps"]):
            g = torch.Generator().manual_seed(1000 * step + rank)
            ids = torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=g)
            dist.barrier()
            traffic.bytes = {}
            ts = time.perf_counter()
            traffic.phase = "forward_backward"
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            traffic.phase = None
            opt.step()
            opt.zero_grad(set_to_none=True)
            traffic.phase = "fold"
            stats = engine.fold()
            traffic.phase = None
            if step >= cfg["warmup"]:
                times.append(time.perf_counter() - ts)
                traffic_steps.append({**traffic.bytes, "fold_stats": {"sent": stats.bytes_sent,
                                                                      "received": stats.bytes_received,
                                                                      "collectives": stats.num_collectives}})
    record = {"rank": rank, "world": world, "step_seconds": times, "init_seconds": init_seconds,
              "peak_bytes": common.peak_rss_bytes() - base, "tensor_bytes": tensor_bytes(model, engine, opt),
              "traffic": traffic_steps[-1] if traffic_steps else {},
              "comm_bytes": engine.comm_bytes() if sharded else None, "loss": loss.item(),
              "params": sum(p.numel() for p in model.parameters()), "layers": len(engine.layers)}
    gathered = [None] * world
    dist.all_gather_object(gathered, record)
    if rank == 0:
        with open(cfg["out"], "w", encoding="utf-8") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


def run_mode(mode: str, K: int, shape: dict, args, blocks: int | None = None) -> dict:
    """One ``torchrun`` job of ``mode`` with K processes; per-rank records reduced to the worst rank."""
    shape = dict(shape, num_layers=blocks or shape["num_layers"])
    cfg = {"mode": mode, "shape": shape, "r": args.r, "steps": args.steps, "warmup": args.warmup,
           "batch": args.batch, "seq": args.seq, "seed": 0}
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # see the module docstring; the workers inherit it
    ranks = common.launch_workers(__spec__.name, K, cfg, timeout=1800)  # this module
    steps = [max(r["step_seconds"][i] for r in ranks) for i in range(len(ranks[0]["step_seconds"]))]
    print(f"[sharded]   -> peak/rank {common.fmt_bytes(max(r['peak_bytes'] for r in ranks))}, tensors/rank "
          f"{common.fmt_bytes(max(r['tensor_bytes']['total'] for r in ranks))}, step {common.median(steps) * 1e3:.0f} ms", flush=True)
    return {"mode": mode, "K": K, "blocks": shape["num_layers"], "params": ranks[0]["params"],
            "step_seconds_median": common.median(steps), "init_seconds": max(r["init_seconds"] for r in ranks),
            "peak_bytes_max": max(r["peak_bytes"] for r in ranks),
            "tensor_bytes_max": max(r["tensor_bytes"]["total"] for r in ranks), "ranks": ranks}


# ------------------------------------------------------------------------------------------------ loading path
LOADING_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16, num_kv_heads=4)


def _hwm_bytes() -> int:
    """The high-water mark that :func:`reset_peak_rss` restarts (VmHWM); ``ru_maxrss`` where there is none."""
    return peak_rss() or common.peak_rss_bytes()


class RssSampler:
    """Samples ``/proc/self/status`` every few milliseconds in a thread: the peak of the anonymous resident memory
    (what this process allocated itself) and of the file-backed part (mapped files such as a safetensors checkpoint,
    whose pages the processes of one machine share through the page cache)."""

    def __init__(self, interval_s: float = 0.005):
        import threading

        self.interval_s, self.peak = interval_s, {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        out = {}
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.base = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def loading_worker(cfg: dict) -> None:
    """One rank: build HDPiSSASFTTrainer from the model directory (what the recipe does) and record host memory."""
    from datasets import Dataset
    from torch.distributed.tensor import DTensor
    from trl import SFTConfig

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer

    torch.set_num_threads(1)
    args = SFTConfig(output_dir=cfg["output_dir"], use_cpu=True, bf16=False, report_to=[], max_steps=1,
                     per_device_train_batch_size=1, max_length=16, save_strategy="no")
    data = Dataset.from_list([{"prompt": "1 + 1 =", "completion": " 2"}] * 4)
    dist.barrier()
    base = common.rss_bytes()
    reset = reset_peak_rss()
    with RssSampler() as sampler:
        trainer = HDPiSSASFTTrainer(model=cfg["model"], args=args, train_dataset=data,
                                    hdpissa_config=HDPiSSAConfig(r=4, lora_alpha=4, init_method="randomized"))
    peak = _hwm_bytes() - base
    anon = sampler.peak["RssAnon"] - sampler.base["RssAnon"]
    file_backed = sampler.peak["RssFile"] - sampler.base["RssFile"]
    params = list(trainer.model.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).untyped_storage().nbytes() for p in params)
    record = {"rank": dist.get_rank(), "peak_bytes": peak, "after_bytes": common.rss_bytes() - base,
              "peak_anon_bytes": anon, "peak_file_bytes": file_backed,
              "param_bytes_local": local, "peak_reset": reset,
              "sharded": any(isinstance(p, DTensor) for p in params)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    if dist.get_rank() == 0:
        with open(cfg["out"], "w", encoding="utf-8") as f:
            json.dump(gathered, f)
    dist.barrier()


def loading(args) -> dict:
    """Per-rank host memory of the trainer's loading path with ``cpu_ram_efficient_loading`` on and off (K = 2)."""
    import tempfile

    from hdpissa_trl.testing_utils import save_tiny_model

    fsdp_env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false",
                "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_ACTIVATION_CHECKPOINTING": "false"}
    out = {"shape": LOADING_SHAPE, "K": 2, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_model(os.path.join(tmp, "model"), **LOADING_SHAPE)
        out["model_bytes"] = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                                 if f.endswith(".safetensors"))
        saved = {k: os.environ.get(k) for k in [*fsdp_env, "FSDP_CPU_RAM_EFFICIENT_LOADING", "MALLOC_MMAP_THRESHOLD_"]}
        try:
            os.environ.update(fsdp_env, MALLOC_MMAP_THRESHOLD_="131072")
            for efficient in ("true", "false"):
                os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = efficient
                print(f"[sharded] loading path, cpu_ram_efficient_loading={efficient} ...", flush=True)
                cfg = {"model": model_dir, "output_dir": os.path.join(tmp, f"out-{efficient}"), "mode": "loading"}
                out["runs"][efficient] = common.launch_workers(__spec__.name, 2, cfg, timeout=1800)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    rows = [[f"cpu_ram_efficient_loading={eff}", rk["rank"], common.fmt_bytes(rk["peak_bytes"]),
             f"{rk['peak_bytes'] / out['model_bytes']:.2f}×", common.fmt_bytes(rk["peak_anon_bytes"]),
             f"{rk['peak_anon_bytes'] / out['model_bytes']:.2f}×", common.fmt_bytes(rk["peak_file_bytes"]),
             common.fmt_bytes(rk["param_bytes_local"]), "yes" if rk["sharded"] else "no"]
            for eff, ranks in out["runs"].items() for rk in ranks]
    common.print_table(["setting", "rank", "peak RSS while built", "vs model", "peak anonymous", "vs model",
                        "peak file-backed", "parameters held after", "sharded"], rows,
                       title=f"HDPiSSASFTTrainer(model=DIR) with W sharded, K=2: model {common.fmt_bytes(out['model_bytes'])}"
                             f" (fp32 safetensors)")
    return out


def dispatch_worker(cfg: dict) -> None:
    (loading_worker if cfg.get("mode") == "loading" else worker)(cfg)


# ----------------------------------------------------------------------------------------------------- formulas
def fold_bytes(shapes: list[tuple[int, int]], r: int, K: int) -> dict[str, int]:
    """fp32 bytes one rank receives per fold: one all-gather of every (dA, dB), or all-gather(dA) + all-to-all(dB rows)
    (rows split evenly; FSDP2's uneven last shard changes this by at most one row per layer)."""
    a = sum(r * n for _, n in shapes)
    b = sum(r * m for m, _ in shapes)
    return {"all_gather": 4 * (K - 1) * (a + b), "all_to_all": 4 * (K - 1) * (a + b // K)}


def memory_per_rank(shapes: list[tuple[int, int]], other_params: int, r: int, K: int, sharded: bool,
                    w_bytes: int = 2, master: bool = True) -> dict[str, float]:
    """Bytes per rank of what HD-PiSSA keeps (bf16 W + fp32 master), by item; formula, no activations."""
    w = sum(m * n for m, n in shapes) + other_params
    a_side, b_side = sum(n for _, n in shapes), sum(m for m, _ in shapes)
    div = K if sharded else 1
    items = {
        "W (bf16)": w_bytes * w / div,
        "fp32 master of adapted W": (4 * sum(m * n for m, n in shapes) / div) if master else 0,
        "A0_all (K·r × n, fp32, every rank)": 4 * K * r * a_side,
        "B0 (replicated: m × K·r; sharded: rows + own slice)": 4 * (K * r * b_side if not sharded else 2 * r * b_side),
        "adapters + grads + AdamW state (fp32)": 4 * 4 * r * (a_side + b_side),
    }
    items["total"] = sum(items.values())
    return items


def fold_transient_bytes(shapes: list[tuple[int, int]], r: int, K: int, scheme: str, cap_bytes: int | None,
                         kahan: bool = False) -> dict[str, int]:
    """Bytes the sharded fold allocates on top of the steady state (formula, following ``engine/sharded.py``): one
    bucket's receive buffers (the buckets of ``receive_buckets``; ``cap_bytes=None``: one bucket of everything, the
    behaviour before the receive cap) and send buffers, plus one layer's GEMM operands ``[dB | B0]`` (m_j × 2Kr, and
    its α-scaled copy), ``A0 + dA`` and ``[A ; dA]`` (3·Kr × n), and, for Kahan / stochastic rounding, the m_j × n fp32
    product."""
    from types import SimpleNamespace

    from hdpissa_trl.engine.sharded import layer_receive_bytes, receive_buckets

    layers = [SimpleNamespace(r=r, out_features=m, in_features=n) for m, n in shapes]
    buckets = ([list(range(len(layers)))] if cap_bytes is None
               else receive_buckets(layers, K, scheme, cap_bytes))
    receive = max(sum(layer_receive_bytes(layers[i], K, scheme) for i in b) for b in buckets)
    # Sent: this device's dA and dB of the bucket, plus the concatenated copy the collective takes.
    send = max(2 * 4 * sum(r * (layers[i].in_features + layers[i].out_features) for i in b) for b in buckets)
    per_layer = max(4 * (2 * 2 * -(-m // K) * K * r + 3 * K * r * n + (-(-m // K) * n if kahan else 0))
                    for m, n in shapes)
    return {"receive": receive, "send": send, "one layer's GEMM operands": per_layer,
            "total": receive + send + per_layer}


def init_transient_bytes(shapes: list[tuple[int, int]], r: int, K: int, method: str = "svd",
                         w_bytes: int = 2) -> int:
    """Bytes the owner of the largest layer allocates while it factors it (formula, following
    ``sharded_init_factors``): the gathered W (padded to K·ceil(m/K) rows) and its fp32 copy, the SVD's U, S, Vh
    (exact: min(m, n) columns; randomized: 2·K·r), A0_all and B0_all, the scatter's pieces and the receive buffer. LAPACK's
    own workspace is not counted."""
    k = K * r
    worst = 0
    for m, n in set(shapes):
        p = min(m, n) if method == "svd" else min(max(2 * k, k + 8), min(m, n))
        chunk = -(-m // K)
        total = (w_bytes * K * chunk * n + (4 * m * n if w_bytes != 4 else 0) + 4 * (m * p + p + p * n)
                 + 4 * (k * n + m * k) + 4 * K * (chunk * k + m * r) + 4 * (chunk * k + m * r))
        worst = max(worst, total)
    return worst


def projection(r: int = 16, K: int = 64) -> dict:
    from hdpissa_trl.engine.sharded import DEFAULT_RECEIVE_CAP_MB

    shapes = LLAMA31_70B["shapes"] * LLAMA31_70B["blocks"]
    other = 2 * LLAMA31_70B["vocab"] * LLAMA31_70B["hidden"]
    model_bytes = 2 * (sum(m * n for m, n in shapes) + other)
    sharded = memory_per_rank(shapes, other, r, K, sharded=True)
    factors = sharded["A0_all (K·r × n, fp32, every rank)"] + sharded["B0 (replicated: m × K·r; sharded: rows + own slice)"]
    cap = DEFAULT_RECEIVE_CAP_MB * 2**20
    fold = {f"{scheme}, {label}": fold_transient_bytes(shapes, r, K, scheme, c)
            for scheme in ("all_to_all", "all_gather") for label, c in (("default cap", cap), ("no cap", None))}
    init = {method: init_transient_bytes(shapes, r, K, method) for method in ("svd", "randomized")}
    steady_without_optimizer = sharded["total"] - sharded["adapters + grads + AdamW state (fp32)"]
    return {
        "K": K, "r": r, "model": "Llama-3.1-70B shapes (560 adapted layers, bf16)",
        "fold_bytes_received": fold_bytes(shapes, r, K),
        # FSDP2 all-gathers the bf16 parameters in the forward and again in the backward (reshard_after_forward).
        "fsdp_param_allgather_bytes_received": 2 * (K - 1) / K * model_bytes,
        "memory_replicated": memory_per_rank(shapes, other, r, K, sharded=False),
        "memory_sharded": sharded,
        "receive_cap_bytes": cap,
        "fold_transient_sharded": fold,
        "peak_in_fold": {k: sharded["total"] + v["total"] for k, v in fold.items()},
        "init_transient_sharded": init,
        # At the end of injection, before any optimizer state exists: the steady state without it, plus the largest
        # layer's factoring (its owner) -- and, before factors were freed as layers took them, every factor twice.
        "peak_in_init": {method: steady_without_optimizer + v for method, v in init.items()},
        "injection_factors_held_twice_before": factors,
    }


# --------------------------------------------------------------------------------------------------------- search
def budget_search(mode: str, K: int, shape: dict, args, budget: int) -> dict:
    """Largest block count whose per-rank peak stays under ``budget``: fit two sizes, then confirm the bracket."""
    runs = {}
    one_step = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0})  # the peak is reached in step one

    def peak(blocks: int) -> int:
        if blocks not in runs:
            print(f"[sharded]   budget search {mode} K={K}: {blocks} blocks ...", flush=True)
            runs[blocks] = run_mode(mode, K, shape, one_step, blocks)
        return runs[blocks]["peak_bytes_max"]

    lo, hi = args.fit_blocks
    slope = (peak(hi) - peak(lo)) / (hi - lo)
    if slope <= 0:
        raise RuntimeError(f"per-rank peak did not grow from {lo} to {hi} blocks ({mode}, K={K}): widen --fit_blocks")
    guess = max(1, int(lo + (budget - peak(lo)) / slope))
    while peak(guess) > budget and guess > 1:
        guess -= 1
    while peak(guess + 1) <= budget:
        guess += 1
    fits, over = runs[guess], runs[guess + 1]
    return {"mode": mode, "K": K, "budget_bytes": budget, "max_blocks": guess, "params": fits["params"],
            "peak_bytes": fits["peak_bytes_max"], "next_blocks_peak_bytes": over["peak_bytes_max"],
            "bytes_per_block_fit": slope, "runs": {b: {k: v for k, v in r.items() if k != "ranks"}
                                                   for b, r in sorted(runs.items())}}


# ----------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--blocks", type=int, default=8, help="transformer blocks of the side-by-side runs")
    ap.add_argument("--r", type=int, default=4, help="per-device rank (4: keeps K²·r/hidden near a 70B model's)")
    ap.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="micro-batch (1 x 32 tokens: weights, not activations, "
                                                             "dominate, as for a large model with micro-batch 1)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--budget_mib", type=float, default=256.0)
    ap.add_argument("--fit_blocks", type=int, nargs=2, default=[4, 12])
    ap.add_argument("--no-budget", dest="budget", action="store_false")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny preset, K=2, 2 steps, no budget search")
    ap.add_argument("--projection", action="store_true",
                    help="only the formula projection to a Llama-3.1-70B shape (K=64, r=16), no runs")
    ap.add_argument("--loading", action="store_true",
                    help="only the host memory of HDPiSSASFTTrainer's loading path, cpu_ram_efficient_loading on/off")
    ap.add_argument("--tag", default="")
    common.add_output_args(ap, worker=True)
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_or_run_worker(build_parser(), dispatch_worker, argv, quiet=False)
    if args.loading:
        info = common.env_info(nproc=2, backend="gloo", threads=1)
        result = {"loading": loading(args)}
        result["env"] = common.finish_env(info)
        common.write_json(f"sharded_loading{args.tag}.json", result, args.results_dir)
        return result
    if args.projection:
        proj = projection()
        print_projection(proj)
        common.write_json(f"sharded_projection{args.tag}.json", {"projection_70b": proj}, args.results_dir)
        return proj
    if args.quick:
        args.preset, args.nproc, args.steps, args.warmup, args.budget, args.blocks = "tiny", [2], 2, 0, False, 2
    common.quiet_hf()
    shape = dict(common.PRESETS[args.preset], num_layers=args.blocks)
    info = common.env_info(nproc=max(args.nproc), backend="gloo", threads=1)
    side = []
    for K in args.nproc:
        for mode in MODES:
            print(f"[sharded] K={K} {mode}: {args.blocks} blocks, {args.steps} steps ...", flush=True)
            side.append(run_mode(mode, K, shape, args))
    checks = []
    for res in side:
        if res["mode"] == "replicated":
            continue
        for rk in res["ranks"]:
            fold = rk["traffic"].get("fold", {"sent": 0, "received": 0})
            want = rk["comm_bytes"][res["mode"]]
            checks.append(fold["sent"] == want["sent"] == rk["traffic"]["fold_stats"]["sent"]
                          and fold["received"] == want["received"] == rk["traffic"]["fold_stats"]["received"])
    search = []
    if args.budget:
        budget = int(args.budget_mib * 2**20)
        search.append(budget_search("replicated", min(args.nproc), shape, args, budget))
        for K in args.nproc:
            search.append(budget_search("all_to_all", K, shape, args, budget))
    proj = projection()
    common.finish_env(info)

    rep = {res["K"]: res for res in side if res["mode"] == "replicated"}
    rows = []
    for res in side:
        base = rep[res["K"]]
        r0 = max(res["ranks"], key=lambda rk: rk["traffic"].get("fold", {}).get("received", 0))
        fold = r0["traffic"].get("fold", {"received": 0, "calls": 0})
        fsdp = r0["traffic"].get("forward_backward", {"received": 0})
        rows.append([res["K"], res["mode"] if res["mode"] == "replicated" else f"sharded, {res['mode']}",
                     common.fmt_bytes(res["peak_bytes_max"]), f"{res['peak_bytes_max'] / base['peak_bytes_max']:.2f}×",
                     common.fmt_bytes(res["tensor_bytes_max"]), f"{res['tensor_bytes_max'] / base['tensor_bytes_max']:.2f}×",
                     f"{res['step_seconds_median'] * 1e3:.0f} ms",
                     f"{res['step_seconds_median'] / base['step_seconds_median']:.2f}×",
                     common.fmt_bytes(fold["received"]), fold["calls"], common.fmt_bytes(fsdp["received"])])
    common.print_table(["K", "mode", "peak/rank", "vs repl.", "tensors/rank", "vs repl.", "step", "vs repl.",
                 "fold recv/rank", "fold calls", "FSDP gathers recv/rank"], rows,
                title=f"Preset '{args.preset}' with {args.blocks} blocks ({side[0]['params'] / 1e6:.1f} M params, "
                      f"fp32), r={args.r}, batch {args.batch}x{args.seq} ({common.env_line(info)})")
    print("fold bytes counted at the collectives == engine.comm_bytes() == FoldStats on every rank:",
          "ALL EQUAL" if all(checks) else "MISMATCH")
    if search:
        common.print_table(["mode", "K", "budget/rank", "max blocks", "params", "peak at max", "peak at max+1"],
                    [[s["mode"] if s["mode"] == "replicated" else "sharded", s["K"], common.fmt_bytes(s["budget_bytes"]),
                      s["max_blocks"], f"{s['params'] / 1e6:.1f} M", common.fmt_bytes(s["peak_bytes"]),
                      common.fmt_bytes(s["next_blocks_peak_bytes"])] for s in search],
                    title="Largest model (transformer blocks of the preset) that trains under the per-rank budget")
    print_projection(proj)
    result = {"env": info, "args": {k: v for k, v in vars(args).items()
                                    if k not in ("results_dir", "figures_dir", "worker")},
              "side_by_side": side, "fold_bytes_checks_equal": all(checks), "budget_search": search,
              "projection_70b": proj}
    common.write_json(f"sharded{args.tag}.json", result, args.results_dir)
    return result


def print_projection(proj: dict) -> None:
    fb = proj["fold_bytes_received"]
    common.print_table(["item", "replicated W", "sharded W"],
                [[k, common.fmt_bytes(proj["memory_replicated"][k]), common.fmt_bytes(proj["memory_sharded"][k])]
                 for k in proj["memory_replicated"]],
                title=f"Projection (formula): {proj['model']}, K={proj['K']}, r={proj['r']}: memory per rank")
    common.print_table(["transient on top of the steady state (formula)", "bytes / rank", "peak / rank"],
                [[f"fold, {k}", common.fmt_bytes(v["total"]), common.fmt_bytes(proj["peak_in_fold"][k])]
                 for k, v in proj["fold_transient_sharded"].items()]
                + [[f"SVD init of the largest layer ({k})", common.fmt_bytes(v), common.fmt_bytes(proj["peak_in_init"][k])]
                   for k, v in proj["init_transient_sharded"].items()]
                + [["every factor held twice at injection (before it was freed layer by layer)",
                    common.fmt_bytes(proj["injection_factors_held_twice_before"]), ""]],
                title=f"Projection (formula), W sharded: peaks in the fold (receive cap "
                      f"{common.fmt_bytes(proj['receive_cap_bytes'])}) and in the init")
    print(f"fold bytes received per rank and step: all_gather {common.fmt_bytes(fb['all_gather'])}, all_to_all "
          f"{common.fmt_bytes(fb['all_to_all'])} ({fb['all_gather'] / fb['all_to_all']:.2f}x fewer); FSDP2's own parameter "
          f"all-gathers (forward + backward): {common.fmt_bytes(proj['fsdp_param_allgather_bytes_received'])}")


if __name__ == "__main__":
    main()
