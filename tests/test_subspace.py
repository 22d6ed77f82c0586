"""Subspace schedules (``HDPiSSAConfig.subspace``): a real 2-process run per schedule against a slow one-process
reference of the same formulas, W bit-identical on both ranks after every fold; ``"moving"`` with K = 1 is PEFT's
PiSSA over several steps; checkpoint state and errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _dist import torchrun
from peft import LoraConfig, get_peft_model
from torch import nn
from workers.engine_worker import batch, make_model

from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
from hdpissa_trl.testing_utils import build_tiny_model

WORKER = os.path.join(os.path.dirname(__file__), "workers", "subspace_worker.py")


def factors(w: torch.Tensor, lo: int, hi: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)`` of singular directions ``lo..hi-1`` of ``w`` in PEFT's PiSSA convention."""
    U, S, Vh = torch.linalg.svd(w.detach(), full_matrices=False)
    root = (S[lo:hi] / s).sqrt()
    return root[:, None] * Vh[lo:hi], U[:, lo:hi] * root[None, :]


def reference_run(K: int, mode: str, every: int, steps: int, lr: float, eps: float, r: int = 2, alpha: float = 4.0,
                  pool: int = 2, global_slices: bool = False) -> dict[str, torch.Tensor]:
    """K devices simulated in one process: per-device grads from dL/dW, a separate AdamW per device, the naive fold
    ``W += s·Σ_k (B_k A_k − B0_k A0_k)``, then the schedule: refactor (new top-K·r of the current W, optimizer state
    dropped), rotate (next window of K·r directions of the initial SVD), gradient (top-K·r singular directions of
    dL/dW summed over the devices at the change step, at the current factors' magnitudes), moving (factors ←
    adapters). ``global_slices``: every device's slice steps on the mean of the K devices' dL/dW
    (``slice_gradient="global"``), not its own."""
    s = alpha / r
    model = make_model()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    W = {n: model.get_submodule(n).weight for n in names}
    kr = K * r
    init = {n: factors(W[n], 0, pool * kr if mode == "rotate" else kr, s) for n in names}
    A0 = {(n, k): init[n][0][k * r:(k + 1) * r].clone() for n in names for k in range(K)}
    B0 = {(n, k): init[n][1][:, k * r:(k + 1) * r].clone() for n in names for k in range(K)}
    A = {key: nn.Parameter(v.clone()) for key, v in A0.items()}
    B = {key: nn.Parameter(v.clone()) for key, v in B0.items()}
    opts = [torch.optim.AdamW([p for n in names for p in (A[n, k], B[n, k])], lr=lr, eps=eps, weight_decay=0.0)
            for k in range(K)]
    for p in model.parameters():
        p.requires_grad_(False)
    for step in range(1, steps + 1):
        G_sum = {n: torch.zeros_like(W[n]) for n in names}
        grads = []
        for k in range(K):
            for n in names:
                W[n].requires_grad_(True)
                W[n].grad = None
            ids = batch(step - 1, k)
            model(input_ids=ids, labels=ids).loss.backward()
            grads.append({n: W[n].grad for n in names})
            for n in names:
                G_sum[n] += W[n].grad
                W[n].requires_grad_(False)
        for k in range(K):
            for n in names:
                G = G_sum[n] / K if global_slices else grads[k][n]
                A[n, k].grad = s * B[n, k].detach().t() @ G
                B[n, k].grad = s * G @ A[n, k].detach().t()
            opts[k].step()
        with torch.no_grad():
            for n in names:
                W[n] += s * sum(B[n, k] @ A[n, k] - B0[n, k] @ A0[n, k] for k in range(K))
            change = mode in ("refactor", "rotate", "gradient") and step % every == 0
            for n in names:
                if mode == "moving":
                    new = [(A[n, k].clone(), B[n, k].clone()) for k in range(K)]
                elif change and mode == "gradient":
                    U, _, Vh = torch.linalg.svd(G_sum[n], full_matrices=False)
                    mags = torch.cat([A0[n, k] for k in range(K)]).norm(dim=1).sort(descending=True).values
                    Af, Bf = mags[:, None] * Vh[:kr], U[:, :kr] * mags[None, :]
                    new = [(Af[k * r:(k + 1) * r], Bf[:, k * r:(k + 1) * r]) for k in range(K)]
                elif change and mode == "refactor":
                    Af, Bf = factors(W[n], 0, kr, s)
                    new = [(Af[k * r:(k + 1) * r], Bf[:, k * r:(k + 1) * r]) for k in range(K)]
                elif change:  # rotate
                    t = (step // every) % pool
                    Af, Bf = init[n][0][t * kr:(t + 1) * kr], init[n][1][:, t * kr:(t + 1) * kr]
                    new = [(Af[k * r:(k + 1) * r], Bf[:, k * r:(k + 1) * r]) for k in range(K)]
                else:
                    new = [(A0[n, k], B0[n, k]) for k in range(K)]
                for k in range(K):
                    A0[n, k], B0[n, k] = new[k][0].clone(), new[k][1].clone()
                    A[n, k].copy_(A0[n, k])
                    B[n, k].copy_(B0[n, k])
            if change:
                for opt in opts:
                    opt.state.clear()
    return {n: W[n].detach().clone() for n in names}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["refactor", "rotate", "gradient", "moving"])
def test_two_process_schedule_matches_reference_and_keeps_w_identical(tmp_path, mode):
    # A fresh Adam state (after every refactor/rotation) takes sign-like first steps, which turn float round-off in
    # near-zero gradients into lr-sized differences; eps = 1e-6 keeps the comparison with the reference smooth.
    steps, every, eps = 5, 2, 1e-6
    torchrun(WORKER, 2, ["--out", str(tmp_path), "--subspace", mode, "--every", str(every), "--steps", str(steps),
                         "--eps", str(eps)])
    recs = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(2)]
    assert all(rec["world"] == 2 for rec in recs)
    for rec in recs:
        assert rec["checks_ok"] == [True] * steps  # the engine's own cross-rank checksum after every fold
        assert rec["fold_collectives"] == [1] * steps  # the fold stays one collective
        want_changed = [mode != "moving" and step % every == 0 for step in range(1, steps + 1)]
        assert rec["changed"] == want_changed
        # Only a refactor or a gradient change talks beyond the fold: it broadcasts the new factors (2 per layer), as
        # the init does (the gradient schedule also all-reduces each layer's gradient at those steps).
        n_layers = len(rec["W"])
        assert rec["broadcasts"] == [2 * n_layers if (mode in ("refactor", "gradient") and c) else 0
                                     for c in want_changed]
    ref = reference_run(2, mode, every, steps, lr=1e-2, eps=eps)
    W0 = {n: make_model().get_submodule(n).weight.detach() for n in ref}
    for n, w_ref in ref.items():
        assert torch.equal(recs[0]["W"][n], recs[1]["W"][n]), f"{n} differs across ranks"
        assert torch.equal(recs[0]["A0_all"][n], recs[1]["A0_all"][n])
        moved = (w_ref - W0[n]).abs().max().item()
        assert moved > 1e-3
        # The gradient's top singular values lie closer together than W's: round-off in the summed gradient turns the
        # new directions slightly, which Adam's fresh, sign-like steps carry into W (up to 1e-3 of the move here).
        rel = 1e-3 if mode == "gradient" else 2e-4
        torch.testing.assert_close(recs[0]["W"][n], w_ref, rtol=0, atol=2e-6 + rel * moved)
    # The schedule matters: the fixed scheme ends elsewhere.
    fixed = reference_run(2, "fixed", every, steps, lr=1e-2, eps=eps)
    assert max((fixed[n] - ref[n]).abs().max().item() for n in ref) > 1e-4


@pytest.mark.slow
def test_two_process_global_slice_gradients_match_reference_and_keep_w_identical(tmp_path):
    """``slice_gradient="global"``: each device's slice steps on the mean of both devices' gradients (one extra
    collective per step, before the optimizer), W bit-identical on both ranks and equal to the reference's; the
    paper's local slices end elsewhere."""
    steps = 4
    torchrun(WORKER, 2, ["--out", str(tmp_path), "--subspace", "fixed", "--steps", str(steps),
                         "--slice_gradient", "global"])
    recs = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(2)]
    for rec in recs:
        assert rec["world"] == 2 and rec["checks_ok"] == [True] * steps
        assert rec["fold_collectives"] == [1] * steps and rec["reduces"] == [1] * steps
    ref = reference_run(2, "fixed", 2, steps, lr=1e-2, eps=1e-8, global_slices=True)
    local = reference_run(2, "fixed", 2, steps, lr=1e-2, eps=1e-8)
    W0 = {n: make_model().get_submodule(n).weight.detach() for n in ref}
    for n, w_ref in ref.items():
        assert torch.equal(recs[0]["W"][n], recs[1]["W"][n]), f"{n} differs across ranks"
        moved = (w_ref - W0[n]).abs().max().item()
        assert moved > 1e-3
        torch.testing.assert_close(recs[0]["W"][n], w_ref, rtol=0, atol=2e-6 + 2e-4 * moved)
    assert max((local[n] - ref[n]).abs().max().item() for n in ref) > 1e-4


def test_global_slice_gradients_are_every_slices_autograd_gradient():
    """One layer, K = 3: after two micro-batches' backward, the buffers hold every slice's gradient as autograd gives
    it to that slice's own adapters (a model injected as rank k, local mode), summed over the micro-batches; the
    single-process reduce gives this device its own slice of that sum; the sharded engine refuses the option."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10, bias=False))
    xs = [torch.randn(5, 12) for _ in range(2)]
    targets = [torch.randn(5, 10) for _ in range(2)]
    K, r = 3, 2

    def injected(rank: int, mode: str):
        model = nn.Sequential(nn.Linear(12, 10, bias=False))
        model.load_state_dict(base.state_dict())
        engine = inject_hdpissa(model, HDPiSSAConfig(r=r, lora_alpha=4.0, target_modules=["0"], slice_gradient=mode),
                                rank=rank, world_size=K, show_progress=False)
        for x, t in zip(xs, targets):
            ((model(x) - t) ** 2).sum().backward()
        return engine

    engine = injected(1, "global")
    layer = engine.layers[0]
    assert layer.lora_A.grad is None and layer.lora_B.grad is None  # the buffers take the gradients instead
    gA, gB = (t.clone() for t in layer.slice_grads)
    for k in range(K):
        own = injected(k, "local").layers[0]
        torch.testing.assert_close(gA[k * r:(k + 1) * r], own.lora_A.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gB[:, k * r:(k + 1) * r], own.lora_B.grad, rtol=1e-5, atol=1e-6)
    engine.reduce_slice_gradients()  # one process: its own slice, / K (the world here is the K of the injection)
    torch.testing.assert_close(layer.lora_A.grad, gA[r:2 * r] / K)
    torch.testing.assert_close(layer.lora_B.grad, gB[:, r:2 * r] / K)
    assert all(float(t.abs().sum()) == 0 for t in layer.slice_grads)  # emptied for the next step
    with pytest.raises(ValueError, match="slice_gradient must be one of"):
        HDPiSSAConfig(slice_gradient="batch")


def test_moving_with_one_device_is_peft_pissa_step_for_step():
    """K = 1, subspace='moving': three AdamW steps give PEFT PiSSA's merged W (α ≠ r)."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(build_tiny_model("llama", seed=0, num_layers=1),
                                LoraConfig(r=2, lora_alpha=8, target_modules=targets, init_lora_weights="pissa"))
    model = build_tiny_model("llama", seed=0, num_layers=1)
    engine = inject_hdpissa(model, HDPiSSAConfig(r=2, lora_alpha=8, target_modules=targets, subspace="moving"), 0, 1,
                            show_progress=False)
    opt_p = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    opt_h = torch.optim.AdamW(engine.adapter_parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(3):
        ids = torch.randint(0, 500, (4, 12), generator=torch.Generator().manual_seed(step))
        for m, opt in ((peft_model, opt_p), (model, opt_h)):
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        engine.fold()
    merged = peft_model.merge_and_unload()
    for name, layer in zip(engine.names, engine.layers):
        torch.testing.assert_close(layer.weight, merged.get_submodule(name).weight, rtol=0, atol=1e-5)
    w0 = build_tiny_model("llama", seed=0, num_layers=1)
    assert max((lyr.weight - w0.get_submodule(n).weight).abs().max() for n, lyr in zip(engine.names, engine.layers)) \
        > 1e-2


def test_schedule_errors_and_checkpoint_state():
    with pytest.raises(ValueError, match="subspace must be one of"):
        HDPiSSAConfig(subspace="spin")
    with pytest.raises(ValueError, match="subspace_steps must be >= 1"):
        HDPiSSAConfig(subspace_steps=0)
    with pytest.raises(ValueError, match="rotate_pool·K·r = 24 singular directions, but layer "
                                         "'model.layers.0.self_attn.k_proj' has only min\\(out, in\\) = 16"):
        inject_hdpissa(build_tiny_model("llama", seed=0, num_layers=1, hidden_size=32, intermediate_size=48),
                       HDPiSSAConfig(r=6, subspace="rotate", rotate_pool=2), 0, 2, show_progress=False)
    # Rotation: the pool travels in the checkpoint (the initial SVD is gone after training) and a resume with
    # another schedule is refused.
    cfg = HDPiSSAConfig(r=2, lora_alpha=2, subspace="rotate", subspace_steps=1)
    eng = inject_hdpissa(build_tiny_model("llama", seed=0, num_layers=1), cfg, 0, 1, show_progress=False)
    state = eng.state_dict()
    assert json.loads(state["metadata"]["config"])["subspace"] == "rotate" and len([k for k in state["tensors"] if "subspace.pool" in k]) \
        == 2 * len(eng.layers)
    other = inject_hdpissa(build_tiny_model("llama", seed=1, num_layers=1), cfg, 0, 1, show_progress=False)
    other.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(eng.subspace.pool, other.subspace.pool))
    with pytest.raises(ValueError, match="HDPiSSAConfig.subspace='rotate', this run has subspace='fixed'"):
        inject_hdpissa(build_tiny_model("llama", seed=0, num_layers=1), HDPiSSAConfig(r=2, lora_alpha=2), 0, 1,
                       show_progress=False).load_state_dict(state)


def test_refactor_keeps_fitted_per_layer_ranks():
    """A layer whose rank was fitted (K·r > min(out, in)) keeps its own r and scale through a re-factorisation: the new
    factors are the top K·r_layer directions of the current W, as a fresh init with the step's seed would give."""
    model = build_tiny_model("llama", seed=0, num_layers=1, hidden_size=32, intermediate_size=48)
    cfg = HDPiSSAConfig(r=10, lora_alpha=10, subspace="refactor", subspace_steps=1)
    eng = inject_hdpissa(model, cfg, 0, 2, show_progress=False)  # K = 2 from this rank's point of view
    ranks = {n: lyr.r for n, lyr in zip(eng.names, eng.layers)}
    assert ranks["model.layers.0.self_attn.k_proj"] == 8 and ranks["model.layers.0.self_attn.q_proj"] == 10
    shapes = [(lyr.A0_all.shape, lyr.B0_all.shape) for lyr in eng.layers]
    with torch.no_grad():
        for lyr in eng.layers:  # move W so that the new factors differ from the initial ones
            lyr.base_layer.weight.add_(0.05 * torch.randn_like(lyr.base_layer.weight))
    eng.step = 1
    assert eng.subspace.after_fold(eng) is True
    assert [(lyr.A0_all.shape, lyr.B0_all.shape) for lyr in eng.layers] == shapes
    for lyr in eng.layers:
        w = lyr.base_layer.weight.float()
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        k, s = 2 * lyr.r, cfg.lora_alpha / lyr.r
        ref_B0A0 = (U[:, :k] * S[:k]) @ Vh[:k] / s  # s·B0A0 is the top-k part of the current W
        torch.testing.assert_close(lyr.B0_all @ lyr.A0_all, ref_B0A0, rtol=1e-4, atol=1e-5)


def test_trainer_restarts_optimizer_state_when_factors_change(tmp_path):
    """HDPiSSASFTTrainer with subspace='refactor' every 2 folds, 3 steps: Adam's moments restart after fold 2, so its
    step count is 1 at the end (3 without the restart)."""
    from trl import SFTConfig
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSASFTTrainer
    from hdpissa_trl.testing_utils import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "m", arch="llama")
    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, max_steps=3, learning_rate=1e-2,
                     per_device_train_batch_size=2, save_strategy="no", report_to=[], max_length=48)
    steps = {}
    for mode in ("fixed", "refactor"):
        trainer = HDPiSSASFTTrainer(model=model_dir, args=args, train_dataset=make_dataset(16),
                                    hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4, subspace=mode, subspace_steps=2))
        trainer.train()
        steps[mode] = {int(st["step"]) for st in trainer.optimizer.state.values()}
    assert steps == {"fixed": {3}, "refactor": {1}}


def test_recipe_flags_reach_the_config():
    """`--hdpissa_subspace rotate --hdpissa_subspace_steps 7 --hdpissa_rotate_pool 3 --hdpissa_slice_gradient global`
    build the matching config."""
    from types import SimpleNamespace

    from hdpissa_trl.scripts.recipe import HDPiSSAScriptArguments, hdpissa_config_from_args

    model_args = SimpleNamespace(lora_r=2, lora_alpha=4, lora_dropout=0.0, lora_target_modules=None)
    cfg = hdpissa_config_from_args(HDPiSSAScriptArguments(hdpissa_subspace="rotate", hdpissa_subspace_steps=7,
                                                          hdpissa_rotate_pool=3, hdpissa_slice_gradient="global"),
                                   model_args)
    assert (cfg.subspace, cfg.subspace_steps, cfg.rotate_pool, cfg.slice_gradient) == ("rotate", 7, 3, "global")
    default = hdpissa_config_from_args(HDPiSSAScriptArguments(), model_args)
    assert (default.subspace, default.slice_gradient) == ("fixed", "local")


def test_schedules_are_refused_with_w_sharded_by_rows():
    """The sharded engine folds row shards only; the schedules are built for the replicated engine: a clear error
    before any weight is touched."""
    from hdpissa_trl.engine.sharded import ShardedHDPiSSAEngine

    model = build_tiny_model("llama", seed=0, num_layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("rotate", "refactor", "moving"):
        with pytest.raises(ValueError, match=f"subspace='{mode}' is not available with W sharded by rows"):
            ShardedHDPiSSAEngine(model, HDPiSSAConfig(r=2, subspace=mode), 0, 1, show_progress=False)
    with pytest.raises(ValueError, match="slice_gradient='global' is not available with W sharded by rows"):
        ShardedHDPiSSAEngine(model, HDPiSSAConfig(r=2, slice_gradient="global"), 0, 1, show_progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_gradient_capture_is_dl_dw_and_costs_nothing_on_other_steps():
    """subspace='gradient' every 2 folds: the layers hold a gradient buffer only during the step before a change,
    and what the backward puts there is dL/dW as autograd computes it for a plain copy of the model."""
    model = build_tiny_model("llama", seed=0, num_layers=1)
    plain = build_tiny_model("llama", seed=0, num_layers=1)
    eng = inject_hdpissa(model, HDPiSSAConfig(r=2, lora_alpha=2, subspace="gradient", subspace_steps=2,
                                              sync_check_steps=0), 0, 1, show_progress=False)
    assert all(lyr.grad_capture is None for lyr in eng.layers)  # fold 1 changes nothing: no buffer
    ids = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    eng.fold()
    assert not eng.factors_changed and all(lyr.grad_capture is not None for lyr in eng.layers)  # armed for fold 2
    ids = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    for rows in (ids[:1], ids[1:]):  # two micro-batches accumulate, as gradient accumulation does
        model(input_ids=rows, labels=rows).loss.backward()
    with torch.no_grad():  # the plain copy at the same W (fold 1 moved it)
        for name, lyr in zip(eng.names, eng.layers):
            plain.get_submodule(name).weight.copy_(lyr.weight)
    for rows in (ids[:1], ids[1:]):
        plain(input_ids=rows, labels=rows).loss.backward()
    for name, lyr in zip(eng.names, eng.layers):
        torch.testing.assert_close(lyr.grad_capture, plain.get_submodule(name).weight.grad, rtol=1e-4, atol=1e-6)
    mags = [lyr.A0_all.norm(dim=1).clone() for lyr in eng.layers]
    eng.fold()
    assert eng.factors_changed and all(lyr.grad_capture is None for lyr in eng.layers)
    for name, lyr, m in zip(eng.names, eng.layers, mags):
        G = plain.get_submodule(name).weight.grad
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        kr = lyr.A0_all.shape[0]
        # New rows span G's top-K·r right singular space, with the old magnitudes.
        torch.testing.assert_close(lyr.A0_all.norm(dim=1), m.sort(descending=True).values, rtol=1e-5, atol=1e-6)
        proj = lyr.A0_all / lyr.A0_all.norm(dim=1, keepdim=True)
        torch.testing.assert_close((proj @ Vh[:kr].t()).abs(), torch.eye(kr), rtol=0, atol=2e-3)


def test_subspace_warmup_scales_each_step_after_a_change_and_restores_the_rate():
    model = build_tiny_model("llama", seed=0, num_layers=1)
    eng = inject_hdpissa(model, HDPiSSAConfig(r=2, lora_alpha=2, subspace="rotate", subspace_steps=3,
                                              subspace_warmup_steps=2, sync_check_steps=0), 0, 1, show_progress=False)
    params = eng.adapter_parameters()
    opt = torch.optim.SGD(params, lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # a scheduler keeps setting the unscaled rate
    eng.scale_learning_rate(opt)
    scales, moves = [], []
    for _ in range(7):
        for p in params:
            p.grad = torch.ones_like(p)
        before = params[0].detach().clone()
        scales.append(eng.lr_scale())
        opt.step()
        moves.append(round(float((before - params[0].detach()).mean()), 6))  # SGD: the step is lr_used · 1
        sched.step()
        assert opt.param_groups[0]["lr"] == 0.5
        eng.fold()
    # Folds 3 and 6 change the factors: the next two steps run at 1/3 and 2/3 of the rate.
    assert scales == [1.0, 1.0, 1.0, 1 / 3, 2 / 3, 1.0, 1 / 3]
    assert moves == [round(0.5 * s, 6) for s in scales]
    state = eng.state_dict()["tensors"]
    assert int(state["subspace.since_change"]) == 1
    other = inject_hdpissa(build_tiny_model("llama", seed=0, num_layers=1), eng.config, 0, 1, show_progress=False)
    other.load_state_dict(eng.state_dict())
    assert other.lr_scale() == eng.lr_scale() == 2 / 3
    with pytest.raises(ValueError, match="subspace_warmup_steps must be an integer >= 0"):
        HDPiSSAConfig(subspace_warmup_steps=-1)
