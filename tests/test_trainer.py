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
    from workers.trainer_worker import check_w_against_fold_formula

    launch(2, "--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--record_dir", str(tmp_path / "rec"),
           "--max_steps", "12", "--lr", "1e-2", "--grad_accum", "2")
    r0, r1 = records(tmp_path / "rec", 2)
    assert r0["world_size"] == r1["world_size"] == r0["dist_world"] == r0["args_world_size"] == 2
    assert r0["wrapped_type"] != "DistributedDataParallel"
    names = list(r0["W"])
    # Trap (b): DDP's broadcast at wrap time would make every device's slice rank 0's. Recorded when training begins,
    # i.e. after the model was prepared for training: each device still holds its own slice k of the initial factors.
    r = r0["A0_all"][names[0]].shape[0] // 2
    for k, rec in enumerate((r0, r1)):
        assert all(torch.equal(rec["A_wrapped"][n], rec["A0_all"][n][k * r:(k + 1) * r]) for n in names)
    assert all(not torch.equal(r0["A_wrapped"][n], r1["A_wrapped"][n]) for n in names)
    # Trap (a): DDP's all-reduce would make the adapter gradients equal.
    assert all(not torch.allclose(r0["first_grads"][n][0], r1["first_grads"][n][0]) for n in names)
    # Folds only at accumulation boundaries: 24 micro-batches (counted by a forward hook) make 12 optimizer steps
    # and 12 folds (counted by the engine), not 24.
    assert r0["forwards"] == r1["forwards"] == 24
    assert r0["folds"] == r1["folds"] == 12 == r0["log_history"][-1]["step"]
    # W bit-identical across devices, and equal to the fold formula applied to what each device's optimizer did.
    check_w_against_fold_formula(r0, r1, steps=12)
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
def test_trainer_reduces_slice_gradients_once_per_step_before_clipping(tiny_model_dir, tmp_path):
    """Two real processes through HDPiSSASFTTrainer with slice_gradient="global" and 2 micro-batches per step: one
    reduce per optimizer step; device k's slice gets the mean of both devices' slice-k gradients (from their own
    buffers); the trainer then clips that (max_grad_norm = 1); W is the fold formula's and the same on both ranks."""
    from workers.trainer_worker import check_w_against_fold_formula

    launch(2, "--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--record_dir", str(tmp_path / "rec"),
           "--max_steps", "3", "--lr", "1e-2", "--grad_accum", "2", "--slice_gradient", "global")
    r0, r1 = records(tmp_path / "rec", 2)
    assert r0["world_size"] == 2 and r0["reduces"] == r1["reduces"] == 3 and r0["folds"] == 3
    names = list(r0["W"])
    r = r0["A0_all"][names[0]].shape[0] // 2
    sq = 0.0
    for k, rec in enumerate((r0, r1)):
        for n in names:
            sl = slice(k * r, (k + 1) * r)
            want_A = (r0["slice_grads_local"][n][0][sl] + r1["slice_grads_local"][n][0][sl]) / 2
            want_B = (r0["slice_grads_local"][n][1][:, sl] + r1["slice_grads_local"][n][1][:, sl]) / 2
            torch.testing.assert_close(rec["slice_grads_reduced"][n][0], want_A)
            torch.testing.assert_close(rec["slice_grads_reduced"][n][1], want_B)
            if k == 0:
                sq += float(want_A.square().sum() + want_B.square().sum())
    # The local buffers differ across devices (their own data); the clip acts on the reduced gradient.
    assert not torch.equal(r0["slice_grads_local"][names[0]][0], r1["slice_grads_local"][names[0]][0])
    coef = min(1.0, 1.0 / (sq ** 0.5 + 1e-6))
    for n in names:
        torch.testing.assert_close(r0["first_grads"][n][0], r0["slice_grads_reduced"][n][0] * coef)
    check_w_against_fold_formula(r0, r1, steps=3)
    # What the step logs as communication counts the reduce too: the fold's gather (sends its rank-r delta, receives
    # the other device's) and the reduce-scatter (sends the other slice's gradients, receives the other device's
    # contribution to its own), fp32: at K = 2 each moves 2·Σ r·(in + out) values, in two collectives per step.
    delta_values = sum(r * (r0["A0_all"][n].shape[1] + r0["B0_all"][n].shape[0]) for n in names)
    logged = [h for h in r0["log_history"] if "loss" in h]
    assert len(logged) == 3 and all(h["hdpissa/collectives_per_step"] == 2 for h in logged)
    assert all(h["hdpissa/bytes_communicated"] == 2 * (2 * delta_values * 4) for h in logged)


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
    # The resumed run computed steps 4-6 only (its history's steps 1-3 come from the checkpoint); those new losses
    # equal the uninterrupted run's, as do the interrupted run's steps 1-3.
    assert len(second[0]["stepped"]) == 3 and len(first[0]["stepped"]) == 3
    assert losses(second[0])[3:] == full_curve[3:] and len(full_curve) == 6
    assert losses(first[0]) == full_curve[:3]
    for n in straight[0]["W"]:
        for k in range(2):
            assert torch.equal(straight[k]["W"][n], second[k]["W"][n]), n


@pytest.mark.slow
def test_fp16_inf_on_one_rank_skips_the_step_on_every_rank(tiny_model_dir, tmp_path):
    """fp16 GradScaler, 2 processes, an inf gradient on rank 1 only at step 3: BOTH ranks skip step 3 (one small
    collective agrees on it), lower their loss scale together and keep identical learning-rate schedules; nothing is
    folded at step 3 and W stays bit-identical across ranks. (Without the agreement only rank 1 would skip.)"""
    rec = tmp_path / "rec"
    launch(2, "--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--record_dir", str(rec),
           "--max_steps", "5", "--lr", "1e-2", "--grad_scaler", "--fault", "inf:3:1")
    assert (rec / "fault_rank1.json").exists() and not (rec / "fault_rank0.json").exists()
    r0, r1 = records(rec, 2)
    for r in (r0, r1):
        assert [s["skipped"] for s in r["steps"]] == [False, False, True, False, False]
        assert r["steps"][2]["scale"] == r["steps"][1]["scale"] / 2  # backoff once
        assert r["steps"][2]["lr"] == r["steps"][1]["lr"]  # the scheduler did not step either
        assert torch.equal(r["steps"][2]["checksums"], r["steps"][1]["checksums"])  # nothing folded
        assert r["folds"] == 4
    for a, b in zip(r0["steps"], r1["steps"]):
        assert (a["scale"], a["lr"]) == (b["scale"], b["lr"]) and torch.equal(a["checksums"], b["checksums"])
    assert not torch.equal(r0["steps"][3]["checksums"], r0["steps"][2]["checksums"])  # step 4 folds again
    logged = [h for h in r0["log_history"] if "loss" in h]
    assert logged[-1]["hdpissa/skipped_steps"] == 1


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


@pytest.mark.parametrize("fmt", ["text", "messages", "conversations"])
def test_dataset_formats(tiny_model_dir, tmp_path, fmt):
    """Every format SFTTrainer takes, ShareGPT `conversations` (from/value) included: the pre-check is never stricter."""
    trainer = _single_process(tiny_model_dir, tmp_path, "hdpissa", fmt, steps=2)
    assert trainer.hdpissa_engine.step == 2


def test_unknown_method_is_clear_error(tiny_model_dir, tmp_path):
    from hdpissa_trl import HDPiSSASFTTrainer

    with pytest.raises(ValueError, match="Unknown method 'dora'; choose one of hdpissa, pissa, lora, full"):
        HDPiSSASFTTrainer(model=tiny_model_dir, method="dora")


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


# -- peft_config keeps its SFTTrainer meaning --------------------------------------------------------------------

def _sft_args(out, **kw):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(out), use_cpu=True, bf16=False, learning_rate=1e-2, per_device_train_batch_size=4,
                     logging_steps=1, report_to=[], max_length=32, **{"max_steps": 3, "save_strategy": "no", **kw})


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def test_peft_config_trains_that_adapter_exactly_as_sfttrainer(tiny_model_dir, tmp_path, caplog):
    """`peft_config=` without hdpissa_config: the PEFT adapter is trained exactly as SFTTrainer trains it (same losses,
    same adapter weights, adapter-only output) and the log says plainly that HD-PiSSA is not used."""
    from peft import PeftModel
    from trl import SFTTrainer
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSASFTTrainer

    with caplog.at_level("WARNING", logger="hdpissa_trl.trainer.mixin"):
        ours = HDPiSSASFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path / "ours"),
                                 train_dataset=make_dataset(16), peft_config=_lora())
    assert "HD-PiSSA is NOT used" in caplog.text and "HDPiSSAConfig.from_peft(peft_config)" in caplog.text
    assert "trains that adapter exactly as SFTTrainer does" in caplog.text
    assert ours.method == "peft" and ours.hdpissa_engine is None and isinstance(ours.model, PeftModel)
    ref = SFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path / "ref"), train_dataset=make_dataset(16),
                     peft_config=_lora())
    ours.train()
    ref.train()
    assert losses({"log_history": ours.state.log_history}) == losses({"log_history": ref.state.log_history})
    mine, theirs = ours.model.state_dict(), ref.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ours.save_model()
    assert (tmp_path / "ours" / "adapter_config.json").exists()  # what SFTTrainer writes for a PEFT model
    assert not (tmp_path / "ours" / "model.safetensors").exists()


def test_peft_config_with_hdpissa_is_an_error_and_from_peft_is_the_explicit_way(tiny_model_dir, tmp_path):
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer

    for extra in ({"hdpissa_config": HDPiSSAConfig(r=2)}, {"method": "hdpissa"}):
        with pytest.raises(ValueError, match=r"Both .* and peft_config were given.*"
                                             r"hdpissa_config=HDPiSSAConfig.from_peft\(peft_config\)"):
            HDPiSSASFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path), train_dataset=make_dataset(8),
                              peft_config=_lora(), **extra)
    trainer = HDPiSSASFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path), train_dataset=make_dataset(8),
                                hdpissa_config=HDPiSSAConfig.from_peft(_lora()))
    assert trainer.method == "hdpissa"
    assert [n.rsplit(".", 1)[-1] for n in trainer.hdpissa_engine.names] == ["q_proj", "v_proj"] * 2
    assert {lyr.r for lyr in trainer.hdpissa_engine.layers} == {4}


def test_peft_model_as_model_is_trained_as_sfttrainer_or_refused_with_hdpissa(tiny_model_dir, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer

    def peft_model():
        return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), _lora())

    with pytest.raises(ValueError, match=r"Both hdpissa_config and a PeftModel as model were given.*get_base_model"):
        HDPiSSASFTTrainer(model=peft_model(), args=_sft_args(tmp_path), train_dataset=make_dataset(8),
                          hdpissa_config=HDPiSSAConfig(r=2))
    trainer = HDPiSSASFTTrainer(model=peft_model(), args=_sft_args(tmp_path), train_dataset=make_dataset(8))
    assert trainer.method == "peft" and trainer.hdpissa_engine is None
    assert not any("A0_all" in n for n, _ in trainer.model.named_buffers())  # nothing injected into PEFT's layers
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


# -- checkpoints keep the training precision, shard, and give the best model back exactly ------------------------

def _train_and_resume(model_dir, tmp_path, **kw):
    """4 steps straight vs 2 steps + resume from checkpoint-2: returns both final W's (per layer) and the run dir."""
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer

    def trainer(out, steps):
        return HDPiSSASFTTrainer(model=model_dir, args=_sft_args(out, max_steps=steps, save_strategy="steps",
                                                                 save_steps=2), train_dataset=make_dataset(32),
                                 hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4), **kw)

    straight = trainer(tmp_path / "straight", 4)
    straight.train()
    resumed = trainer(tmp_path / "split", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    weights = [[lyr.base_layer.weight.detach().clone() for lyr in t.hdpissa_engine.layers] for t in (straight, resumed)]
    return weights[0], weights[1], straight


def test_checkpoints_keep_training_precision_save_dtype_is_for_the_final_model(tiny_model_dir, tmp_path):
    """An fp32 run with save_dtype=bfloat16: checkpoints hold fp32 W (resume continues from exactly that W and ends
    bit-identical to the run that did not stop); only the final saved model is bf16."""
    from safetensors import safe_open

    straight_w, resumed_w, straight = _train_and_resume(tiny_model_dir, tmp_path, save_dtype=torch.bfloat16)
    with safe_open(tmp_path / "straight" / "checkpoint-2" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(straight_w, resumed_w))
    straight.save_model()
    with safe_open(tmp_path / "straight" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_sharded_checkpoints_resume_exactly(tiny_model_dir, tmp_path, monkeypatch):
    """save_pretrained splits a model above max_shard_size into shards + index: resume reads them (small shards)."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def small_shards(self, *args, **kwargs):
        kwargs.setdefault("max_shard_size", "40KB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", small_shards)
    straight_w, resumed_w, _ = _train_and_resume(tiny_model_dir, tmp_path)
    ckpt = tmp_path / "straight" / "checkpoint-2"
    assert (ckpt / "model.safetensors.index.json").exists() and not (ckpt / "model.safetensors").exists()
    assert len(list(ckpt.glob("model-*.safetensors"))) > 2
    assert all(torch.equal(a, b) for a, b in zip(straight_w, resumed_w))


def test_load_best_model_at_end_restores_w_exactly(tiny_model_dir, tmp_path):
    """load_best_model_at_end with save_total_limit=1: the best checkpoint is recorded under its final name, kept by
    the rotation, and loading it puts back that step's W bit for bit (the adapted layers' `base_layer` included)."""
    from transformers import TrainerCallback
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer

    # greater_is_better on eval_loss makes an early checkpoint the "best", so the final W differs from it.
    args = _sft_args(tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=2, eval_strategy="steps",
                     eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                     greater_is_better=True, save_total_limit=1)
    trainer = HDPiSSASFTTrainer(model=tiny_model_dir, args=args, train_dataset=make_dataset(32),
                                eval_dataset=make_dataset(8), hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
    seen: dict[int, list[torch.Tensor]] = {}

    class RecordW(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = [lyr.base_layer.weight.detach().clone() for lyr in trainer.hdpissa_engine.layers]

    trainer.add_callback(RecordW())
    trainer.train()
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    best_step = max(evals, key=evals.get)
    assert best_step != 6, evals  # else the check below could not tell loading from not loading
    assert trainer.state.best_model_checkpoint == str(tmp_path / "run" / f"checkpoint-{best_step}")
    assert (tmp_path / "run" / f"checkpoint-{best_step}").is_dir()
    now = [lyr.base_layer.weight for lyr in trainer.hdpissa_engine.layers]
    assert all(torch.equal(a, b) for a, b in zip(now, seen[best_step]))
    assert not all(torch.equal(a, b) for a, b in zip(now, seen[6]))


def test_mixin_alone_makes_a_trainer(tiny_model_dir, tmp_path):
    """`class MyTrainer(HDPiSSATrainerMixin, Trainer): pass` is a whole HD-PiSSA trainer: hdpissa_config reaches the
    mixin's own constructor, adapters are injected, every optimizer step is folded and the saved model is plain."""
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from hdpissa_trl import HDPiSSAConfig, HDPiSSATrainerMixin

    class MyTrainer(HDPiSSATrainerMixin, Trainer):
        pass

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (16, 12), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=3, learning_rate=1e-2,
                             per_device_train_batch_size=4, report_to=[], save_strategy="no", logging_steps=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = MyTrainer(model=model, args=args, train_dataset=data, hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
    w0 = trainer.hdpissa_engine.layers[0].base_layer.weight.detach().clone()
    trainer.train()
    assert trainer.method == "hdpissa" and trainer.hdpissa_engine.step == 3
    assert not torch.equal(w0, trainer.hdpissa_engine.layers[0].base_layer.weight)
    trainer.save_model()
    saved = load_file(tmp_path / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in saved)
    name = trainer.hdpissa_engine.names[0]
    assert torch.equal(saved[f"{name}.weight"], trainer.hdpissa_engine.layers[0].base_layer.weight)


def test_model_card_states_the_fitted_ranks(tiny_model_dir, tmp_path):
    """r larger than some layers: the card says which r each layer got (the largest with K·r <= min(out, in)), and the
    update rank from the largest r used, counted here from the base model's layer shapes."""
    from transformers import AutoModelForCausalLM
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fitted = [min(48, min(mod.weight.shape)) for name, mod in base.named_modules()
              if isinstance(mod, torch.nn.Linear) and name.endswith("proj")]
    assert set(fitted) == {48, 32}  # the tiny llama's k/v projections are 32 wide
    trainer = HDPiSSASFTTrainer(model=tiny_model_dir, args=_sft_args(tmp_path / "out", max_steps=1),
                                train_dataset=make_dataset(8, "prompt_completion"),
                                hdpissa_config=HDPiSSAConfig(r=48, lora_alpha=48))
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(model_name="m")
    card = (tmp_path / "out" / "README.md").read_text()
    assert (f"| per-device r | 48, fitted per layer: r=48 on {fitted.count(48)}, r=32 on {fitted.count(32)} |"
            in card), card
    assert f"| adapted layers | {len(fitted)} |" in card
    assert "| update rank per step (2·K·r) | 96 |" in card and "| directions owned (K·r) | 48 |" in card
