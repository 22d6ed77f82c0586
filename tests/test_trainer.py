"""HDPiSSASFTTrainer under a real `accelerate launch` (2 CPU processes, gloo) and in a single process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _dist import child_env, free_port

from hdpissa_trl.testing_utils import save_tiny_model

WORKER = os.path.join(os.path.dirname(__file__), "workers", "trainer_worker.py")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def launch(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` with K processes on CPU: a multi-process launch + use_cpu=True in the training args."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1",
           "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--multi_gpu"] if nproc > 1 else ["--cpu"]
    cmd += [WORKER, *args]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def records(d, n):
    return [torch.load(os.path.join(d, f"rank{k}.pt"), weights_only=False) for k in range(n)]


def losses(rec):
    return [h["loss"] for h in rec["log_history"] if "loss" in h]


@pytest.mark.slow
def test_two_process_training_avoids_ddp_traps_and_matches_fold_reference(tiny_model_dir, tmp_path):
    launch(2, "--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--record_dir", str(tmp_path / "rec"),
           "--max_steps", "12", "--lr", "1e-2", "--grad_accum", "2")
    r0, r1 = records(tmp_path / "rec", 2)
    assert r0["world_size"] == r1["world_size"] == r0["dist_world"] == r0["args_world_size"] == 2
    assert r0["wrapped_type"] != "DistributedDataParallel"
    names = list(r0["W"])
    # Trap (b): DDP's broadcast would make every device's slice rank 0's.
    assert all(not torch.equal(r0["A_setup"][n], r1["A_setup"][n]) for n in names)
    # Trap (a): DDP's all-reduce would make the adapter gradients equal.
    assert all(not torch.allclose(r0["first_grads"][n][0], r1["first_grads"][n][0]) for n in names)
    # Folds only at accumulation boundaries: 12 optimizer steps with accumulation 2 = 12 folds, not 24.
    assert r0["folds"] == r1["folds"] == 12 == len(r0["stepped"])
    # W bit-identical across devices, and equal to the fold formula applied to what each device's optimizer did.
    s = r0["scale"]
    for n in names:
        assert torch.equal(r0["W"][n], r1["W"][n])
        ref = r0["W_start"][n].double().clone()
        A0, B0 = r0["A0_all"][n].double(), r0["B0_all"][n].double()
        r = A0.shape[0] // 2
        for step in range(12):
            for k, rec in enumerate((r0, r1)):
                A, B = (t.double() for t in rec["stepped"][step][n])
                A0k, B0k = A0[k * r:(k + 1) * r], B0[:, k * r:(k + 1) * r]
                ref += s * (B @ A - B0k @ A0k)
        torch.testing.assert_close(r0["W"][n].double(), ref, rtol=0, atol=1e-5)
    curve = losses(r0)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.1, curve
    logged = [h for h in r0["log_history"] if "loss" in h]
    assert all(h["hdpissa/collectives_per_step"] == 1 and h["hdpissa/update_rank"] == 8 for h in logged)
    assert all(h["hdpissa/w_check_ok"] == 1.0 for h in logged)
    # The saved model is the merged plain model.
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    from safetensors.torch import load_file

    sd = load_file(out / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k or "A0_all" in k for k in sd)
    for n in names:
        assert torch.equal(sd[f"{n}.weight"], r0["W"][n])


@pytest.mark.slow
def test_resume_is_exact_two_processes(tiny_model_dir, tmp_path):
    common = ["--model", tiny_model_dir, "--lr", "1e-2"]
    launch(2, *common, "--output_dir", str(tmp_path / "straight"), "--record_dir", str(tmp_path / "rs"),
           "--max_steps", "6", "--save_steps", "3")
    launch(2, *common, "--output_dir", str(tmp_path / "split"), "--record_dir", str(tmp_path / "r1"),
           "--max_steps", "6", "--save_steps", "3", "--stop_after", "3")
    ckpt = tmp_path / "split" / "checkpoint-3"
    assert (ckpt / "CHECKPOINT_COMPLETE").exists()
    assert (ckpt / "optimizer_rank0.pt").exists() and (ckpt / "optimizer_rank1.pt").exists()
    assert (ckpt / "hdpissa_state.safetensors").exists() and (ckpt / "model.safetensors").exists()
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "split").iterdir())
    launch(2, *common, "--output_dir", str(tmp_path / "split"), "--record_dir", str(tmp_path / "r2"),
           "--max_steps", "6", "--save_steps", "3", "--resume", str(ckpt))
    straight = records(tmp_path / "rs", 2)
    first, second = records(tmp_path / "r1", 2), records(tmp_path / "r2", 2)
    full_curve = losses(straight[0])
    # The resumed run's history starts with the checkpoint's (steps 1-3) and continues with steps 4-6.
    resumed_curve = losses(second[0])
    assert losses(first[0]) == resumed_curve[:3]
    assert len(full_curve) == 6 and len(resumed_curve) == 6
    assert full_curve == pytest.approx(resumed_curve, abs=1e-6)
    for n in straight[0]["W"]:
        for k in range(2):
            assert torch.equal(straight[k]["W"][n], second[k]["W"][n]), n


def _single_process(tiny_model_dir, tmp_path, method="hdpissa", fmt="prompt_completion", steps=4):
    from trl import SFTConfig
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer

    cfg = SFTConfig(output_dir=str(tmp_path / method), use_cpu=True, bf16=False, max_steps=steps, learning_rate=1e-2,
                    per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to=[], max_length=32)
    trainer = HDPiSSASFTTrainer(model=tiny_model_dir, args=cfg, train_dataset=make_dataset(32, fmt),
                                hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4), method=method)
    trainer.train()
    trainer.save_model()
    return trainer


@pytest.mark.parametrize("method", ["hdpissa", "pissa", "lora", "full"])
def test_methods_one_flag_away_save_plain_model(tiny_model_dir, tmp_path, method):
    from transformers import AutoModelForCausalLM

    trainer = _single_process(tiny_model_dir, tmp_path, method)
    out = tmp_path / method
    assert not (out / "adapter_config.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sd_t, sd_b = tuned.state_dict(), base.state_dict()
    changed = {k for k in sd_b if not torch.equal(sd_t[k], sd_b[k])}
    assert changed, "training must change the weights"
    if method != "full":
        assert all(("proj" in k and k.endswith(".weight")) for k in changed), changed
    if method == "hdpissa":
        assert trainer.hdpissa_engine.step == 4
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert ("hdpissa/fold_seconds" in logged[0]) == (method == "hdpissa")


@pytest.mark.parametrize("fmt", ["text", "messages"])
def test_dataset_formats(tiny_model_dir, tmp_path, fmt):
    trainer = _single_process(tiny_model_dir, tmp_path, "hdpissa", fmt, steps=2)
    assert trainer.hdpissa_engine.step == 2


def test_unknown_method_is_clear_error(tiny_model_dir, tmp_path):
    from hdpissa_trl import HDPiSSASFTTrainer

    with pytest.raises(ValueError, match="Unknown method 'dora'; choose one of hdpissa, pissa, lora, full"):
        HDPiSSASFTTrainer(model=tiny_model_dir, method="dora")


def test_skipped_optimizer_step_folds_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """A step skipped by the fp16 GradScaler leaves A, B at A0, B0: the fold still runs on every rank (so the
    collective cannot deadlock on a per-device decision) but adds exactly nothing to W."""
    import accelerate
    from trl import SFTConfig
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer

    cfg = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=1, report_to=[], max_length=32,
                    gradient_checkpointing=False)
    trainer = HDPiSSASFTTrainer(model=tiny_model_dir, args=cfg, train_dataset=make_dataset(8),
                                hdpissa_config=HDPiSSAConfig(r=2))
    eng = trainer.hdpissa_engine
    before = [lyr.base_layer.weight.detach().clone() for lyr in eng.layers]
    monkeypatch.setattr(accelerate.Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    trainer.hdpissa_after_optimizer_step()
    assert trainer._skipped_folds == 1 and eng.step == 1
    assert all(torch.equal(b, lyr.base_layer.weight) for b, lyr in zip(before, eng.layers))


def test_packing_eval_dataset_and_completion_only(tiny_model_dir, tmp_path):
    """SFTTrainer features keep working: packing, an eval dataset evaluated during training, completion-only loss."""
    from trl import SFTConfig
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer

    cfg = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=4, learning_rate=1e-2,
                    per_device_train_batch_size=2, logging_steps=2, save_strategy="no", report_to=[], max_length=48,
                    packing=True, eval_strategy="steps", eval_steps=2, completion_only_loss=True,
                    gradient_checkpointing=True)
    trainer = HDPiSSASFTTrainer(model=tiny_model_dir, args=cfg, train_dataset=make_dataset(32),
                                eval_dataset=make_dataset(8), hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and all(h["eval_loss"] > 0 for h in evals)
    assert trainer.hdpissa_engine.step == 4


def test_bf16_mixed_precision_trains(tiny_model_dir, tmp_path):
    """SFTConfig's default bf16=True (autocast) works with the HD-PiSSA layer, here on CPU."""
    from trl import SFTConfig
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer

    cfg = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True, max_steps=3, learning_rate=1e-2,
                    per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to=[], max_length=32)
    trainer = HDPiSSASFTTrainer(model=tiny_model_dir, args=cfg, train_dataset=make_dataset(16),
                                hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
    w0 = trainer.hdpissa_engine.layers[0].base_layer.weight.detach().clone()
    trainer.train()
    assert trainer.hdpissa_engine.step == 3
    assert not torch.equal(w0, trainer.hdpissa_engine.layers[0].base_layer.weight)
