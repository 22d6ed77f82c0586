"""Collectives and bytes per optimizer step: HD-PiSSA (one all_gather of deltas) vs the official scheme.

Measured with real gloo processes for K = 2 and 4: every ``torch.distributed`` collective is wrapped to count its
calls and the bytes of the buffers it moves, around the fold that follows each optimizer step. K = 8 (and a
Llama-3.1-8B-shaped model) are computed by the formula, which is first checked against the measured K = 2, 4 numbers.

    python -m bench.communication                     # preset "cpu" model, K = 2, 4 measured, 8 computed
    python -m bench.communication --preset tiny --nproc 2

Formula, per optimizer step and per device, for adapted layers of shapes (m_i × n_i) and per-device rank r,
P = 4 bytes · Σ_i r·(m_i + n_i) (one device's fp32 ``dA, dB`` of every layer):

* HD-PiSSA: 1 collective (``all_gather`` of one flat buffer; one per bucket if ``bucket_size_mb`` caps it),
  contributes P, receives (K−1)·P.
* official scheme: 4·L collectives (``all_gather`` of dA, dB, A, B per layer), contributes 2·P, receives 2·(K−1)·P.
* data-parallel LoRA/PiSSA (formula only, for context; DDP's collectives run in C++ where Python cannot count
  them): one all-reduce of the adapter gradients, payload P; a ring all-reduce moves 2·(K−1)/K·P per device.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from bench import _common as common

COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_gather_object")

# Llama-3.1-8B: hidden 4096, intermediate 14336, 32 blocks, 32 query / 8 KV heads of 128.
LLAMA31_8B_SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096),
                     (14336, 4096), (14336, 4096), (4096, 14336)] * 32


def formula(shapes: list[tuple[int, int]], r: int, K: int, buckets: int = 1) -> dict:
    """Collectives and bytes per optimizer step and device for both schemes (see module docstring)."""
    P = 4 * sum(r * (m + n) for m, n in shapes)
    L = len(shapes)
    return {
        "K": K,
        "hdpissa": {"collectives": buckets if K > 1 else 0, "bytes_contributed": P if K > 1 else 0,
                    "bytes_received": (K - 1) * P},
        "official": {"collectives": 4 * L if K > 1 else 0, "bytes_contributed": 2 * P if K > 1 else 0,
                     "bytes_received": 2 * (K - 1) * P},
        "dp_lora_allreduce": {"collectives": 1 if K > 1 else 0, "payload_bytes": P,
                              "ring_bytes_per_device": 2 * (K - 1) / K * P},
        "per_device_delta_bytes": P,
        "num_layers": L,
    }


class CollectiveCounter(common.CollectiveTap):
    """Counts the wrapped collectives' calls and the bytes each rank contributes and receives (while ``enabled``)."""

    names = COLLECTIVES

    def __init__(self):
        super().__init__()
        self.enabled = False
        self.calls: dict[str, int] = {}
        self.contributed = 0
        self.received = 0

    def reset(self):
        self.calls, self.contributed, self.received = {}, 0, 0

    @staticmethod
    def _nbytes(t) -> int:
        if isinstance(t, (list, tuple)):
            return sum(CollectiveCounter._nbytes(x) for x in t)
        return t.numel() * t.element_size() if torch.is_tensor(t) else 0

    def on_call(self, name: str, args: tuple, kwargs: dict) -> None:
        if not self.enabled:
            return
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in ("all_gather_single", "all_gather_into_tensor", "all_gather"):
            out = args[0] if args else kwargs.get("output_tensor", kwargs.get("tensor_list"))
            inp = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("tensor"))
            self.contributed += self._nbytes(inp)
            self.received += self._nbytes(out) - self._nbytes(inp)
        elif torch.is_tensor(args[0] if args else None):
            self.contributed += self._nbytes(args[0])


def measure(preset: str, r: int, steps: int, rank: int, world: int) -> dict:
    """On every rank: per-step collectives and bytes of the HD-PiSSA fold and of the official-style fold."""
    out = {}
    for scheme in ("hdpissa", "official"):
        model = common.build_llama(preset, seed=0)
        with CollectiveCounter() as counter:
            # One-time init traffic (factor broadcasts, first weight check) is counted apart from the per-step one.
            counter.enabled = True
            setup = common.setup_method(scheme, model, r, float(r), world=world, rank=rank, distributed=True)
            init = {"calls": dict(counter.calls), "bytes_contributed": counter.contributed}
            counter.enabled = False
            opt = torch.optim.AdamW(setup.params, lr=1e-3, weight_decay=0.0)
            vocab = setup.inner.config.vocab_size
            per_step, engine_stats, seconds = [], [], []
            for step in range(steps):
                counter.enabled = False
                g = torch.Generator().manual_seed(100 * step + rank)
                ids = torch.randint(0, vocab, (2, 16), generator=g)
                loss = setup.model(input_ids=ids, labels=ids).loss
                loss.backward()
                if setup.after_backward is not None:
                    setup.after_backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                counter.reset()
                counter.enabled = True
                stats = setup.after_step()
                counter.enabled = False
                per_step.append({"calls": dict(counter.calls), "collectives": sum(counter.calls.values()),
                                 "bytes_contributed": counter.contributed, "bytes_received": counter.received})
                engine_stats.append({k: stats[k] for k in ("num_collectives", "bytes_sent")})
                seconds.append(stats["gather_seconds"])
        shapes = [(lyr.out_features, lyr.in_features) for lyr in setup.engine.layers]
        out[scheme] = {"per_step": per_step, "reported_by_fold": engine_stats, "gather_seconds": seconds,
                       "init": init, "shapes": shapes}
    return out


def worker(cfg: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    res = measure(cfg["preset"], cfg["r"], cfg["steps"], rank, world)
    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        with open(cfg["out"], "w", encoding="utf-8") as f:
            json.dump({"ranks": gathered, "world": world}, f)
    dist.barrier()
    dist.destroy_process_group()


def run_measured(K: int, preset: str, r: int, steps: int, timeout: float = 600) -> dict:
    """Launch K gloo processes and return the measured per-step numbers (identical on every rank, checked)."""
    raw = common.launch_workers(__spec__.name, K, {"preset": preset, "r": r, "steps": steps}, timeout)  # this module
    out = {"K": K}
    for scheme in ("hdpissa", "official"):
        per_rank = [rk[scheme]["per_step"] for rk in raw["ranks"]]
        steps_r0 = per_rank[0]
        out[scheme] = {
            "collectives": steps_r0[0]["collectives"],
            "calls": steps_r0[0]["calls"],
            "bytes_contributed": steps_r0[0]["bytes_contributed"],
            "bytes_received": steps_r0[0]["bytes_received"],
            "same_on_every_rank_and_step": all(s == steps_r0[0] for pr in per_rank for s in pr),
            "fold_reported": raw["ranks"][0][scheme]["reported_by_fold"][0],
            "gather_seconds_median": common.median(s for rk in raw["ranks"] for s in rk[scheme]["gather_seconds"]),
            "init_rank0": raw["ranks"][0][scheme]["init"],
        }
        out["shapes"] = raw["ranks"][0][scheme]["shapes"]
    return out


def check_formula(measured: dict, r: int) -> dict:
    """Compare the measured numbers with :func:`formula`; returns ``{field: (measured, formula, equal)}``."""
    pred = formula([tuple(s) for s in measured["shapes"]], r, measured["K"])
    checks = {}
    for scheme in ("hdpissa", "official"):
        for key in ("collectives", "bytes_contributed", "bytes_received"):
            m, p = measured[scheme][key], pred[scheme][key]
            checks[f"{scheme}.{key}"] = (m, p, m == p)
    fr = measured["hdpissa"]["fold_reported"]
    checks["hdpissa.FoldStats.bytes_sent"] = (fr["bytes_sent"], pred["hdpissa"]["bytes_contributed"],
                                              fr["bytes_sent"] == pred["hdpissa"]["bytes_contributed"])
    checks["hdpissa.FoldStats.num_collectives"] = (fr["num_collectives"], pred["hdpissa"]["collectives"],
                                                   fr["num_collectives"] == pred["hdpissa"]["collectives"])
    return checks


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--nproc", type=int, nargs="+", default=[2, 4], help="K values measured with real processes")
    ap.add_argument("--computed", type=int, nargs="+", default=[8], help="K values computed by the formula")
    ap.add_argument("--steps", type=int, default=2)
    common.add_output_args(ap, worker=True)
    return ap


def plot(rows: list[dict], big: list[dict], info: dict, args, figures_dir) -> str:
    fig = common.new_figure(figsize=(13, 4.3), layout="constrained")
    ax_c, ax_b, ax_8b = fig.subplots(1, 3)
    Ks = [row["K"] for row in rows]
    kinds = ["measured" if row["measured"] else "formula" for row in rows]
    x = list(range(len(Ks)))
    w = 0.38
    for ax, key, ylabel in ((ax_c, "collectives", "collectives per step"),
                            (ax_b, "bytes_received", "MiB received per device per step")):
        div = 1 if key == "collectives" else 2**20
        h = [row["hdpissa"][key] / div for row in rows]
        o = [row["official"][key] / div for row in rows]
        hatches = ["" if k == "measured" else "//" for k in kinds]
        for i in x:
            ax.bar(i - w / 2, h[i], w, color="#4C72B0", hatch=hatches[i], label="HD-PiSSA (ours)" if i == 0 else None)
            ax.bar(i + w / 2, o[i], w, color="#DD8452", hatch=hatches[i],
                   label="official-style scheme" if i == 0 else None)
        if key == "bytes_received":
            ax.plot(x, [row["dp_lora_allreduce"]["ring_bytes_per_device"] / div for row in rows], "k--", marker="o",
                    label="DP LoRA grad all-reduce (ring, formula)")
        ax.set_xticks(x, [f"K={k}\n({kd})" for k, kd in zip(Ks, kinds)])
        ax.set_ylabel(ylabel)
        ax.set_yscale("log" if key == "collectives" else "linear")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    ax_c.set_title(f"Collective calls, preset '{args.preset}', r={args.r}", fontsize=10)
    ax_b.set_title("Bytes received (hatched = formula)", fontsize=10)
    xs = list(range(len(big)))
    ax_8b.bar([i - w / 2 for i in xs], [b["hdpissa"]["bytes_received"] / 2**30 for b in big], w, color="#4C72B0",
              label="HD-PiSSA (ours)")
    ax_8b.bar([i + w / 2 for i in xs], [b["official"]["bytes_received"] / 2**30 for b in big], w, color="#DD8452",
              label="official-style scheme")
    ax_8b.plot(xs, [b["dp_lora_allreduce"]["ring_bytes_per_device"] / 2**30 for b in big], "k--", marker="o",
               label="DP LoRA (ring, formula)")
    ax_8b.set_xticks(xs, [f"K={b['K']}" for b in big])
    ax_8b.set_ylabel("GiB received per device per step")
    ax_8b.set_title(f"Llama-3.1-8B shapes, r={args.r} (formula)", fontsize=10)
    ax_8b.grid(True, axis="y", alpha=0.3)
    ax_8b.legend(fontsize=8)
    return common.save_figure(fig, "communication.png", info, figures_dir)


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_or_run_worker(build_parser(), worker, argv)
    info = common.env_info(nproc=max(args.nproc), backend="gloo", threads=1)
    measured = {}
    for K in args.nproc:
        print(f"[communication] K={K}: measuring with {K} gloo processes ...", flush=True)
        measured[K] = run_measured(K, args.preset, args.r, args.steps)
    shapes = [tuple(s) for s in measured[args.nproc[0]]["shapes"]]
    checks = {K: check_formula(m, args.r) for K, m in measured.items()}
    rows = []
    for K in sorted(set(args.nproc) | set(args.computed)):
        f = formula(shapes, args.r, K)
        row = {"K": K, "measured": K in measured, **f}
        if K in measured:
            for s in ("hdpissa", "official"):
                row[s] = {k: measured[K][s][k] for k in ("collectives", "bytes_contributed", "bytes_received")}
        rows.append(row)
    big = [formula(LLAMA31_8B_SHAPES, args.r, K) for K in (2, 4, 8)]
    common.finish_env(info)

    table = []
    for row in rows:
        h, o = row["hdpissa"], row["official"]
        table.append([row["K"], "measured" if row["measured"] else "formula", h["collectives"], o["collectives"],
                      common.fmt_bytes(h["bytes_contributed"]), common.fmt_bytes(o["bytes_contributed"]),
                      common.fmt_bytes(h["bytes_received"]), common.fmt_bytes(o["bytes_received"]),
                      f"{o['bytes_received'] / h['bytes_received']:.1f}×",
                      common.fmt_bytes(row["dp_lora_allreduce"]["ring_bytes_per_device"])])
    common.print_table(["K", "source", "HD-PiSSA calls", "official calls", "HD-PiSSA sent", "official sent",
                 "HD-PiSSA recv", "official recv", "official/ours", "DP-LoRA ring (formula)"], table,
                title=f"Per optimizer step and device, preset '{args.preset}' ({len(shapes)} adapted layers), "
                      f"r={args.r} ({common.env_line(info)})")
    common.print_table(["K", "HD-PiSSA calls", "official calls", "HD-PiSSA recv", "official recv", "DP-LoRA ring"],
                [[b["K"], b["hdpissa"]["collectives"], b["official"]["collectives"],
                  common.fmt_bytes(b["hdpissa"]["bytes_received"]), common.fmt_bytes(b["official"]["bytes_received"]),
                  common.fmt_bytes(b["dp_lora_allreduce"]["ring_bytes_per_device"])] for b in big],
                title=f"Llama-3.1-8B shapes (224 layers), r={args.r}, formula only")
    ok = all(eq for c in checks.values() for (_, _, eq) in c.values())
    print("formula check against measured K =", ", ".join(str(k) for k in measured), "->",
          "ALL EQUAL" if ok else "MISMATCH")
    for K, c in checks.items():
        for key, (m, p, eq) in c.items():
            if not eq:
                print(f"  K={K} {key}: measured {m} vs formula {p}")
    for K, m in measured.items():
        print(f"  K={K}: calls per step (HD-PiSSA) {m['hdpissa']['calls']}, (official) {m['official']['calls']}; "
              f"median gather time {m['hdpissa']['gather_seconds_median'] * 1e3:.1f} ms vs "
              f"{m['official']['gather_seconds_median'] * 1e3:.1f} ms; same on every rank and step: "
              f"{m['hdpissa']['same_on_every_rank_and_step'] and m['official']['same_on_every_rank_and_step']}")
    result = {"env": info, "args": {k: v for k, v in vars(args).items() if k not in ("results_dir", "figures_dir",
                                                                                       "worker")},
              "rows": rows, "llama31_8b": big, "checks": {str(k): v for k, v in checks.items()},
              "formula_matches_measured": ok,
              "measured": {str(k): {s: v[s] for s in ("hdpissa", "official")} for k, v in measured.items()}}
    if args.figure:
        print("figure:", os.path.relpath(plot(rows, big, info, args, args.figures_dir)))
    common.write_json("communication.json", result, args.results_dir)
    return result


if __name__ == "__main__":
    main()
