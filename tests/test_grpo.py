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
    # Move W: one fold of random adapter deltas, as after an optimizer step; W expected by the fold formula (K = 1):
    # W_start + s·(B·A − B0·A0), in float64 here.
    torch.manual_seed(0)
    expected = {}
    with torch.no_grad():
        for name, layer in zip(engine.names, engine.layers):
            A0, B0 = layer.lora_A.double().clone(), layer.lora_B.double().clone()
            layer.lora_A.add_(0.05 * torch.randn_like(layer.lora_A))
            layer.lora_B.add_(0.05 * torch.randn_like(layer.lora_B))
            expected[f"{name}.weight"] = (layer.base_layer.weight.double()
                                          + layer.scale * (layer.lora_B.double() @ layer.lora_A.double() - B0 @ A0))
    engine.fold()

    trainer.vllm_generation.sync_weights()

    plain_names = [name for name, _ in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()]
    assert receiver.received == plain_names  # every weight once, plain names, no adapter factor
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for name, param in receiver.hf.named_parameters():
        if name in expected:  # an adapted layer: the folded W
            torch.testing.assert_close(param.double(), expected[name], rtol=0, atol=1e-6)
            assert (param.double() - start.get_parameter(name).double()).abs().max() > 1e-3, name
        else:  # everything else as it was
            assert torch.equal(param, start.get_parameter(name)), name
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    with torch.no_grad():
        trainer.model.eval()
        torch.testing.assert_close(receiver.hf(ids).logits, trainer.model(ids).logits, rtol=0, atol=0)
    # The mapping itself makes no copies: the tensors are the model's own.
    w = dict(vllm_named_weights(trainer.model))
    assert w[f"{engine.names[0]}.weight"].data_ptr() == engine.layers[0].base_layer.weight.data_ptr()


class RecordingGRPOTrainer(HDPiSSAGRPOTrainer):
    """Keeps, for every loss computation, the batch (prompt and completion ids and masks), the policy's per-token
    log-probabilities of it and, for HD-PiSSA, the merged W at that moment."""

    KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")

    def _compute_loss(self, model, inputs):
        if not hasattr(self, "seen"):
            self.seen = []
        with torch.no_grad():
            policy = per_token_logps(self.accelerator.unwrap_model(model), inputs)
        merged = ({k: v.clone() for k, v in self.hdpissa_engine.merged_state_dict().items()}
                  if self.hdpissa_engine is not None else None)  # a copy: W changes in place at the next fold
        self.seen.append(({k: inputs[k].clone() for k in self.KEYS}, policy, merged))
        return super()._compute_loss(model, inputs)


def per_token_logps(model, batch) -> torch.Tensor:
    """log p(completion token | everything before it), written out (temperature 1, GRPOConfig's default)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    n = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -n - 1:-1].float()
    return torch.log_softmax(logits, dim=-1).gather(2, batch["completion_ids"][..., None])[..., 0]


@pytest.mark.parametrize("setup", ["hdpissa", "hdpissa_synced", "pissa"])
def test_kl_at_step_2_is_to_the_starting_model_computed_by_hand(tiny_model_dir, tmp_path, setup):
    """With beta > 0, the KL TRL logs at step 2 (after one update) equals k3 = exp(ref − π) − (ref − π) − 1, masked mean
    over the completion tokens, with ref computed here from the model on disk (synced: (1 − α)·start + α·W after step
    1, mixed by hand). A first-step KL of 0 proves nothing: any adapter-free reference gives it, and for HD-PiSSA the
    adapter-disabled model (the current W) would give 0 at every step; for PiSSA the residual W − BA is far off."""
    alpha = 0.5
    args = grpo_config(tmp_path, beta=0.1, sync_ref_model=setup == "hdpissa_synced", ref_model_sync_steps=1,
                       ref_model_mixup_alpha=alpha)
    trainer = RecordingGRPOTrainer(model=tiny_model_dir, reward_funcs=digit_reward, args=args,
                                   train_dataset=demo_prompts(), hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4),
                                   method="pissa" if setup == "pissa" else "hdpissa")
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kls) == 2 and kls[0] == pytest.approx(0.0, abs=1e-7), kls
    batch, policy, merged = trainer.seen[1]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if setup == "hdpissa_synced":
        start = reference.state_dict()
        reference.load_state_dict({k: (1 - alpha) * v + alpha * merged[k] for k, v in start.items()})
    with torch.no_grad():
        ref = per_token_logps(reference, batch)
    mask = batch["completion_mask"].float()
    k3 = torch.exp(ref - policy) - (ref - policy) - 1
    by_hand = ((k3 * mask).sum() / mask.sum()).item()
    assert by_hand > 1e-5, by_hand  # the policy moved: a reference equal to the current policy would log 0
    assert kls[1] == pytest.approx(by_hand, rel=1e-3, abs=1e-8), (kls, by_hand)


def test_reference_of_a_model_object_is_that_object(tiny_model_dir, tmp_path):
    """GRPOTrainer built the reference of a model object by loading config._name_or_path again: a different model
    when the object was changed in memory. Now a frozen copy of the object itself, as HDPiSSADPOTrainer does."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.5)  # changed in memory; the files on disk are not
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = HDPiSSAGRPOTrainer(model=model, reward_funcs=digit_reward, args=grpo_config(tmp_path, beta=0.1),
                                 train_dataset=demo_prompts(), hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4))
    ref = dict(trainer.ref_model.named_parameters())
    for name, value in expected.items():
        assert torch.equal(ref[name], value), name
    assert set(ref) == set(expected) and not any(p.requires_grad for p in ref.values())
    assert all(ref[n].data_ptr() != p.data_ptr() for n, p in trainer.model.named_parameters() if n in ref)


def test_a_pissa_peft_model_keeps_its_base_weights(tiny_model_dir, tmp_path):
    """With beta > 0, GRPOTrainer adds its "ref" adapter to a PeftModel with the "default" config object: for PiSSA
    that ran PiSSA's init again and subtracted a second principal part from the base weights. The policy stays the
    model passed, and "ref" is its starting adapter."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa", target_modules="all-linear"))
    ids = torch.tensor([[3, 17, 42, 99, 7, 250, 11]])
    with torch.no_grad():
        start = model(input_ids=ids).logits
    HDPiSSAGRPOTrainer(model=model, reward_funcs=digit_reward, args=grpo_config(tmp_path, beta=0.1),
                       train_dataset=demo_prompts(), method="pissa")
    assert "ref" in model.peft_config and model.peft_config["default"].init_lora_weights == "pissa"
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, start, rtol=0, atol=1e-5)
        model.set_adapter("ref")
        torch.testing.assert_close(model(input_ids=ids).logits, start, rtol=0, atol=1e-5)
        model.set_adapter("default")


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
