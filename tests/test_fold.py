"""The fold (hdpissa_trl/engine/fold.py): real multi-process runs (torchrun, gloo, 1/2/4 CPU processes) against a slow
reference written here, and its timing on CPU and GPU."""

from __future__ import annotations

import os

import pytest
import torch
from _dist import torchrun
from torch import nn
from workers.engine_worker import batch, make_model, make_optimizer

WORKER = os.path.join(os.path.dirname(__file__), "workers", "engine_worker.py")


def reference_run(K: int, r: int, alpha: float, steps: int, optim: str, lr: float) -> dict[str, torch.Tensor]:
    """HD-PiSSA by the book, one process simulating K devices.

    Per-device gradients from the plain model's dL/dW (grad_A = s·B^T G, grad_B = s·G A^T), a separate optimizer per
    device, then W += s·Σ_k (B_k A_k − B0_k A0_k) in the naive (non-delta) form, and reset.
    """
    s = alpha / r
    model = make_model()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    W = {n: model.get_submodule(n).weight for n in names}
    A0, B0, A, B, opts = {}, {}, {}, {}, []
    for n in names:
        U, S, Vh = torch.linalg.svd(W[n].detach(), full_matrices=False)
        for k in range(K):
            idx = slice(k * r, (k + 1) * r)
            A0[n, k] = (S[idx] / s).sqrt()[:, None] * Vh[idx]  # PEFT's PiSSA: s·B0A0 = the slice of W
            B0[n, k] = U[:, idx] * (S[idx] / s).sqrt()[None, :]
    for k in range(K):
        params = []
        for n in names:
            A[n, k] = nn.Parameter(A0[n, k].clone())
            B[n, k] = nn.Parameter(B0[n, k].clone())
            params += [A[n, k], B[n, k]]
        opts.append(make_optimizer(params, optim, lr))
    for p in model.parameters():
        p.requires_grad_(False)
    for step in range(steps):
        for k in range(K):
            for n in names:
                W[n].requires_grad_(True)
                W[n].grad = None
            ids = batch(step, k)
            model(input_ids=ids, labels=ids).loss.backward()
            for n in names:
                G = W[n].grad
                A[n, k].grad = s * B[n, k].detach().t() @ G
                B[n, k].grad = s * G @ A[n, k].detach().t()
                W[n].requires_grad_(False)
            opts[k].step()
        with torch.no_grad():
            for n in names:
                W[n] += s * sum(B[n, k] @ A[n, k] - B0[n, k] @ A0[n, k] for k in range(K))
                for k in range(K):
                    A[n, k].copy_(A0[n, k])
                    B[n, k].copy_(B0[n, k])
    return {n: W[n].detach().clone() for n in names}


def run_workers(tmp_path, K: int, *args: str) -> list[dict]:
    torchrun(WORKER, K, ["--out", str(tmp_path), *args])
    return [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(K)]


@pytest.mark.slow
@pytest.mark.parametrize("K,optim,lr", [(1, "adamw", 1e-2), (2, "adamw", 1e-2), (4, "sgd", 3.0), (4, "adamw", 1e-2)])
def test_multiprocess_fold_matches_reference(tmp_path, K, optim, lr):
    steps, r, alpha = 3, 2, 4.0
    recs = run_workers(tmp_path, K, "--steps", str(steps), "--lora_r", str(r), "--alpha", str(alpha), "--optim", optim,
                       "--lr", str(lr))
    assert all(rec["world"] == K and rec["error"] is None for rec in recs)
    ref = reference_run(K, r, alpha, steps, optim, lr)
    W0 = {n: w for n, w in ((n, make_model().get_submodule(n).weight.detach()) for n in ref)}
    for n, w_ref in ref.items():
        moved = (w_ref - W0[n]).abs().max()
        assert moved > 1e-4, "the run must actually move W"
        for rec in recs:
            # Same bits on every device.
            assert torch.equal(rec["W"][n], recs[0]["W"][n]), f"{n} differs across devices"
        torch.testing.assert_close(recs[0]["W"][n], w_ref, rtol=0, atol=2e-6 + 1e-4 * moved.item())
    # Per-device slices really are different (DDP's broadcast trap would make them equal).
    if K > 1:
        n = next(iter(ref))
        assert not torch.equal(recs[0]["A_init"][n], recs[1]["A_init"][n])
        assert not torch.allclose(recs[0]["grads"][n][0], recs[1]["grads"][n][0])


@pytest.mark.slow
def test_one_collective_per_step_and_bytes(tmp_path):
    K, r = 2, 2
    recs = run_workers(tmp_path, K, "--steps", "2", "--lora_r", str(r))
    model = make_model()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    numel = sum(r * (model.get_submodule(n).in_features + model.get_submodule(n).out_features) for n in names)
    for rec in recs:
        for c in rec["fold_collectives"]:
            # Exactly one flat all-gather, nothing else.
            assert c["all_gather_single"] + c["all_gather_into_tensor"] == 1
            assert c["all_gather"] == c["all_reduce"] == c["broadcast"] == 0
        for st in rec["stats"]:
            assert st["num_collectives"] == 1
            assert st["bytes_sent"] == numel * 4
            assert st["bytes_received"] == (K - 1) * numel * 4
            assert st["update_rank_bound"] == 2 * K * r


@pytest.mark.slow
def test_bucketed_gather_same_result(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = run_workers(tmp_path / "a", 2, "--steps", "2")
    b = run_workers(tmp_path / "b", 2, "--steps", "2", "--bucket_size_mb", "0.001")
    assert b[0]["stats"][0]["num_collectives"] > 1
    for n in a[0]["W"]:
        assert torch.equal(a[0]["W"][n], b[0]["W"][n])


@pytest.mark.parametrize("sizes,cap", [([3, 3, 3, 3], 6), ([5, 1, 1, 9, 2, 2, 2], 4), ([1] * 7, 100), ([7], 1), ([], 5)])
def test_buckets_by_size_against_a_greedy_reference(sizes, cap):
    """Buckets are the greedy left-to-right split: start a new bucket exactly when the next item would push a
    non-empty one past the cap. The reference rebuilds that split from its definition, item by item."""
    from hdpissa_trl.engine.fold import buckets_by_size

    expected: list[list[int]] = []
    for i, size in enumerate(sizes):
        if expected and sum(sizes[j] for j in expected[-1]) + size <= cap:
            expected[-1].append(i)
        else:
            expected.append([i])
    got = buckets_by_size(sizes, cap)
    assert got == expected
    assert [i for b in got for i in b] == list(range(len(sizes)))
    assert all(len(b) == 1 or sum(sizes[i] for i in b) <= cap for b in got)


@pytest.mark.slow
def test_one_step_update_rank_is_2Kr(tmp_path):
    """K=4 devices, r=2: one step moves a 48x32 layer in exactly 2·K·r = 16 directions (DP-LoRA: at most 2r = 4)."""
    K, r = 4, 2
    recs = run_workers(tmp_path, K, "--steps", "1", "--lora_r", str(r), "--optim", "sgd", "--lr", "1.0")
    name = "model.layers.0.mlp.up_proj"
    dW = recs[0]["W"][name] - make_model().get_submodule(name).weight.detach()
    assert torch.linalg.matrix_rank(dW.double(), rtol=1e-5).item() == 2 * K * r
    # Slices of different devices are orthogonal.
    A0 = recs[0]["A0_all"][name]
    gram = A0 @ A0.t()
    off = gram - torch.diag(torch.diag(gram))
    assert off.abs().max() < 1e-4 * gram.abs().max()


def _single_device_engine(**config):
    from hdpissa_trl import HDPiSSAConfig, inject_hdpissa

    model = make_model()
    engine = inject_hdpissa(model, HDPiSSAConfig(r=2, lora_alpha=4.0, sync_check_steps=0, **config), 0, 1,
                            show_progress=False)
    return model, engine


def test_fold_on_cpu_times_the_fold_and_its_gather_with_the_host_clock():
    import time

    model, engine = _single_device_engine(bucket_size_mb=0.001)
    with torch.no_grad():
        for layer in engine.layers:
            layer.lora_A.add_(0.01)
    start = time.perf_counter()
    stats = engine.fold()
    wall = time.perf_counter() - start
    assert len(stats.gather_timers) > 1  # one per bucket
    assert 0 < stats.gather_seconds < stats.seconds <= wall
    assert stats.to_dict()["seconds"] == stats.seconds and stats.to_dict()["num_collectives"] == 0


def test_fp32_fold_is_in_place_and_equals_the_delta_form():
    """The fp32 shortcut (``WeightUpdater.addmm``: one ``addmm_``) gives W + s·Σ_k(B_k A_k − B0_k A0_k)."""
    model, engine = _single_device_engine()
    g = torch.Generator().manual_seed(0)
    expected = {}
    with torch.no_grad():
        for name, layer in zip(engine.names, engine.layers):
            layer.lora_A.add_(0.01 * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.add_(0.01 * torch.randn(layer.lora_B.shape, generator=g))
            w = layer.base_layer.weight.detach().double()
            expected[name] = w + layer.scale * (layer.lora_B.double() @ layer.lora_A.double()
                                                - layer.B0.double() @ layer.A0.double())
    ptrs = [layer.base_layer.weight.data_ptr() for layer in engine.layers]
    engine.fold()
    for name, layer, ptr in zip(engine.names, engine.layers, ptrs):
        assert layer.base_layer.weight.data_ptr() == ptr
        torch.testing.assert_close(layer.base_layer.weight.double(), expected[name], rtol=0, atol=1e-6)
        assert torch.equal(layer.lora_A, layer.A0) and torch.equal(layer.lora_B, layer.B0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: there the fold's kernels run "
                                                          "asynchronously and the host clock would time launches only")
def test_fold_on_gpu_times_device_work_not_kernel_launches():
    import time

    from hdpissa_trl.engine.fold import Stopwatch, fold_deltas
    from hdpissa_trl.engine.layer import HDPiSSALinear
    from hdpissa_trl.engine.precision import WeightUpdater

    dev = torch.device("cuda")
    # The stopwatch itself: ~0.2 s of GPU spinning, queued in microseconds.
    watch, start = Stopwatch(dev), time.perf_counter()
    torch.cuda._sleep(300_000_000)
    watch.stop()
    launched = time.perf_counter() - start
    torch.cuda.synchronize()
    waited = time.perf_counter() - start
    assert launched < 0.2 * waited and watch.seconds == pytest.approx(waited, rel=0.3)
    # The fold: bf16 weights with an fp32 master (one m×n product, master add and cast per layer).
    layers, updaters = [], []
    for i in range(8):
        base = torch.nn.Linear(8192, 8192, bias=False, device=dev, dtype=torch.bfloat16)
        layer = HDPiSSALinear(base, 16, 0, 1, 1.0, name=f"l{i}")
        layer.set_initial_factors(torch.randn(16, 8192, device=dev) * 0.01, torch.randn(8192, 16, device=dev) * 0.01)
        with torch.no_grad():
            layer.lora_A.add_(0.01)
        layers.append(layer)
        updaters.append(WeightUpdater(base.weight, "fp32", layer_index=i))
    fold_deltas(layers, updaters, 1)  # warm-up (cuBLAS handles, allocator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    stats = fold_deltas(layers, updaters, 2)
    launched = time.perf_counter() - start
    torch.cuda.synchronize()
    waited = time.perf_counter() - start
    print(f"\nGPU fold of 8 layers 8192x8192: host clock without sync {launched * 1e3:.2f} ms, synchronised "
          f"{waited * 1e3:.2f} ms, FoldStats.seconds {stats.seconds * 1e3:.2f} ms")
    assert stats.seconds <= waited * 1.05 and stats.seconds >= 0.5 * waited


# ------------------------------------------------------------------------------------- what one fold launches
VIEW_OPS = {"aten::view", "aten::reshape", "aten::slice", "aten::select", "aten::permute", "aten::t", "aten::detach",
            "aten::unsqueeze", "aten::as_strided", "aten::empty", "aten::empty_strided", "aten::alias", "aten::expand",
            "aten::_unsafe_view", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::to"}


def _works(event) -> bool:
    """An operator that does work itself or through one it calls (``reshape`` of a non-contiguous slice copies)."""
    return event.name not in VIEW_OPS or any(c.name.startswith("aten::") and _works(c) for c in event.cpu_children)


def _layers(n_layers: int, K: int, r: int, m: int, n: int, dtype=torch.float32, precision="fp32", **kw):
    from hdpissa_trl.engine.layer import HDPiSSALinear
    from hdpissa_trl.engine.precision import WeightUpdater

    g = torch.Generator().manual_seed(0)
    layers, updaters = [], []
    for i in range(n_layers):
        base = nn.Linear(n, m, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.randn(m, n, generator=g))
        base.to(dtype)
        layer = HDPiSSALinear(base, r, 0, K, 2.0, name=f"l{i}")
        layer.set_initial_factors(torch.randn(K * r, n, generator=g), torch.randn(m, K * r, generator=g))
        with torch.no_grad():
            layer.lora_A.add_(1e-3 * torch.randn(r, n, generator=g))
            layer.lora_B.add_(1e-3 * torch.randn(m, r, generator=g))
        layers.append(layer)
        updaters.append(WeightUpdater(base.weight, precision, layer_index=i, **kw))
    return layers, updaters


def _profiled_fold(layers, updaters):
    from torch.profiler import ProfilerActivity, profile

    from hdpissa_trl.engine.fold import fold_deltas

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fold_deltas(layers, updaters, step=1)
    events = prof.events()
    ops = sum(1 for e in events if e.cpu_parent is None and e.name.startswith("aten::") and _works(e))
    live = peak = 0
    for e in sorted(events, key=lambda e: e.time_range.start):  # every allocation minus every free, in time order
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return ops, peak


@pytest.mark.parametrize("dtype,precision,per_layer", [(torch.float32, "fp32", 5), (torch.bfloat16, "fp32", 6)])
def test_fold_operators_per_layer(dtype, precision, per_layer):
    """Per adapted layer the fold runs the operand construction (4 operators: A0 + dA and dA into one block, s·dB and
    s·B0 into the other), one GEMM into W or its master, and, with a master, one cast into W; the delta buffer and the
    adapter reset are multi-tensor operations whose count does not grow with the layers. (The fold before this
    measured 8 and 11 per layer: a subtraction per factor, copies of the gathered slices, two concatenations, and with
    a master a separate m×n product, its scaling and its add.) On a GPU every operator is at least one kernel."""
    few, _ = _profiled_fold(*_layers(2, 1, 2, 24, 16, dtype, precision))  # fold_deltas of one device: K = 1
    many, _ = _profiled_fold(*_layers(8, 1, 2, 24, 16, dtype, precision))
    assert (many - few) / 6 == per_layer


def test_fold_with_a_master_adds_no_weight_sized_temporary():
    """bf16 W with an fp32 master: the product goes straight into the master (``addmm_``), so the fold's temporaries
    are the thin operands (m × 2Kr and 2Kr × n), not an m×n fp32 product (256 KiB here; the fold before this peaked
    at 270 KiB)."""
    m = n = 256
    layers, updaters = _layers(1, 1, 2, m, n, torch.bfloat16, "fp32")
    _, peak = _profiled_fold(layers, updaters)
    assert 0 < peak < m * n * 4 / 4, peak


def test_tf32_fold_rounds_the_operands_as_tensor_cores_read_them():
    """``fold_matmul="tf32"`` off CUDA: the operands keep their first 10 mantissa bits (what TF32 tensor cores read),
    then a plain fp32 GEMM. Reference: the fp64 product of the truncated operands, written out here."""
    from hdpissa_trl.engine.fold import fold_gathered
    from hdpissa_trl.engine.precision import round_to_tf32

    x = torch.tensor([1 + 2**-10, 1 + 2**-11, -(1 + 2**-10 + 2**-11), 3.0, float("inf"), float("nan")])
    got = round_to_tf32(x)
    assert got[:4].tolist() == [1 + 2**-10, 1.0, -(1 + 2**-10), 3.0] and got[4] == float("inf") and got[5].isnan()

    def truncate(t):  # drop the 13 low mantissa bits of every element, one at a time
        return torch.tensor([torch.tensor([v]).view(torch.int32).item() & ~0x1FFF for v in t.reshape(-1).tolist()],
                            dtype=torch.int32).view(torch.float32).view(t.shape)

    K, r, m, n = 2, 2, 12, 10
    runs = {}
    for mode in ("ieee", "tf32"):
        layers, updaters = _layers(1, K, r, m, n, fold_matmul=mode)
        layer = layers[0]
        w0 = layer.base_layer.weight.detach().clone()
        dA, dB = (layer.lora_A - layer.A0).detach(), (layer.lora_B - layer.B0).detach()
        # K = 2 devices, device 1 sent zero deltas: W += s·[dB_0 | 0 | B0_all] @ [A0_all + (dA_0; 0) ; (dA_0; 0)].
        dA_all = torch.cat([dA, torch.zeros(r, n)])
        left = torch.cat([dB, torch.zeros(m, r), layer.B0_all], dim=1) * layer.scale
        right = torch.cat([layer.A0_all + dA_all, dA_all], dim=0)
        gathered = torch.cat([torch.cat([dA.reshape(-1), dB.reshape(-1)])[None], torch.zeros(1, r * (m + n))])
        fold_gathered(layers, updaters, gathered, step=1)
        runs[mode] = (w0, layer.base_layer.weight.detach().clone(), left.detach(), right.detach())
    w0, w_ieee, left, right = runs["ieee"]
    exact = left.double() @ right.double()
    expected_tf32 = truncate(left).double() @ truncate(right).double()
    torch.testing.assert_close(runs["tf32"][1].double() - w0.double(), expected_tf32, rtol=0, atol=1e-6)
    torch.testing.assert_close(w_ieee.double() - w0.double(), exact, rtol=0, atol=1e-6)
    assert not torch.equal(runs["tf32"][1], w_ieee)
    # The precision consequence: the update is off by a few parts in 2^10 of its size.
    assert (expected_tf32 - exact).norm() / exact.norm() < 2**-9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (TF32 tensor cores, Triton)")
def test_gpu_fold_tf32_is_deterministic_and_fused_passes_equal_the_eager_ones():
    """On CUDA: (a) the TF32 fold gives the same bits twice from the same state (what K devices compute) and stays
    within 2^-9 of the IEEE fold's update; the process's TF32 setting is what it was before; (b) the compiled Kahan,
    stochastic-rounding and checksum passes give the eager passes' bits."""
    from hdpissa_trl.engine import precision
    from hdpissa_trl.engine.consistency import tensor_checksum
    from hdpissa_trl.engine.fold import fold_gathered
    from hdpissa_trl.engine.layer import HDPiSSALinear
    from hdpissa_trl.engine.precision import WeightUpdater

    dev = torch.device("cuda")
    before = torch.backends.cuda.matmul.fp32_precision
    g = torch.Generator(device=dev).manual_seed(0)
    K, r, m, n = 8, 16, 1024, 4096
    w0 = torch.randn(m, n, generator=g, device=dev)
    A0, B0 = torch.randn(K * r, n, generator=g, device=dev), torch.randn(m, K * r, generator=g, device=dev)
    gathered = 1e-3 * torch.randn(K, r * (m + n), generator=g, device=dev)
    results = {}
    for mode in ("tf32", "tf32", "ieee"):
        base = nn.Linear(n, m, bias=False, device=dev)
        with torch.no_grad():
            base.weight.copy_(w0)
        layer = HDPiSSALinear(base, r, 0, K, 1.0)
        layer.set_initial_factors(A0, B0)
        fold_gathered([layer], [WeightUpdater(base.weight, "fp32", fold_matmul=mode)], gathered, 1)
        torch.cuda.synchronize()
        results.setdefault(mode, []).append(base.weight.detach().clone())
    assert torch.backends.cuda.matmul.fp32_precision == before
    assert torch.equal(results["tf32"][0], results["tf32"][1])
    d_tf32, d_ieee = results["tf32"][0] - w0, results["ieee"][0] - w0
    assert (d_tf32 - d_ieee).norm() / d_ieee.norm() < 2**-9

    w = torch.randn(1 << 22, generator=g, device=dev).to(torch.bfloat16)
    c = (1e-3 * torch.randn(1 << 22, generator=g, device=dev)).to(torch.bfloat16)
    delta = 1e-3 * torch.randn(1 << 22, generator=g, device=dev)
    pairs = [(w.clone(), c.clone()), (w.clone(), c.clone())]
    for (wi, ci), fused in zip(pairs, (True, False)):
        precision.kahan_update(wi, ci, delta, fused=fused)
    assert torch.equal(pairs[0][0], pairs[1][0]) and torch.equal(pairs[0][1], pairs[1][1])
    a, b = w.clone(), w.clone()
    precision.stochastic_round_update(a, delta, key=99, fused=True)
    precision.stochastic_round_update(b, delta, key=99, fused=False)
    assert torch.equal(a, b) and not torch.equal(a, w)
    assert tensor_checksum(w, fused=True).item() == tensor_checksum(w, fused=False).item() == tensor_checksum(
        w.cpu()).item()
