"""The code paths only a GPU launch takes (fp16 with ShardedGradScaler; accelerate's FSDP2 prepare and clipping),
run where a CPU can reach them: 2 processes, gloo (tests/workers/gpu_paths_worker.py)."""

from __future__ import annotations

import os

import pytest
import torch
from _dist import torchrun

from hdpissa_trl.testing_utils import save_tiny_model

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "gpu_paths_worker.py")
FSDP2_ENV = dict(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                 FSDP_RESHARD_AFTER_FORWARD="true", FSDP_OFFLOAD_PARAMS="false",
                 FSDP_CPU_RAM_EFFICIENT_LOADING="true", FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def records(d, phase):
    return [torch.load(os.path.join(d, f"{phase}_rank{k}.pt"), weights_only=False) for k in range(2)]


@pytest.mark.slow
def test_sharded_grad_scaler_skips_together_when_one_rank_overflows(tmp_path):
    """ShardedGradScaler already sums the ranks' found-inf flags in its unscale_; agree_on_skip on top keeps one
    decision: an inf gradient on rank 1 at step 2 makes BOTH ranks skip it (p unchanged) and halve their scale, and the
    steps before and after move p identically on both."""
    torchrun(WORKER, 2, ["--phase", "scaler", "--record_dir", str(tmp_path)], timeout=300)
    r0, r1 = records(tmp_path, "scaler")
    for r in (r0, r1):
        assert [s["skipped"] for s in r["steps"]] == [False, True, False]
        assert [s["scale"] for s in r["steps"]] == [2.0**10, 2.0**9, 2.0**9]
        assert torch.equal(r["steps"][1]["p"], r["steps"][0]["p"])
        assert torch.equal(r["steps"][0]["p"], 1 - 0.5 * torch.arange(4.0))  # one SGD step on d/dp = arange
    for a, b in zip(r0["steps"], r1["steps"]):
        assert torch.equal(a["p"], b["p"])


@pytest.mark.slow
def test_accelerates_fsdp2_prepare_and_clipping_keep_the_per_device_adapters(tiny_model_dir, tmp_path):
    """On GPUs, `Accelerator.prepare(model, optimizer)` under FSDP2 is `_prepare_fsdp2` (it swaps the optimizer's
    parameters out and maps them back by identity; the DDP guard's patched prepare_model is not called), and
    `clip_grad_norm_` takes its FSDP2 branch. With the model W-sharded by the trainer: the same model comes back, the
    optimizer holds exactly the engine's adapters, and clipping uses this device's own adapter gradients (norm by hand,
    unscaled once), different on the two ranks."""
    torchrun(WORKER, 2, ["--phase", "fsdp2", "--model", tiny_model_dir, "--record_dir", str(tmp_path)], timeout=400,
             **FSDP2_ENV)
    r0, r1 = records(tmp_path, "fsdp2")
    for r in (r0, r1):
        assert r["same_model"] and r["same_params"]
        assert r["calls"] == {"unscale": 1, "dtensor_clip": 1}  # the FSDP2 branch matched the prepared model
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in r["grads"]]))
        torch.testing.assert_close(r["norm"], norm)
        for g, c in zip(r["grads"], r["clipped"]):
            torch.testing.assert_close(c, g * (1e-3 / (norm + 1e-6)))
    assert not torch.equal(r0["norm"], r1["norm"])  # per-device gradients: nothing averaged
