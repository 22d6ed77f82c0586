"""HDPiSSADPOTrainer, HDPiSSAGRPOTrainer and HDPiSSATrainer under a real 2-process ``accelerate launch`` (gloo, CPU).

What the SFT trainer guarantees, for each: no DDP (adapter gradients stay per device, slices are not broadcast),
one fold per real optimizer step, W bit-identical across devices and equal to the fold formula applied to what each
device's optimizer did, telemetry logged, atomic checkpoints with every device's optimizer state, exact resume (loss
curve and W identical to an uninterrupted run), and a merged plain model on save.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _dist import child_env, free_port
from safetensors.torch import load_file
from workers.trainer_worker import check_w_against_fold_formula

from hdpissa_trl.testing_utils import save_tiny_model

WORKER = os.path.join(os.path.dirname(__file__), "workers", "rl_worker.py")
DPO_REF_WORKER = os.path.join(os.path.dirname(__file__), "workers", "dpo_ref_worker.py")
PAIRS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "demo", "data_rl",
                     "preference_train.jsonl")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def launch(*args: str, timeout: float = 600, worker: str = WORKER) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           "--multi_gpu", worker, *args]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def records(d) -> list[dict]:
    return [torch.load(os.path.join(d, f"rank{k}.pt"), weights_only=False) for k in range(2)]


def losses(rec) -> list[float]:
    return [h["loss"] for h in rec["log_history"] if "loss" in h]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dpo", "grpo", "plain"])
def test_two_processes_fold_checkpoint_and_exact_resume(tiny_model_dir, tmp_path, kind):
    # GRPO with gradient accumulation 2 (its generation batch then spans two micro-steps): still one fold per step.
    common = ["--trainer", kind, "--model", tiny_model_dir, "--max_steps", "4", "--save_steps", "2",
              "--grad_accum", "2" if kind == "grpo" else "1"]
    launch(*common, "--output_dir", str(tmp_path / "straight"), "--record_dir", str(tmp_path / "rs"))
    launch(*common, "--output_dir", str(tmp_path / "split"), "--record_dir", str(tmp_path / "r1"), "--stop_after", "2")
    ckpt = tmp_path / "split" / "checkpoint-2"
    launch(*common, "--output_dir", str(tmp_path / "split"), "--record_dir", str(tmp_path / "r2"), "--resume",
           str(ckpt))
    r0, r1 = records(tmp_path / "rs")

    assert r0["world_size"] == r1["world_size"] == r0["dist_world"] == r0["args_world_size"] == 2
    assert r0["wrapped_type"] != "DistributedDataParallel"
    names = list(r0["W"])
    assert all(not torch.equal(r0["A_setup"][n], r1["A_setup"][n]) for n in names)  # no broadcast of rank 0's slice
    assert all(not torch.allclose(r0["first_grads"][n][0], r1["first_grads"][n][0]) for n in names)  # no all-reduce
    assert r0["folds"] == r1["folds"] == 4 == len(r0["stepped"])
    check_w_against_fold_formula(r0, r1, steps=4)
    logged = [h for h in r0["log_history"] if "loss" in h]
    assert len(logged) == 4
    if kind == "dpo":  # precomputed reference on 2 processes: policy = reference at step 0
        assert logged[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
        assert logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert all(h["hdpissa/collectives_per_step"] == 1 and h["hdpissa/update_rank"] == 8 for h in logged)
    assert all(h["hdpissa/bytes_communicated"] > 0 and h["hdpissa/w_check_ok"] == 1.0 for h in logged)

    # Atomic checkpoint with every device's optimizer state; nothing half-written left behind.
    for name in ("CHECKPOINT_COMPLETE", "optimizer_rank0.pt", "optimizer_rank1.pt", "hdpissa_state.safetensors",
                 "model.safetensors", "rng_state_0.pth", "rng_state_1.pth"):
        assert (ckpt / name).exists(), name
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "split").iterdir())

    # Exact resume: the same loss curve and bit-identical W as the run that never stopped.
    first, second = records(tmp_path / "r1"), records(tmp_path / "r2")
    assert losses(first[0]) == losses(second[0])[:2]
    assert losses(second[0]) == pytest.approx(losses(r0), abs=1e-6)
    for n in names:
        for k in range(2):
            assert torch.equal(records(tmp_path / "rs")[k]["W"][n], second[k]["W"][n]), n

    # The saved model is the plain merged model.
    saved = load_file(tmp_path / "straight" / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k or "A0_all" in k for k in saved)
    for n in names:
        assert torch.equal(saved[f"{n}.weight"], r0["W"][n])


@pytest.mark.slow
def test_precomputed_dpo_reference_on_two_processes_is_each_rows_own(tiny_model_dir, tmp_path):
    """K = 2 processes score their shares of the rows; every row must get its own reference value, equal to a
    one-process computation done here row by row, and the first loss is ln 2 with zero margins (policy = reference).
    37 rows: not a multiple of K · batch = 8, so the last batch is uneven. ``file``: a dataset backed by Arrow cache
    files goes through TRL's own cache-file precompute; ``memory``: through the in-memory one.

    ``shuffled``: processes holding the rows in different orders (an unseeded split or shuffle; the shipped DPO recipe
    trained that way, first loss 1.306 and margins -0.46) are refused on every process, naming the cause."""
    import math

    from datasets import load_dataset
    from test_dpo import sequence_logps
    from transformers import AutoModelForCausalLM

    n, cache = 37, str(tmp_path / "hf_cache")
    load_dataset("json", data_files=PAIRS, split="train", cache_dir=cache)  # both processes read the same cache files
    launch("--model", tiny_model_dir, "--jsonl", PAIRS, "--n", str(n), "--cache_dir", cache,
           "--output_dir", str(tmp_path / "out"), "--record_dir", str(tmp_path / "rec"), worker=DPO_REF_WORKER)
    r0, r1 = records(tmp_path / "rec")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for case in ("memory", "file"):
        assert r0[case]["rows"] == r1[case]["rows"], case
        rows = r0[case]["rows"]
        assert len(rows["ref_chosen_logps"]) == n
        for i in range(n):
            p, c, r = rows["prompt_ids"][i], rows["chosen_ids"][i], rows["rejected_ids"][i]
            assert rows["ref_chosen_logps"][i] == pytest.approx(sequence_logps(reference, p, c), abs=1e-3), (case, i)
            assert rows["ref_rejected_logps"][i] == pytest.approx(sequence_logps(reference, p, r), abs=1e-3), (case, i)
        for rec in (r0, r1):
            assert rec[case]["first_log"]["loss"] == pytest.approx(math.log(2.0), abs=1e-6), case
            assert rec[case]["first_log"]["rewards/margins"] == pytest.approx(0.0, abs=1e-6), case
    for rec in (r0, r1):
        assert "rows" not in rec["shuffled"]
        assert "The 2 processes hold different train datasets (process 1 differs from process 0" in rec["shuffled"][
            "error"]
        assert "fixed seed" in rec["shuffled"]["error"]
