"""Shared helpers of the benchmark scripts: where a run happened, model presets, method set-up, launching, output.

Nothing here is timed. Every script imports this module, whether it runs as ``python -m bench.X``, under torchrun,
or as ``bench.X`` from the smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hdpissa_trl.engine.distributed import world_and_rank
from hdpissa_trl.launch import REPO_ROOT, child_env, end_worker, torchrun

FIGURES_DIR = os.path.join(REPO_ROOT, "bench", "figures")
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")

# Llama-style models built from a config (random weights). "cpu" is what this repository measures on a laptop-class
# CPU; "1b" is a TinyLlama-1.1B-shaped model for the GPU machine; "tiny" keeps the smoke test fast.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
    "cpu": dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8, num_kv_heads=4),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
               num_kv_heads=4),
}

# The benchmark methods that are HD-PiSSA engines (the paper's slices, and slice_gradient="global").
HDPISSA_METHODS = ("hdpissa", "hdpissa_global")

METHOD_LABELS = {
    "hdpissa": "HD-PiSSA (ours)",
    "hdpissa_global": "HD-PiSSA, global slice grads",
    "lora": "PEFT LoRA",
    "pissa": "PEFT PiSSA",
    "full": "full fine-tuning",
    "official": "official-style (re-impl.)",
}


# --------------------------------------------------------------------------------------------------- environment
def cpu_model() -> str:
    """The CPU model name as the kernel reports it (read at run time, never hard-coded)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def quiet_hf() -> None:
    """No progress bars / info logs from transformers and PEFT in benchmark output."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def env_info(nproc: int | None = None, backend: str | None = None, device: str = "cpu",
             threads: int | None = None) -> dict:
    """Where and under what load a benchmark ran (no host names, no paths).

    ``threads``: torch threads of each measuring process (default: this process's setting).
    """
    info = {
        "device": device,
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads_per_process": threads if threads is not None else torch.get_num_threads(),
        "load_avg_1min_start": load_average(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if nproc is not None:
        info["processes"] = nproc
    if backend is not None:
        info["backend"] = backend
    return info


def finish_env(info: dict) -> dict:
    info["load_avg_1min_end"] = load_average()
    return info


def env_line(info: dict) -> str:
    """One line for figure footers and table captions, e.g. ``2-core CPU (...), gloo x2, torch 2.13``."""
    if info.get("device") == "cuda":
        where = f"GPU {info.get('gpu', '?')}"
    else:
        where = f"{info.get('logical_cores', '?')}-core CPU ({info.get('cpu_model', '?')})"
    parts = [where]
    if info.get("backend"):
        parts.append(f"{info['backend']} x{info.get('processes', 1)} processes")
    parts.append(f"torch {info.get('torch', '?').split('+')[0]}")
    load = [info.get("load_avg_1min_start"), info.get("load_avg_1min_end")]
    if any(v is not None for v in load):
        parts.append("load avg " + "→".join(str(v) for v in load if v is not None))
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------- statistics
def median(xs) -> float:
    xs = [float(x) for x in xs]
    return statistics.median(xs) if xs else float("nan")


def mean_std(xs) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def print_table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """Print (and return) a GitHub-markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(f"\n{title}")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, obj: dict, results_dir: str | None = None) -> str:
    results_dir = results_dir or RESULTS_DIR
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    return path


def add_output_args(ap, worker: bool = False) -> None:
    """The flags every script shares: where results and figures go, ``--no-figure``, and (for scripts that launch
    torchrun workers) the internal ``--worker`` settings file."""
    ap.add_argument("--results_dir", default=None)
    ap.add_argument("--figures_dir", default=None)
    ap.add_argument("--no-figure", dest="figure", action="store_false")
    if worker:
        ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: JSON settings of a worker


def launch_workers(module: str, nproc: int, cfg: dict, timeout: float = 600, echo: bool = False,
                   threads: int = 1):
    """Run ``module`` (``python -m``) as ``nproc`` torchrun processes with ``--worker SETTINGS.json`` (``cfg`` plus
    ``out``, the file the workers write their result to), and return that result."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(cfg, out=os.path.join(tmp, "out.json"))
        path = os.path.join(tmp, "worker.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        torchrun(module, nproc, ["--worker", path], timeout=timeout, echo=echo, env=child_env(threads=threads))
        with open(cfg["out"], encoding="utf-8") as f:
            return json.load(f)


def worker_settings(path: str) -> dict:
    """The settings a :func:`launch_workers` worker was started with."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def parse_or_run_worker(parser, worker, argv: list[str] | None = None, quiet: bool = True):
    """The start of every script's ``main``: parse ``argv``; in a torchrun child (``--worker SETTINGS.json``) run
    ``worker(settings)`` and end the process (:func:`hdpissa_trl.launch.end_worker`), else return the parsed
    arguments for the driver."""
    args = parser.parse_args(argv)
    if quiet:
        quiet_hf()
    if args.worker:
        worker(worker_settings(args.worker))
        end_worker()  # a torchrun child ends here (see end_worker for why not a plain return)
    return args


def save_figure(fig, name: str, info: dict, figures_dir: str | None = None) -> str:
    """Save ``fig`` as ``figures_dir/name`` with a footer saying where it ran."""
    figures_dir = figures_dir or FIGURES_DIR
    os.makedirs(figures_dir, exist_ok=True)
    fig.text(0.005, -0.005, "measured on: " + env_line(info), fontsize=7.5, color="0.3", ha="left", va="top")
    path = os.path.join(figures_dir, name)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.08)
    return path


def new_figure(*args, **kwargs):
    """A matplotlib Figure that needs no GUI backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(*args, **kwargs)
    FigureCanvasAgg(fig)
    return fig


# -------------------------------------------------------------------------------------------------------- models
def build_llama(preset: str | dict = "cpu", seed: int = 0, dtype: torch.dtype = torch.float32,
                initializer_range: float = 0.02):
    """A Llama-style causal LM built from a config (random weights, deterministic for ``seed``)."""
    from hdpissa_trl.testing_utils import build_tiny_model

    kw = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    model = build_tiny_model("llama", seed=seed, initializer_range=initializer_range, **kw)
    return model.to(dtype)


def block_linear_names(model) -> list[str]:
    """Names of the ``nn.Linear`` modules inside the transformer blocks (all-linear minus the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


# ------------------------------------------------------------------------------------------------------- methods
@dataclass
class MethodSetup:
    """One fine-tuning method on one model: what to optimise and what to call after ``optimizer.step()``.

    ``model`` is what the training loop calls (possibly DDP-wrapped), ``params`` the trainable tensors,
    ``after_backward`` runs before the optimizer step (official-style gradient rescale), ``after_step`` after it
    (HD-PiSSA / official-style fold) and returns a dict with at least ``seconds`` and ``gather_seconds``.
    """

    name: str
    model: Any
    params: list
    after_step: Callable[[], dict] | None = None
    after_backward: Callable[[], None] | None = None
    engine: Any = None
    inner: Any = None  # the unwrapped model (default: ``model``)
    ddp: bool = False

    def __post_init__(self) -> None:
        if self.inner is None:
            self.inner = self.model

    def no_sync(self, last_micro: bool):
        if self.ddp and not last_micro:
            return self.model.no_sync()
        return nullcontext()


def data_parallel_model(name: str, model, cfg):
    """``model`` made ready for a data-parallel baseline: PEFT's LoRA / PiSSA adapter built by the trainers' own
    ``build_peft_config`` (same layers, same init as HD-PiSSA's config says), or every weight trainable for full FT."""
    if name in ("lora", "pissa"):
        from peft import get_peft_model

        from hdpissa_trl import build_peft_config

        return get_peft_model(model, build_peft_config(name, cfg))
    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    raise ValueError(f"unknown method {name!r}")


def setup_method(name: str, model, r: int, alpha: float, world: int = 1, rank: int = 0, distributed: bool = False,
                 init_method: str = "svd", n_iter: int = 4, precision: str = "fp32", use_ddp: bool = True,
                 target_modules="all-linear", hdpissa_options: dict | None = None) -> MethodSetup:
    """Prepare ``model`` (in place) for method ``name`` in {hdpissa, hdpissa_global, lora, pissa, full, official}.

    ``hdpissa_global`` is HD-PiSSA with ``slice_gradient="global"``: its reduce of every slice's gradient runs as
    ``after_backward`` (before the optimizer step, where the trainer runs it).

    Data-parallel baselines (lora, pissa, full) are wrapped in ``DistributedDataParallel`` when ``distributed`` and
    ``use_ddp`` (what a user of ``transformers.Trainer`` gets); HD-PiSSA and the official-style step never are.
    """
    from hdpissa_trl import HDPiSSAConfig, inject_hdpissa

    options = dict(hdpissa_options or {}, **({"slice_gradient": "global"} if name == "hdpissa_global" else {}))
    cfg = HDPiSSAConfig(r=r, lora_alpha=alpha, target_modules=target_modules, init_method=init_method,
                        n_iter=n_iter, precision=precision, sync_check_steps=0, **options)
    if name in HDPISSA_METHODS:
        engine = inject_hdpissa(model, cfg, rank=rank, world_size=world, show_progress=False)
        reduce = engine.reduce_slice_gradients if engine.global_slice_gradients else None
        return MethodSetup(name, model, engine.adapter_parameters(), after_step=lambda: engine.fold().to_dict(),
                           after_backward=reduce, engine=engine)
    if name == "official":
        from bench.official_style import inject_official_style

        off = inject_official_style(model, r=r, lora_alpha=alpha, rank=rank, world_size=world,
                                    target_modules=target_modules)
        return MethodSetup(name, model, off.adapter_parameters(), after_step=off.fold,
                           after_backward=off.rescale_gradients, engine=off)
    inner = data_parallel_model(name, model, cfg)
    params = [p for p in inner.parameters() if p.requires_grad]
    wrapped, ddp = inner, False
    if distributed and use_ddp and world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped, ddp = DistributedDataParallel(inner), True
    return MethodSetup(name, wrapped, params, inner=inner, ddp=ddp)


def allreduce_mean_grads(params) -> None:
    """Average gradients over ranks in one flat all_reduce (the arithmetic of DDP, without its overlap)."""
    world, _ = world_and_rank()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


class CollectiveTap:
    """While active, every named ``torch.distributed`` collective first calls :meth:`on_call` with its arguments (to
    count calls and bytes), then runs; the originals are restored on exit. Subclasses say what to count."""

    names: tuple[str, ...] = ()

    def __init__(self):
        self._orig = {}

    def __enter__(self):
        for name in self.names:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._orig[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)
        self._orig = {}

    def on_call(self, name: str, args: tuple, kwargs: dict) -> None:
        raise NotImplementedError

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            self.on_call(name, args, kwargs)
            return fn(*args, **kwargs)

        return wrapped


def linear_weights(setup: MethodSetup) -> dict[str, torch.Tensor]:
    """The effective (merged) weight of every block linear, fp32, keyed by the plain model's module name."""
    out: dict[str, torch.Tensor] = {}
    if setup.name in HDPISSA_METHODS:
        eng = setup.engine
        for name, layer, upd in zip(eng.names, eng.layers, eng.updaters):
            out[name] = upd.full_precision_weight(layer.base_layer.weight).detach().float().clone()
        return out
    if setup.name in ("lora", "pissa"):
        peft_model = setup.inner
        from peft.tuners.lora import LoraLayer

        for name, mod in peft_model.named_modules():
            if isinstance(mod, LoraLayer):
                w = mod.get_base_layer().weight.detach().float() + mod.get_delta_weight("default").detach().float()
                key = name.split("base_model.model.", 1)[-1]
                out[key] = w.clone()
        return out
    if setup.name == "official":
        for name, layer in zip(setup.engine.names, setup.engine.layers):
            out[name] = layer.weight.detach().float().clone()
        return out
    for name in block_linear_names(setup.inner):
        out[name] = setup.inner.get_submodule(name).weight.detach().float().clone()
    return out


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
