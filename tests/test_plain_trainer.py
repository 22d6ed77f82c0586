"""HDPiSSATrainer: a plain ``transformers.Trainer`` with a custom loss, in one process (the 2-process guarantees are
in ``test_trainers_multiprocess.py``)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments
from workers.rl_worker import CausalLMTrainer
from workers.trainer_worker import Recorder, make_dataset

from hdpissa_trl import HDPiSSAConfig
from hdpissa_trl.testing_utils import save_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.mark.parametrize("method", ["hdpissa", "lora"])
def test_custom_loss_trains_and_saves_the_merged_plain_model(tiny_model_dir, tmp_path, method):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = make_dataset(64, "text").map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=12, learning_rate=1e-2,
                             per_device_train_batch_size=8, logging_steps=1, save_strategy="no", report_to=[], seed=1)
    trainer = CausalLMTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                              train_dataset=rows, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                              processing_class=tokenizer, hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4),
                              method=method)
    recorder = Recorder(trainer)
    trainer.callback_handler.callbacks.insert(0, recorder)  # before the fold: each step's A, B after the optimizer
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    trainer.train()
    curve = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.2, curve
    trainer.save_model()
    saved = load_file(tmp_path / "model.safetensors")
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    assert set(saved) == set(start)  # plain names only: no adapter, no base_layer
    changed = [k for k in saved if not torch.equal(saved[k], start[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only the adapted linears moved
    if method == "hdpissa":
        # The saved weights are the fold formula applied by hand (float64) to what the optimizer did at every step:
        # W = W_start + s·Σ_steps (B·A − B0·A0), this device's slice being all of them (K = 1).
        engine = trainer.hdpissa_engine
        assert len(recorder.stepped) == 12
        for name, layer in zip(engine.names, engine.layers):
            A0, B0 = layer.A0_all.double(), layer.B0_all.double()
            expected = start[f"{name}.weight"].double()
            for step in recorder.stepped:
                A, B = (t.double() for t in step[name])
                expected = expected + layer.scale * (B @ A - B0 @ A0)
            torch.testing.assert_close(saved[f"{name}.weight"].double(), expected, rtol=0, atol=1e-5)
