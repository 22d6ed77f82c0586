"""One command that checks a GPU: what only a GPU exercises, and what the fold costs there. One table, one JSON.

    make gpu-wheels                                  # here, with a package registry: what the GPU image lacks
    python -m bench.gpu_check                        # on the GPU machine (make gpu-check), one GPU, <= 8 minutes
    python -m bench.gpu_check --device cpu --quick   # the same script on a CPU in a few minutes (CI runs it)

Sections (``--only`` / ``--skip`` pick some):

* ``packages``: the GPU image has torch, transformers, accelerate, peft, huggingface_hub, safetensors and pyarrow but
  no registry; what else the checks import (trl, datasets, evaluate, pytest, ...) is installed from the wheels that
  ``make gpu-wheels`` downloaded into ``.gpu_wheels/`` (into ``.gpu_site/``, on this process's path and its
  children's: the image's own packages are never touched), using the torch that is there.
* ``gpu_tests``: the ``gpu``-marked tests (on a CPU they skip; the count says so).
* ``fold``: a Llama-3.1-8B-shaped model (all 224 adapted layers; ``--quick``: a small one) with K = 8 devices
  simulated (rank 0's adapters, the 7 others' deltas drawn at random, as the all-gather would deliver them), r = 16,
  in each precision mode: one training step of the paper's per-device batch (16 × 512 tokens, bf16 autocast) and
  the fold alone: device ms (CUDA events), host ms (until the call returns), kernels, peak memory, the fold's share of
  the measured step, and whether two folds from the same state give identical checksums.
* ``svd``: exact vs randomized SVD init of 8B-shaped bf16 weights (time, agreement with the exact subspace).
* ``collectives``: every collective the code uses, on the buffers it uses them on, in a one-rank NCCL group (gloo on a
  CPU). Several NCCL ranks cannot share one GPU: multi-rank behaviour is what the CPU tests check.
* ``recipe_resume``: the SFT recipe end to end in bf16 for 60 steps, then again resumed from step 30: same W.
* ``fsdp2``: the recipe with W sharded by rows (FSDP2 launch config), one process.
* ``step_speed``: ``bench.step_speed`` HD-PiSSA against PEFT LoRA, one process.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

import torch

from bench import _common as common
from hdpissa_trl.launch import REPO_ROOT, child_env, free_port

SECTIONS = ("packages", "gpu_tests", "fold", "svd", "collectives", "recipe_resume", "fsdp2", "step_speed")
WHEEL_DIR = os.path.join(REPO_ROOT, ".gpu_wheels")
SITE_DIR = os.path.join(REPO_ROOT, ".gpu_site")
# What the checks import beyond the GPU image (module -> distribution). Downloaded by `make gpu-wheels` at the
# versions of this checkout's environment, installed on the GPU machine only where the module is missing there.
EXTRA_PACKAGES = {
    "trl": "trl", "datasets": "datasets", "evaluate": "evaluate", "dill": "dill", "multiprocess": "multiprocess",
    "xxhash": "xxhash", "pandas": "pandas", "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig",
    "pygments": "pygments", "yaml": "pyyaml", "jinja2": "jinja2", "markupsafe": "markupsafe", "psutil": "psutil",
    "fsspec": "fsspec", "tqdm": "tqdm", "filelock": "filelock", "requests": "requests", "dateutil": "python-dateutil",
    "tzdata": "tzdata",
}
# The adapted layers' model: Llama-3.1-8B (the paper's), or a small one with the same proportions.
MODEL_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                num_kv_heads=8)
MODEL_QUICK = dict(vocab_size=512, hidden_size=256, intermediate_size=896, num_layers=2, num_heads=4, num_kv_heads=1)
# label -> (weight dtype, HDPiSSAConfig.precision)
FOLD_MODES = {"fp32 W": (torch.float32, "fp32"), "bf16 W + fp32 master": (torch.bfloat16, "fp32"),
              "bf16 W + Kahan": (torch.bfloat16, "bf16_kahan"), "bf16 W + SR": (torch.bfloat16, "bf16_sr")}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small shapes and few steps (the CPU mode CI runs)")
    ap.add_argument("--only", default="", help=f"comma-separated sections to run, of {','.join(SECTIONS)}")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out")
    ap.add_argument("--json", default=None, help="where to write the JSON (default bench/results/gpu_check_<mode>.json)")
    ap.add_argument("--work_dir", default=None, help="scratch directory for the recipe runs (default: a temporary one)")
    ap.add_argument("--download-wheels", dest="download", action="store_true",
                    help="only download the wheels of EXTRA_PACKAGES into --wheel_dir (what `make gpu-wheels` runs)")
    ap.add_argument("--wheel_dir", default=WHEEL_DIR)
    ap.add_argument("--python-version", dest="python_version", default="3.12",
                    help="--download-wheels: the GPU machine's Python (binary wheels are per version)")
    ap.add_argument("--platform", default="x86_64", help="--download-wheels: the GPU machine's architecture")
    return ap


def plan(device: str, quick: bool) -> dict:
    """Sizes of every section: the real thing on a GPU, small and quick for ``--quick``."""
    if quick:
        return dict(model=MODEL_QUICK, K=8, r=4, micro=(2, 32), accum=2, repeats=1, svd_shapes=[(256, 256), (256, 896)],
                    recipe_steps=6, fsdp_steps=2, step_speed=["--preset", "tiny", "--batch", "2", "--seq", "32",
                                                              "--rounds", "1", "--steps", "1"])
    return dict(model=MODEL_8B, K=8, r=16, micro=(4, 512), accum=4, repeats=3, svd_shapes=[(4096, 4096), (4096, 14336)],
                recipe_steps=60, fsdp_steps=20, step_speed=["--preset", "1b", "--batch", "4", "--seq", "1024",
                                                            "--rounds", "2", "--steps", "2"])


# ---------------------------------------------------------------------------------------------------- packages
def download_wheels(wheel_dir: str, python_version: str, platform: str) -> list[str]:
    """``pip download --no-deps`` of every EXTRA_PACKAGES distribution at this environment's version (binary wheels
    for ``python_version`` on manylinux ``platform``): what the GPU machine, which reaches no registry, installs."""
    pins = []
    for dist in sorted(set(EXTRA_PACKAGES.values())):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"[gpu_check] {dist} is not installed here; not downloaded", flush=True)
    os.makedirs(wheel_dir, exist_ok=True)
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", wheel_dir,
           "--python-version", python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
           *[a for tag in ("manylinux_2_28", "manylinux_2_17", "manylinux2014") for a in ("--platform", f"{tag}_{platform}")],
           *pins]
    subprocess.run(cmd, check=True)
    return pins


def missing_modules() -> list[str]:
    return [mod for mod in EXTRA_PACKAGES if importlib.util.find_spec(mod) is None]


def install_missing(wheel_dir: str, site_dir: str) -> dict:
    """Install the wheels of the missing modules into ``site_dir`` (no registry, no dependencies resolved) and put it
    on this process's path; returns what was missing, installed and is still missing."""
    if os.path.isdir(site_dir) and site_dir not in sys.path:
        sys.path.insert(0, site_dir)
        importlib.invalidate_caches()
    missing = missing_modules()
    out = {"missing": list(missing), "installed": [], "still_missing": []}
    if missing:
        wheels = {os.path.basename(p).split("-")[0].lower().replace("_", "-"): p
                  for p in glob.glob(os.path.join(wheel_dir, "*.whl"))}
        chosen = [wheels[d] for d in {EXTRA_PACKAGES[m] for m in missing} if d in wheels]
        if chosen:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site_dir,
                            *chosen], check=True, capture_output=True, text=True)
            out["installed"] = sorted(os.path.basename(p) for p in chosen)
        if site_dir not in sys.path:
            sys.path.insert(0, site_dir)
        importlib.invalidate_caches()
        out["still_missing"] = missing_modules()
    return out


def section_packages(ctx: dict) -> dict:
    res = install_missing(ctx["wheel_dir"], SITE_DIR)
    versions = {}
    for dist in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "huggingface_hub"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    res["versions"] = versions
    res["status"] = "ok" if not res["still_missing"] else "fail"
    res["summary"] = (f"missing {len(res['missing'])}, installed {len(res['installed'])} wheels"
                      + (f"; STILL MISSING {','.join(res['still_missing'])} (run make gpu-wheels)"
                         if res["still_missing"] else "") + f"; torch {versions['torch']}")
    return res


def child_environment() -> dict:
    """A child's environment: this checkout and ``.gpu_site`` on its path, offline; cuBLAS set up for deterministic
    algorithms (``full_determinism`` in the recipe runs needs it before the first cuBLAS call)."""
    return child_env(*([SITE_DIR] if os.path.isdir(SITE_DIR) else []), threads=max(1, (os.cpu_count() or 2) // 2),
                     CUBLAS_WORKSPACE_CONFIG=":4096:8")


def run_child(cmd: list[str], timeout: float, cwd: str = REPO_ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=child_environment(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-5000:]}")
    return proc


# --------------------------------------------------------------------------------------------------- gpu tests
def section_gpu_tests(ctx: dict) -> dict:
    xml_path = os.path.join(ctx["work"], "gpu_tests.xml")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                           f"--junitxml={xml_path}", "tests"], cwd=REPO_ROOT, env=child_environment(),
                          capture_output=True, text=True, timeout=ctx["timeout"])
    if not os.path.exists(xml_path):
        raise RuntimeError(f"pytest wrote no report ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    suite = ET.parse(xml_path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    ok = proc.returncode in (0, 5) and not failed  # 5: nothing collected
    return {"status": "ok" if ok else "fail", **counts, "failed": failed, "output_tail": proc.stdout[-2000:],
            "summary": f"{counts['passed']} passed, {counts['skipped']} skipped, "
                       f"{counts['failures'] + counts['errors']} failed" + (f" ({', '.join(failed)})" if failed else "")}


# -------------------------------------------------------------------------------------------------------- fold
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_model(cfg: dict, dtype: torch.dtype, device: str):
    """A Llama-style model of ``cfg``'s shapes, built on ``device`` (random weights)."""
    from transformers import AutoModelForCausalLM

    from hdpissa_trl.testing_utils import tiny_config

    config = tiny_config("llama", **cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def train_step(model, params, opt, batches, device: str) -> None:
    """Forward + backward of every micro-batch under bf16 autocast, then the optimizer step."""
    for ids in batches:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _mode_record(model, engine, label: str, p: dict, device: str, others: torch.Tensor) -> dict:
    """One precision mode: a measured training step (fold included) and the fold alone."""
    from bench.fold_speed import op_profile, restore, snapshot, timed
    from hdpissa_trl.engine.consistency import weight_checksums
    from hdpissa_trl.engine.fold import fold_gathered, local_delta_buffer

    layers, updaters = engine.layers, engine.updaters
    params = engine.adapter_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    batch, seq = p["micro"]
    batches = [torch.randint(0, p["model"]["vocab_size"], (batch, seq), generator=gen).to(device)
               for _ in range(p["accum"])]
    step = iter(range(1, 10**6))

    def full_step():
        train_step(model, params, opt, batches, device)
        gathered = torch.cat([local_delta_buffer(layers)[None], others])  # rank 0 + the 7 simulated ranks
        fold_gathered(layers, updaters, gathered, next(step))

    full_step()  # warm-up: allocator, cuBLAS, compiled kernels
    _sync(device)
    step_t = timed(full_step, device, p["repeats"])
    gathered = torch.cat([local_delta_buffer(layers)[None], others])
    fold_t = timed(lambda: fold_gathered(layers, updaters, gathered, next(step)), device, p["repeats"])
    prof = op_profile(lambda: fold_gathered(layers, updaters, gathered, next(step)), device)
    weight_checksums(layers, updaters)  # warm-up (the compiled reduction on a GPU)
    check_t = timed(lambda: weight_checksums(layers, updaters), device, p["repeats"])
    # Two folds of the first block from the same state (what two devices compute): identical checksums.
    first = slice(0, 7)
    saved = snapshot(layers[first], updaters[first])
    sums = []
    for _ in range(2):
        restore(layers[first], updaters[first], saved)
        fold_gathered(layers[first], updaters[first], gathered, 10**6)
        sums.append(weight_checksums(layers[first], updaters[first]))
    del saved
    weight_bytes = sum(lyr.base_layer.weight.numel() * lyr.base_layer.weight.element_size() for lyr in layers)
    return {"label": label, "precision": updaters[0].mode, "fold_matmul": updaters[0].matmul, "layers": len(layers),
            "step_ms": step_t["ms"], "fold_ms": fold_t["ms"], "fold_host_ms": fold_t["host_ms"],
            "fold_percent_of_step": 100 * fold_t["ms"] / step_t["ms"], "fold_ops": prof["ops"],
            "fold_kernels": prof["kernels"], "fold_peak_temp_bytes": prof["peak_temp_bytes"],
            "checksum_ms": check_t["ms"], "checksum_host_ms": check_t["host_ms"],
            "same_checksums_twice": bool(torch.equal(sums[0], sums[1])), "adapted_weight_bytes": weight_bytes,
            "tokens_per_step": batch * seq * p["accum"]}


def section_fold(ctx: dict) -> dict:
    from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
    from hdpissa_trl.engine.precision import WeightUpdater

    p, device = ctx["plan"], ctx["device"]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        labels = [lab for lab, (dt, _) in FOLD_MODES.items() if dt == dtype]
        model = build_model(p["model"], dtype, device)
        config = HDPiSSAConfig(r=p["r"], lora_alpha=p["r"], init_method="randomized", n_iter=0,
                               precision=FOLD_MODES[labels[0]][1], sync_check_steps=0)
        engine = inject_hdpissa(model, config, rank=0, world_size=p["K"], show_progress=False)
        numel = sum(lyr.r * (lyr.in_features + lyr.out_features) for lyr in engine.layers)
        gen = torch.Generator(device=device).manual_seed(1)
        others = torch.randn(p["K"] - 1, numel, generator=gen, device=device).mul_(1e-5)
        for label in labels:
            _, precision = FOLD_MODES[label]
            if engine.updaters[0].mode != precision:
                engine.updaters = [WeightUpdater(lyr.base_layer.weight, precision, 0, i)
                                   for i, lyr in enumerate(engine.layers)]
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(_mode_record(model, engine, label, p, device, others))
            print(f"[gpu_check] fold {label}: {rows[-1]['fold_ms']:.1f} ms, "
                  f"{rows[-1]['fold_percent_of_step']:.2f} % of the step", flush=True)
        del model, engine, others
        if device == "cuda":
            torch.cuda.empty_cache()
    ok = all(r["same_checksums_twice"] for r in rows)
    default = rows[0]
    return {"status": "ok" if ok else "fail", "rows": rows, "K": p["K"], "r": p["r"],
            "summary": "; ".join(f"{r['label']}: {r['fold_ms']:.1f} ms ({r['fold_percent_of_step']:.2f} % of step)"
                                 for r in rows)
                       + ("" if ok else "; CHECKSUMS DIFFER between two identical folds"),
            "default_mode_percent": default["fold_percent_of_step"]}


# --------------------------------------------------------------------------------------------------------- svd
def section_svd(ctx: dict) -> dict:
    """Exact vs randomized factors of bf16 weights with a power-law spectrum (trained weights decay slowly)."""
    from bench.init_svd import factors_to_subspaces
    from hdpissa_trl.engine.init import top_singular_factors

    p, device = ctx["plan"], ctx["device"]
    k = p["K"] * p["r"]
    rows = []
    for m, n in p["svd_shapes"]:
        gen = torch.Generator(device=device).manual_seed(m + n)
        q = min(m, n)
        U, _ = torch.linalg.qr(torch.randn(m, q, generator=gen, device=device))
        V, _ = torch.linalg.qr(torch.randn(n, q, generator=gen, device=device))
        s = torch.arange(1, q + 1, device=device, dtype=torch.float32).pow(-0.5)
        W = ((U * s) @ V.t()).to(torch.bfloat16)
        del U, V
        times, facs = {}, {}
        for method in ("svd", "randomized"):
            top_singular_factors(W[:2 * k, :2 * k], k // 2, method, n_iter=4, seed=0)  # warm-up (solver handles)
            _sync(device)
            t0 = time.perf_counter()
            facs[method] = top_singular_factors(W, k, method, n_iter=4, seed=0)
            _sync(device)
            times[method] = (time.perf_counter() - t0) * 1e3
        _, _, V_exact = factors_to_subspaces(*facs["svd"])
        _, _, V_rand = factors_to_subspaces(*facs["randomized"])
        cos2 = torch.linalg.svdvals(V_exact.t() @ V_rand).clamp(max=1.0).pow(2).mean().item()
        rows.append({"shape": [m, n], "k": k, "exact_ms": times["svd"], "randomized_ms": times["randomized"],
                     "mean_cos2_right": cos2})
    summary = "; ".join(f"{r['shape'][0]}x{r['shape'][1]} exact {r['exact_ms']:.0f} ms, randomized "
                        f"{r['randomized_ms']:.0f} ms (cos² {r['mean_cos2_right']:.3f})" for r in rows)
    out = {"status": "ok", "rows": rows, "summary": summary}
    if not ctx["quick"]:  # 32 blocks of q, k, v, o (k, v counted as 4096², an upper bound) and gate, up, down
        t = {tuple(r["shape"]): r for r in rows}
        out["projected_8b_init_s_upper_bound"] = {
            meth: 32 * (4 * t[(4096, 4096)][f"{meth}_ms"] + 3 * t[(4096, 14336)][f"{meth}_ms"]) / 1e3
            for meth in ("exact", "randomized")}
    return out


# ------------------------------------------------------------------------------------------------- collectives
def section_collectives(ctx: dict) -> dict:
    """Every collective of the code, on the buffers it uses, in a one-rank group (NCCL on a GPU)."""
    import torch.distributed as dist

    from hdpissa_trl.engine.consistency import weight_checksums
    from hdpissa_trl.engine.distributed import all_gather_flat
    from hdpissa_trl.engine.fold import local_delta_buffer
    from hdpissa_trl.engine.init import top_singular_factors
    from hdpissa_trl.engine.layer import HDPiSSALinear
    from hdpissa_trl.engine.precision import WeightUpdater
    from hdpissa_trl.engine.sharded import gather_rows

    device = ctx["device"]
    backend = "nccl" if device == "cuda" else "gloo"
    kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} if device == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0, **kwargs)
    results = {}
    try:
        layers, updaters = [], []
        for i, (m, n) in enumerate([(48, 32), (32, 48)]):
            base = torch.nn.Linear(n, m, bias=False, device=device, dtype=torch.bfloat16)
            A0, B0 = top_singular_factors(base.weight, 8, "svd")
            layer = HDPiSSALinear(base, 4, 0, 2, 1.0, name=f"l{i}")
            layer.set_initial_factors(A0, B0)
            layers.append(layer)
            updaters.append(WeightUpdater(base.weight, "fp32", layer_index=i))
        with torch.no_grad():
            layers[0].lora_A.add_(0.01)

        def check(name, fn):
            t0 = time.perf_counter()
            try:
                ok = fn()
                _sync(device)
                results[name] = {"ok": bool(ok), "ms": (time.perf_counter() - t0) * 1e3}
            except Exception as exc:  # one broken collective must not hide the others
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}

        def fold_gather():
            local = local_delta_buffer(layers)
            out = torch.empty_like(local)
            all_gather_flat(out, local)
            return torch.equal(out, local) and out.abs().sum() > 0

        def checksum_gather():
            local = weight_checksums(layers, updaters).to(device)
            out = torch.empty_like(local)
            all_gather_flat(out, local)
            return torch.equal(out, local)

        def init_broadcast():
            A0, B0 = top_singular_factors(layers[0].base_layer.weight, 8, "svd")
            a, b = A0.clone(), B0.clone()
            dist.broadcast(a, src=0)
            dist.broadcast(b, src=0)
            return torch.equal(a, A0) and torch.equal(b, B0)

        def resync_broadcast():
            w = layers[0].base_layer.weight.data.clone()
            dist.broadcast(layers[0].base_layer.weight.data, src=0)
            dist.broadcast(updaters[0].master, src=0)
            return torch.equal(w, layers[0].base_layer.weight.data)

        def amp_all_reduce():
            flag = torch.ones((), dtype=torch.float32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return flag.item() == 1.0

        def gradient_all_reduce():
            g = torch.randn(48, 32, device=device)
            ref = g.clone()
            dist.all_reduce(g)
            return torch.equal(g, ref)

        def sharded_all_to_all():
            d_b = torch.randn(12, device=device)
            recv = torch.empty(12, device=device)
            dist.all_to_all_single(recv, d_b, output_split_sizes=[12], input_split_sizes=[12])
            return torch.equal(recv, d_b)

        def sharded_gather_scatter():
            local = torch.randn(5, 8, device=device)
            full = gather_rows(local, 5, dst=0)
            recv = torch.empty(8, 4, device=device)
            piece = torch.randn(8, 4, device=device)
            dist.scatter(recv, [piece], group_src=0)
            return torch.equal(full, local) and torch.equal(recv, piece)

        def object_collectives():
            got = [None]
            dist.all_gather_object(got, {"rank": 0, "readable": True})
            gathered = [None]
            dist.gather_object("part", gathered, dst=0)
            return got[0]["readable"] and gathered == ["part"]

        def flags_gather_and_barrier():
            flags = torch.ones(3, dtype=torch.int32, device=device)
            table = torch.empty(3, dtype=torch.int32, device=device)
            dist.all_gather_into_tensor(table, flags)
            dist.barrier()
            return torch.equal(table, flags)

        for name, fn in [("fold all-gather (fp32 deltas)", fold_gather),
                         ("checksum all-gather (int64)", checksum_gather),
                         ("init broadcast (fp32 factors)", init_broadcast),
                         ("re-sync broadcast (bf16 W, fp32 master)", resync_broadcast),
                         ("fp16 skip all-reduce MAX", amp_all_reduce),
                         ("gradient subspace all-reduce", gradient_all_reduce),
                         ("sharded fold all-to-all", sharded_all_to_all),
                         ("sharded gather rows / scatter", sharded_gather_scatter),
                         ("object all-gather / gather (recipe, export)", object_collectives),
                         ("checkpoint flags all-gather (int32) + barrier", flags_gather_and_barrier)]:
            check(name, fn)
    finally:
        dist.destroy_process_group()
    bad = [name for name, r in results.items() if not r["ok"]]
    return {"status": "ok" if not bad else "fail", "backend": backend, "results": results,
            "summary": f"{backend}: {len(results) - len(bad)}/{len(results)} ok" + (f"; FAILED {bad}" if bad else "")}


# ------------------------------------------------------------------------------------------------ recipe runs
def _recipe_cmd(ctx: dict, config_file: str, out: str, *extra: str) -> list[str]:
    cuda = ctx["device"] == "cuda"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "--num_processes", "1",
            "--main_process_port", str(free_port()), os.path.join("recipes", "sft_multitask.py"),
            "--config", "recipes/demo/config.yaml", "--output_dir", out, "--eval_tasks", "",
            "--use_cpu", "false" if cuda else "true", "--logging_steps", "2", "--report_to", "none", *extra]


def _final_losses(out: str) -> dict:
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    losses = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    return {"global_step": state["global_step"], "losses": losses}


def _weights_equal(a: str, b: str) -> tuple[bool, int]:
    from safetensors.torch import load_file

    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    differ = [k for k in wa if k not in wb or not torch.equal(wa[k], wb[k])]
    return wa.keys() == wb.keys() and not differ, len(differ)


def section_recipe_resume(ctx: dict) -> dict:
    """The recipe in bf16 for N steps, then again resumed from step N/2: bit-identical W."""
    cuda = ctx["device"] == "cuda"
    steps = ctx["plan"]["recipe_steps"]
    config = "recipes/accelerate_configs/single_gpu.yaml" if cuda else "recipes/accelerate_configs/cpu.yaml"
    full, resumed = os.path.join(ctx["work"], "recipe_full"), os.path.join(ctx["work"], "recipe_resumed")
    common_args = ["--bf16", "true", "--max_steps", str(steps), "--save_steps", str(steps // 2),
                   "--save_total_limit", "3", "--full_determinism", "true", "--attn_implementation", "eager"]
    t0 = time.perf_counter()
    run_child(_recipe_cmd(ctx, config, full, *common_args), ctx["timeout"])
    run_child(_recipe_cmd(ctx, config, resumed, *common_args, "--resume_from_checkpoint",
                          os.path.join(full, f"checkpoint-{steps // 2}")), ctx["timeout"])
    same, differ = _weights_equal(full, resumed)
    a, b = _final_losses(full), _final_losses(resumed)
    last = max(a["losses"])
    ok = same and a["global_step"] == b["global_step"] == steps and a["losses"][last] == b["losses"].get(last)
    return {"status": "ok" if ok else "fail", "steps": steps, "resumed_from": steps // 2, "same_W": same,
            "tensors_differing": differ, "loss_full": a["losses"][last], "loss_resumed": b["losses"].get(last),
            "seconds_both_runs": time.perf_counter() - t0,
            "summary": f"{steps} steps bf16; resumed from {steps // 2}: "
                       + ("same W bit for bit" if same else f"W DIFFERS ({differ} tensors)")
                       + f", final loss {a['losses'][last]:.4f} / {b['losses'].get(last, float('nan')):.4f}"}


def section_fsdp2(ctx: dict) -> dict:
    cuda = ctx["device"] == "cuda"
    steps = ctx["plan"]["fsdp_steps"]
    config = "recipes/accelerate_configs/fsdp2.yaml" if cuda else "recipes/accelerate_configs/cpu_fsdp2.yaml"
    out = os.path.join(ctx["work"], "fsdp2")
    proc = run_child(_recipe_cmd(ctx, config, out, "--max_steps", str(steps), "--save_strategy", "no",
                                 *(["--bf16", "true"] if cuda else ["--bf16", "false"])), ctx["timeout"])
    res = _final_losses(out)
    losses = list(res["losses"].values())
    said = re.search(r"HD-PiSSA: K=(\d+) devices .*backend (\w+)\), (W sharded by rows with FSDP2)?", proc.stdout)
    sharded = bool(said and said.group(3))  # the trainer's own line: which engine the run got
    ok = res["global_step"] == steps and all(math.isfinite(x) for x in losses) and sharded
    return {"status": "ok" if ok else "fail", "steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
            "W_sharded": sharded, "backend": said.group(2) if said else None,
            "summary": f"1 process, {steps} steps, "
                       + ("W sharded (FSDP2)" if sharded else "W NOT SHARDED: the run did not take the FSDP2 path")
                       + f", backend {said.group(2) if said else '?'}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"}


def section_step_speed(ctx: dict) -> dict:
    cuda = ctx["device"] == "cuda"
    out_dir = os.path.join(ctx["work"], "step_speed")
    cmd = [sys.executable, "-m", "bench.step_speed", "--nproc", "1", "--methods", "hdpissa,lora", "--no-memory",
           "--no-figure", "--results_dir", out_dir, "--tag", "_gpu_check", *ctx["plan"]["step_speed"]]
    if cuda:
        cmd += ["--device", "cuda", "--backend", "nccl", "--dtype", "bf16"]
    run_child(cmd, ctx["timeout"])
    with open(os.path.join(out_dir, "step_speed_gpu_check.json"), encoding="utf-8") as f:
        res = json.load(f)
    run = res["runs"]["1"]
    ratio = run["summary"]["ratios"]["hdpissa_over_lora_step"]
    per = run["summary"]["per_method"]
    return {"status": "ok", "hdpissa_over_lora_step": ratio, "hdpissa_step_ms": per["hdpissa"]["step"] * 1e3,
            "lora_step_ms": per["lora"]["step"] * 1e3, "hdpissa_fold_ms": per["hdpissa"]["fold"] * 1e3,
            "summary": f"HD-PiSSA {per['hdpissa']['step'] * 1e3:.1f} ms vs LoRA {per['lora']['step'] * 1e3:.1f} ms "
                       f"per step ({ratio:.3f}x)"}


SECTION_FUNCS = {"packages": section_packages, "gpu_tests": section_gpu_tests, "fold": section_fold,
                 "svd": section_svd, "collectives": section_collectives, "recipe_resume": section_recipe_resume,
                 "fsdp2": section_fsdp2, "step_speed": section_step_speed}


# -------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.download:
        pins = download_wheels(args.wheel_dir, args.python_version, args.platform)
        print(f"[gpu_check] {len(pins)} wheels in {args.wheel_dir}: carry this folder to the GPU machine")
        return {"downloaded": pins}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check: no CUDA device is visible here. On a CPU run `python -m bench.gpu_check "
                         "--device cpu --quick` (the same checks, small sizes).")
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = [s for s in [*chosen, *skipped] if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"bench.gpu_check: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}.")
    common.quiet_hf()
    info = common.env_info(device=args.device)
    if args.device == "cuda":
        info["cuda"] = torch.version.cuda
    work = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    ctx = {"device": args.device, "quick": args.quick, "plan": plan(args.device, args.quick), "work": work,
           "wheel_dir": args.wheel_dir, "timeout": 600}
    results, started = {}, time.perf_counter()
    for name in SECTIONS:
        if name not in chosen or name in skipped:
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = SECTION_FUNCS[name](ctx)
        except Exception as exc:  # a failed section is reported, and the others still run
            res = {"status": "fail", "summary": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                   "error": traceback.format_exc()[-6000:]}
        res["seconds"] = time.perf_counter() - t0
        results[name] = res
        print(f"[gpu_check] {name}: {res['status']} ({res['seconds']:.0f} s) {res['summary']}", flush=True)
    common.finish_env(info)
    total = time.perf_counter() - started
    mode = f"{args.device}{'_quick' if args.quick else ''}"
    common.print_table(["check", "status", "result", "s"],
                       [[name, res["status"], res["summary"], f"{res['seconds']:.0f}"] for name, res in results.items()],
                       title=f"bench.gpu_check ({mode}) — {common.env_line(info)}; {total:.0f} s in all")
    if "fold" in results and results["fold"].get("rows"):
        common.print_table(
            ["precision mode", "GEMM", "step ms", "fold ms", "fold host ms", "% of step", "kernels" if
             args.device == "cuda" else "ops", "fold peak temp", "checksum ms", "same bits twice"],
            [[r["label"], r["fold_matmul"], f"{r['step_ms']:.1f}", f"{r['fold_ms']:.2f}", f"{r['fold_host_ms']:.2f}",
              f"{r['fold_percent_of_step']:.2f}", r["fold_kernels"] if args.device == "cuda" else r["fold_ops"],
              common.fmt_bytes(r["fold_peak_temp_bytes"]), f"{r['checksum_ms']:.1f}",
              "yes" if r["same_checksums_twice"] else "NO"] for r in results["fold"]["rows"]],
            title=f"The fold, {results['fold']['rows'][0]['layers']} layers, K = {results['fold']['K']} simulated, "
                  f"r = {results['fold']['r']} (gather not included: one device)")
    out = {"env": info, "mode": mode, "seconds": total, "sections": results}
    path = args.json or os.path.join(common.RESULTS_DIR, f"gpu_check_{mode}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, default=str)  # sections in the order they ran
    print(f"wrote {path}")
    if any(res["status"] == "fail" for res in results.values()):
        sys.exit(1)
    return out


if __name__ == "__main__":
    main()
