"""HDPiSSAGRPOTrainer in one process: vLLM weight sync sends the plain W under plain names, the reference (beta > 0)
is the starting model for HD-PiSSA and for the PiSSA baseline, sync_ref_model runs, the output head is refused.

vLLM itself cannot be installed here (no CUDA): the test drives TRL's own ``VLLMGeneration.sync_weights`` (colocate
mode) with a plain ``transformers`` model standing in for vLLM's model runner, which takes weights by name exactly as
vLLM's ``load_weights`` does (an unknown name is an error). The 2-process guarantees are in
``test_trainers_multiprocess.py``; the reward rising on the demo task in ``test_recipe_rl.py``.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import GRPOConfig

from hdpissa_trl import HDPiSSAConfig, HDPiSSAGRPOTrainer
from hdpissa_trl.rewards import digit_reward
from hdpissa_trl.testing_utils import save_tiny_model
from hdpissa_trl.trainer.grpo_trainer import vllm_named_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def demo_prompts(n: int = 16) -> Dataset:
    with open(os.path.join(REPO, "recipes/demo/data_rl/prompts_train.jsonl")) as f:
        return Dataset.from_list([json.loads(line) for line, _ in zip(f, range(n))])


def grpo_config(tmp_path, **overrides) -> GRPOConfig:
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, max_steps=2, learning_rate=1e-2,
                  per_device_train_batch_size=4, num_generations=4, max_completion_length=6, logging_steps=1,
                  save_strategy="no", report_to=[], gradient_checkpointing=False, seed=5)
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


class StandInVLLMModel:
    """vLLM's model as ``sync_weights`` sees it: ``load_weights([(name, tensor)])``, by name, strict; it wraps a plain
    ``transformers`` model (``hf``) holding what was received."""

    def __init__(self, model):
        self.hf = model
        self.received: list[str] = []

    def load_weights(self, weights):
        params = dict(self.hf.named_parameters())
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"vLLM has no parameter {name!r}")
            with torch.no_grad():
                params[name].copy_(tensor)
            self.received.append(name)


def test_vllm_sync_sends_merged_w_under_plain_names(tiny_model_dir, tmp_path, monkeypatch):
    from trl.generation.vllm_generation import VLLMGeneration

    receiver = StandInVLLMModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir))

    def init_standin_vllm(self):  # no vLLM here: the colocated engine is a plain model taking weights by name
        self.llm = SimpleNamespace(llm_engine=SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=receiver)))),
            reset_prefix_cache=lambda: None)

    monkeypatch.setattr(VLLMGeneration, "_init_vllm", init_standin_vllm)
    trainer = HDPiSSAGRPOTrainer(model=tiny_model_dir, reward_funcs=digit_reward,
                                 args=grpo_config(tmp_path, use_vllm=True, vllm_mode="colocate"),
                                 train_dataset=demo_prompts(), hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
    engine = trainer.hdpissa_engine
    # Move W: one fold of random adapter deltas, as after an optimizer step.
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in engine.layers:
            layer.lora_A.add_(0.05 * torch.randn_like(layer.lora_A))
            layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))
    engine.fold()

    trainer.vllm_generation.sync_weights()

    plain_names = [name for name, _ in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()]
    assert receiver.received == plain_names  # every weight once, plain names, no adapter factor
    merged = engine.merged_state_dict()
    for name, param in receiver.hf.named_parameters():
        assert torch.equal(param, merged[name]), name
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    with torch.no_grad():
        trainer.model.eval()
        torch.testing.assert_close(receiver.hf(ids).logits, trainer.model(ids).logits, rtol=0, atol=0)
    # The mapping itself makes no copies: the tensors are the model's own.
    w = dict(vllm_named_weights(trainer.model))
    assert w[f"{engine.names[0]}.weight"].data_ptr() == engine.layers[0].base_layer.weight.data_ptr()


@pytest.mark.parametrize("method", ["hdpissa", "pissa"])
def test_reference_is_the_starting_model_first_kl_is_zero(tiny_model_dir, tmp_path, method):
    """With beta > 0 the first step's KL to the reference is 0: policy = reference. For the PiSSA baseline TRL's
    adapter-disabled reference would be the residual W - BA (KL far from 0)."""
    args = grpo_config(tmp_path, beta=0.1, sync_ref_model=method == "hdpissa", ref_model_sync_steps=1,
                       ref_model_mixup_alpha=0.5)
    trainer = HDPiSSAGRPOTrainer(model=tiny_model_dir, reward_funcs=digit_reward, args=args,
                                 train_dataset=demo_prompts(), hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4),
                                 method=method)
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kls[0] == pytest.approx(0.0, abs=1e-7), kls
    if method == "hdpissa":  # sync_ref_model=True mixed the merged W into the reference after each step
        start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        name = f"{trainer.hdpissa_engine.names[0]}.weight"
        assert not torch.equal(trainer.ref_model.get_parameter(name), start.get_parameter(name))


def test_adapted_output_head_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="output head 'lm_head' is not supported with GRPOTrainer"):
        HDPiSSAGRPOTrainer(model=tiny_model_dir, reward_funcs=digit_reward, args=grpo_config(tmp_path),
                           train_dataset=demo_prompts(), hdpissa_config=HDPiSSAConfig(r=2, target_modules=["lm_head"]))


def test_peft_model_as_model_is_trained_as_grpotrainer_would(tiny_model_dir, tmp_path):
    """A PeftModel passed as the model keeps GRPOTrainer's meaning: its adapter is trained, no HD-PiSSA layer is
    injected into PEFT's own lora_A / lora_B linears."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    trainer = HDPiSSAGRPOTrainer(model=model, reward_funcs=digit_reward, args=grpo_config(tmp_path, max_steps=1),
                                 train_dataset=demo_prompts())
    assert trainer.method == "peft" and trainer.hdpissa_engine is None
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert before and all(".lora_" in n for n in before)
    assert not any("base_layer.base_layer" in n or "A0_all" in n for n, _ in model.named_parameters())
    assert any(not torch.equal(p, model.get_parameter(n)) for n, p in before.items())
