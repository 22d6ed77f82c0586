"""HDPiSSADPOTrainer in one process: the reference is the starting model (loss ln 2 at step 0, margins checked against
log-probabilities computed by hand), ``sync_ref_model`` mixes the merged W, the output head is refused.

The multi-process guarantees (DDP traps, identical W, exact resume) are in ``test_trainers_distributed.py``.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import DPOConfig

from hdpissa_trl import HDPiSSAConfig, HDPiSSADPOTrainer
from hdpissa_trl.testing_utils import save_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LN2_FP32 = torch.tensor(math.log(2.0), dtype=torch.float32).item()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def demo_pairs(n: int = 32) -> Dataset:
    """The first ``n`` pairs of the demo preference set (correct worked answer vs. an arithmetic slip)."""
    with open(os.path.join(REPO, "recipes/demo/data_rl/preference_train.jsonl")) as f:
        return Dataset.from_list([json.loads(line) for line, _ in zip(f, range(n))])


def dpo_config(tmp_path, **overrides) -> DPOConfig:
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, max_steps=1, learning_rate=1e-2,
                  per_device_train_batch_size=8, per_device_eval_batch_size=32, logging_steps=1, save_strategy="no",
                  report_to=[], max_length=64, gradient_checkpointing=False, seed=3)
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def first_loss(trainer) -> float:
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("setup", ["frozen_copy", "precomputed", "pissa_baseline"])
def test_first_loss_is_ln2_because_the_reference_is_the_starting_model(tiny_model_dir, tmp_path, setup):
    """Policy = reference at step 0, so every pair's margin is 0 and the sigmoid loss is -log σ(0) = ln 2.

    An adapter-disabled reference would be wrong here: for HD-PiSSA it is the current W (zero margins forever), for
    PiSSA it is the residual W - BA (loss far from ln 2 at step 0).
    """
    method = "pissa" if setup == "pissa_baseline" else "hdpissa"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir) if setup == "frozen_copy" else tiny_model_dir
    args = dpo_config(tmp_path, precompute_ref_log_probs=setup == "precomputed")
    # Positional arguments in DPOTrainer's order (model, ref_model, args) go where DPOTrainer would put them.
    trainer = HDPiSSADPOTrainer(model, None, args, train_dataset=demo_pairs(16),
                                hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4), method=method)
    if setup == "frozen_copy":
        assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
        assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    elif setup == "precomputed":
        assert trainer.ref_model is None  # no second model in memory
    trainer.train()
    loss = first_loss(trainer)
    if setup == "frozen_copy":
        assert loss == LN2_FP32  # the same weights through the same kernels: exactly
    else:
        assert loss == pytest.approx(math.log(2.0), abs=1e-6), loss


def sequence_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Sum of log p(token | prefix) over the completion tokens, one sequence at a time (the slow, obvious way)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt_ids) - 1:].sum().item()


def test_margins_rise_and_match_log_probabilities_computed_by_hand(tiny_model_dir, tmp_path):
    """After training, the trainer's reported reward margin on the pairs equals β·[(log π − log π_ref)(chosen) −
    (log π − log π_ref)(rejected)] computed here from the saved merged model and the model on disk, and it is > 0."""
    pairs = demo_pairs(32)
    args = dpo_config(tmp_path, max_steps=12, lr_scheduler_type="constant", beta=0.1)
    trainer = HDPiSSADPOTrainer(model=tiny_model_dir, args=args, train_dataset=pairs, eval_dataset=pairs,
                                hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
    before = trainer.evaluate()
    assert before["eval_rewards/margins"] == 0.0
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model()

    policy = AutoModelForCausalLM.from_pretrained(args.output_dir)  # plain merged model, no hdpissa_trl inside
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    margins = []
    for row in trainer.eval_dataset:
        p, c, r = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
        chosen = sequence_logps(policy, p, c) - sequence_logps(reference, p, c)
        rejected = sequence_logps(policy, p, r) - sequence_logps(reference, p, r)
        margins.append(args.beta * (chosen - rejected))
    by_hand = sum(margins) / len(margins)
    assert after["eval_rewards/margins"] == pytest.approx(by_hand, abs=1e-3)
    assert by_hand > 0.1, margins
    assert after["eval_rewards/accuracies"] > 0.6


class MergedWeightRecorder(TrainerCallback):
    """The policy's merged plain weights at each step end (after the fold), as the reference sync sees them."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append({k: v.clone() for k, v in self.trainer.hdpissa_engine.merged_state_dict().items()})


def test_sync_ref_model_mixes_the_merged_plain_weights(tiny_model_dir, tmp_path):
    """TRL zips the two models' parameter lists, which an HD-PiSSA policy (adapters, base_layer names) breaks
    (shape error). Here ref ← (1 − α)·ref + α·W_merged every 2 steps, by name, checked against that formula."""
    alpha = 0.6
    args = dpo_config(tmp_path, max_steps=4, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=alpha)
    trainer = HDPiSSADPOTrainer(model=tiny_model_dir, args=args, train_dataset=demo_pairs(32),
                                hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
    recorder = MergedWeightRecorder(trainer)
    trainer.add_callback(recorder)
    expected = {k: v.detach().clone().double() for k, v in trainer.ref_model.named_parameters()}
    trainer.train()
    for step in (2, 4):
        for name in expected:
            expected[name] = (1 - alpha) * expected[name] + alpha * recorder.steps[step - 1][name].double()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = 0
    for name, param in trainer.ref_model.named_parameters():
        torch.testing.assert_close(param.double(), expected[name], rtol=0, atol=1e-6)
        changed += not torch.equal(param, start.get_parameter(name))
    assert changed > 0  # the adapted layers' weights moved into the reference


def test_adapted_output_head_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="output head 'lm_head' is not supported with DPOTrainer"):
        HDPiSSADPOTrainer(model=tiny_model_dir, args=dpo_config(tmp_path), train_dataset=demo_pairs(8),
                          hdpissa_config=HDPiSSAConfig(r=2, target_modules=["q_proj", "lm_head"]))


def test_synced_reference_is_checkpointed_and_resumed_exactly(tiny_model_dir, tmp_path):
    """With sync_ref_model the reference is training state: an interrupted run resumed from its checkpoint continues
    with the same reference (and so the same losses) as a run that never stopped. A checkpoint without it is refused."""
    from workers.trainer_worker import StopAfter

    def run(out, stop=0, resume=None):
        args = dpo_config(tmp_path, output_dir=str(out), max_steps=4, sync_ref_model=True, ref_model_sync_steps=1,
                          ref_model_mixup_alpha=0.5, save_strategy="steps", save_steps=2)
        trainer = HDPiSSADPOTrainer(model=tiny_model_dir, args=args, train_dataset=demo_pairs(32),
                                    hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
        if stop:
            trainer.add_callback(StopAfter(stop))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "split", stop=2)
    ckpt = tmp_path / "split" / "checkpoint-2"
    assert (ckpt / "reference_model.safetensors").is_file()
    resumed = run(tmp_path / "split", resume=str(ckpt))
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h] == pytest.approx(
        [h["loss"] for h in straight.state.log_history if "loss" in h], abs=1e-6)
    for name, param in straight.ref_model.named_parameters():
        torch.testing.assert_close(resumed.ref_model.get_parameter(name), param, rtol=0, atol=1e-6)
    (ckpt / "reference_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sync_ref_model=True: .*reference_model.safetensors is missing"):
        run(tmp_path / "split", resume=str(ckpt))


def test_peft_config_keeps_dpotrainers_meaning(tiny_model_dir, tmp_path):
    """A LoraConfig without hdpissa_config is trained exactly as DPOTrainer trains it (HD-PiSSA not used); with an
    hdpissa_config as well it is a clear error."""
    from peft import LoraConfig

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = HDPiSSADPOTrainer(model=tiny_model_dir, args=dpo_config(tmp_path), train_dataset=demo_pairs(8),
                                peft_config=lora)
    assert trainer.method == "peft" and trainer.hdpissa_engine is None
    trainer.train()
    assert first_loss(trainer) == pytest.approx(math.log(2.0), abs=1e-6)  # TRL's reference: the adapter disabled
    with pytest.raises(ValueError, match="Both hdpissa_config and peft_config were given"):
        HDPiSSADPOTrainer(model=tiny_model_dir, args=dpo_config(tmp_path), train_dataset=demo_pairs(8),
                          peft_config=lora, hdpissa_config=HDPiSSAConfig(r=2))


def test_sharded_w_is_refused_for_dpo_and_grpo(monkeypatch):
    """FSDP2 (W sharded by rows) has not run with a DPO/GRPO reference or generation: refused, naming what works."""
    from types import SimpleNamespace

    from hdpissa_trl.trainer.checks import refuse_sharded_w

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None), mixed_precision="no")
    sharded = SimpleNamespace(args=SimpleNamespace(fsdp_plugin_args={"fsdp_version": 2}), accelerator=accelerator)
    for name in ("DPOTrainer", "GRPOTrainer"):
        with pytest.raises(ValueError, match=f"HD-PiSSA with {name} supports replicated W only"):
            refuse_sharded_w(sharded, name)
    refuse_sharded_w(SimpleNamespace(args=SimpleNamespace(fsdp_plugin_args=None), accelerator=accelerator), "DPOTrainer")


def test_disable_dropout_also_covers_the_adapters_dropout(tiny_model_dir, tmp_path):
    """DPOConfig.disable_dropout (default True) ran before HD-PiSSA injected its adapters, so lora_dropout=0.3 stayed
    on (while the PEFT baselines lost theirs) and the first loss was 0.6949, not ln 2: the policy's dropped forward is
    not the reference. Now the same rule holds for every method."""
    args = dpo_config(tmp_path, precompute_ref_log_probs=True)
    assert args.disable_dropout
    trainer = HDPiSSADPOTrainer(model=tiny_model_dir, args=args, train_dataset=demo_pairs(16),
                                hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4, lora_dropout=0.3))
    assert all(layer.lora_dropout.p == 0.0 for layer in trainer.hdpissa_engine.layers)
    trainer.train()
    assert first_loss(trainer) == pytest.approx(math.log(2.0), abs=1e-6)


IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 11]])


def test_a_pissa_peft_model_keeps_its_base_weights(tiny_model_dir, tmp_path):
    """A PiSSA PeftModel as the model: DPOTrainer adds its "ref" adapter with the "default" config object, which ran
    PiSSA's init again and subtracted a second principal part from the base weights (policy logits off by up to 0.19,
    first loss still ln 2, so nothing noticed). The policy must be the model passed, and "ref" its starting adapter."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa", target_modules="all-linear"))
    with torch.no_grad():
        start = model(input_ids=IDS).logits
    trainer = HDPiSSADPOTrainer(model=model, args=dpo_config(tmp_path), train_dataset=demo_pairs(16), method="pissa")
    assert "ref" in model.peft_config and model.peft_config["default"].init_lora_weights == "pissa"
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, start, rtol=0, atol=1e-5)
        model.set_adapter("ref")
        torch.testing.assert_close(model(input_ids=IDS).logits, start, rtol=0, atol=1e-5)
        model.set_adapter("default")
    trainer.train()
    assert first_loss(trainer) == pytest.approx(math.log(2.0), abs=1e-6)
