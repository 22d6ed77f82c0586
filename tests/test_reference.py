"""The reference model helpers (hdpissa_trl/trainer/reference.py): the PiSSA reference adapter and the name-matched
mix."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hdpissa_trl.testing_utils import build_tiny_model
from hdpissa_trl.trainer.reference import add_reference_adapter, frozen_copy, mix_into_reference

IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 11]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_pissa_reference_adapter_is_the_starting_model_and_leaves_the_base_alone():
    start = logits(build_tiny_model("llama", seed=1))
    model = get_peft_model(build_tiny_model("llama", seed=1),
                           LoraConfig(r=2, lora_alpha=4, init_lora_weights="pissa", target_modules="all-linear"))
    with model.disable_adapter():
        residual = logits(model)
    assert (residual - start).abs().max() > 1e-2  # what TRL's adapter-disabled reference would be: not the start
    add_reference_adapter(model)
    add_reference_adapter(model)  # idempotent
    torch.testing.assert_close(logits(model), start, rtol=0, atol=1e-5)  # the policy is untouched
    model.set_adapter("ref")
    torch.testing.assert_close(logits(model), start, rtol=0, atol=1e-5)  # base + ref adapter = starting model
    assert model.peft_config["default"].init_lora_weights == "pissa"  # the policy's own config is not changed
    model.set_adapter("default")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(".ref." in n for n in trainable)


def test_mix_into_reference_by_name_and_clear_errors():
    ref = frozen_copy(build_tiny_model("llama", seed=2))
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    policy = {k: v + 1.0 for k, v in build_tiny_model("llama", seed=3).state_dict().items()}
    before = {k: v.clone() for k, v in ref.named_parameters()}
    mix_into_reference(ref, policy, alpha=0.25)
    for name, param in ref.named_parameters():
        torch.testing.assert_close(param, 0.75 * before[name] + 0.25 * policy[name])
    with pytest.raises(ValueError, match="policy has no weight named 'model.embed_tokens.weight'"):
        mix_into_reference(ref, {k.replace("model.", "base_model.model."): v for k, v in policy.items()}, 0.5)
    bad = dict(policy, **{"lm_head.weight": torch.zeros(3, 3)})
    mixed = {k: v.clone() for k, v in ref.named_parameters()}
    with pytest.raises(ValueError, match=r"'lm_head.weight' has shape \(3, 3\) in the policy"):
        mix_into_reference(ref, bad, 0.5)
    assert all(torch.equal(p, mixed[n]) for n, p in ref.named_parameters())  # nothing half-mixed
