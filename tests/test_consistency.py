"""Cross-device consistency of W (hdpissa_trl/engine/consistency.py): the checksum against a slow reference, its memory
bound, and the mismatch check / re-sync in real 2-process gloo runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _dist import child_env, torchrun

from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
from hdpissa_trl.engine.consistency import CHECKSUM_CHUNK, tensor_checksum, weight_checksums
from hdpissa_trl.testing_utils import build_tiny_model

WORKER = os.path.join(os.path.dirname(__file__), "workers", "engine_worker.py")
INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def slow_checksum(t: torch.Tensor) -> int:
    """The definition, in Python integers: Σ_i bits_i · ((i + 1) mod 65521 + 1), wrapped to a signed 64-bit value."""
    bits = t.contiguous().reshape(-1).view(INT_OF_SIZE[t.element_size()]).tolist()
    total = sum(b * ((i + 1) % 65521 + 1) for i, b in enumerate(bits)) % 2**64
    return total - 2**64 if total >= 2**63 else total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_checksum_matches_definition_and_any_chunking(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(70_001, generator=g) * 1e3).to(dtype)  # beyond 65521 positions: the weights wrap around
    original = t.clone()
    ref = slow_checksum(t)
    assert tensor_checksum(t, chunk=None).item() == ref
    for chunk in (1, 7, 65521, 70_000, 70_001, 10**6, CHECKSUM_CHUNK):  # 65521, CHECKSUM_CHUNK: shared weights
        assert tensor_checksum(t, chunk=chunk).item() == ref, chunk
    assert torch.equal(t.view(INT_OF_SIZE[t.element_size()]), original.view(INT_OF_SIZE[t.element_size()]))


def test_checksum_sees_one_bit_and_a_swap():
    t = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    base = tensor_checksum(t, chunk=100).item()
    flipped = t.clone()
    flipped.view(torch.int32)[3, 5] ^= 1  # the lowest mantissa bit of one entry
    assert tensor_checksum(flipped, chunk=100).item() != base
    swapped = t.clone()
    swapped[0, 0], swapped[0, 1] = t[0, 1], t[0, 0]  # same values, other positions
    assert tensor_checksum(swapped, chunk=100).item() != base


def test_weight_checksums_cover_w_and_precision_state_chunked_or_not():
    model = build_tiny_model("llama", seed=0).to(torch.bfloat16)
    engine = inject_hdpissa(model, HDPiSSAConfig(r=2, precision="bf16_kahan"), 0, 1, show_progress=False)
    for upd in engine.updaters:
        upd.compensation.normal_(generator=torch.Generator().manual_seed(2))
    full = weight_checksums(engine.layers, engine.updaters, chunk=None)
    assert torch.equal(weight_checksums(engine.layers, engine.updaters, chunk=333), full)
    assert torch.equal(engine.checksums(), full)
    for i, (layer, upd) in enumerate(zip(engine.layers, engine.updaters)):
        want = (slow_checksum(layer.base_layer.weight) + slow_checksum(upd.compensation)) % 2**64
        assert full[i].item() % 2**64 == want
    # The compensation is part of the sum: without the precision state the checksums differ.
    assert not torch.equal(weight_checksums(engine.layers, None, chunk=None), full)


PEAK_RSS_PROBE = """
import json, torch
from hdpissa_trl.engine.consistency import tensor_checksum

def growth(fn):
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    status = lambda key: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                              if line.startswith(key))
    before = status("VmRSS:")
    value = fn()
    return value, status("VmHWM:") - before

w = torch.randn(8 * 2**20)  # 8M fp32 entries (32 MiB), already touched
tensor_checksum(torch.ones(10))  # first-call set-up outside the measurement
chunked, chunked_growth = growth(lambda: tensor_checksum(w).item())
whole, whole_growth = growth(lambda: tensor_checksum(w, chunk=None).item())
assert chunked == whole
print(json.dumps({"chunked": chunked_growth, "whole": whole_growth, "numel": w.numel()}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the peak RSS")
def test_checksum_temporaries_are_bounded_by_the_chunk():
    """Peak resident memory while checksumming an 8M-entry weight: the chunked sum adds at most one chunk's
    temporaries (16 bytes an element of the chunk); the unchunked one 16 bytes per element of the whole weight."""
    # A fixed mmap threshold: every large buffer is mapped and unmapped, so the peak shows what is allocated, not
    # what glibc keeps cached after a free (its dynamic threshold would otherwise serve later buffers from its heap).
    env = child_env(MALLOC_MMAP_THRESHOLD_=str(2**20))
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    grew = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\npeak RSS growth: chunked {grew['chunked'] / 2**20:.1f} MiB, whole {grew['whole'] / 2**20:.1f} MiB "
          f"for {grew['numel']} fp32 entries")
    assert grew["chunked"] <= 16 * CHECKSUM_CHUNK + 2**20  # one chunk's int64 bits + position weights
    assert grew["whole"] >= 16 * grew["numel"] * 0.9  # what the bound saves (the check tells the two apart)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (exact allocator peak)")
def test_checksum_gpu_peak_memory_is_one_chunk():
    w = torch.randn(64 * 2**20, device="cuda")  # 64M fp32 entries (256 MiB); unchunked temporaries: >= 1 GiB
    tensor_checksum(torch.ones(10, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    peaks, sums = {}, {}
    for name, kwargs in (("chunked", {"fused": False}), ("whole", {"chunk": None, "fused": False}),
                         ("fused", {"fused": True})):  # fused: one compiled reduction (the default on CUDA)
        torch.cuda.reset_peak_memory_stats()
        sums[name] = tensor_checksum(w, **kwargs)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    print(f"\nGPU peak temporaries (MiB): { {k: round(v / 2**20, 1) for k, v in peaks.items()} }")
    assert sums["chunked"].item() == sums["whole"].item() == sums["fused"].item() == tensor_checksum(w.cpu()).item()
    assert peaks["chunked"] <= 16 * CHECKSUM_CHUNK + 2**20 and peaks["fused"] <= 2**20
    assert peaks["whole"] >= 16 * w.numel()


def run_workers(tmp_path, K: int, *args: str) -> list[dict]:
    torchrun(WORKER, K, ["--out", str(tmp_path), *args])
    return [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(K)]


@pytest.mark.slow
def test_mismatch_is_caught_and_names_layer(tmp_path):
    recs = run_workers(tmp_path, 2, "--steps", "2", "--perturb_rank", "1")
    for rec in recs:
        assert rec["error"] is not None and "WeightMismatchError" in rec["error"]
        assert "model.layers.0.self_attn.k_proj" in rec["error"] and "step 2" in rec["error"]


@pytest.mark.slow
def test_mismatch_resync_from_rank0(tmp_path):
    recs = run_workers(tmp_path, 2, "--steps", "2", "--perturb_rank", "1", "--on_sync_mismatch", "resync")
    assert recs[0]["error"] is None and recs[1]["error"] is None
    assert recs[1]["last_check"]["resynced"] == ["model.layers.0.self_attn.k_proj"]
    for n in recs[0]["W"]:
        assert torch.equal(recs[0]["W"][n], recs[1]["W"][n])
