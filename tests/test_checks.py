"""The trainers' refusals (hdpissa_trl/trainer/checks.py), each before the work it would waste: an optimizer built
before the trainer created what it trains (every trainer), DPO / GRPO's adapted output head and W sharded by rows
before TRL loads a reference or precomputes anything, and TRL private hooks missing from the installed TRL."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments
from workers.rl_worker import CausalLMTrainer
from workers.trainer_worker import make_dataset

from hdpissa_trl import HDPiSSAConfig, HDPiSSADPOTrainer, HDPiSSAGRPOTrainer, HDPiSSASFTTrainer
from hdpissa_trl.rewards import digit_reward
from hdpissa_trl.testing_utils import save_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.fixture(scope="module")
def config_only_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's config and tokenizer without its weights: loading the model from here fails (OSError), so a
    refusal raised from here provably came before any model was loaded."""
    out = tmp_path_factory.mktemp("no_weights")
    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_model_dir, name), out / name)
    return str(out)


def rows(kind: str, n: int) -> Dataset:
    with open(os.path.join(REPO, f"recipes/demo/data_rl/{kind}_train.jsonl")) as f:
        return Dataset.from_list([json.loads(line) for line, _ in zip(f, range(n))])


def common(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, max_steps=2, learning_rate=1e-2,
                per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to=[], seed=2)


def build(kind: str, model, tmp_path, hdpissa_config=None, **kwargs):
    """One trainer of each kind on the demo data (the model as a path or an object)."""
    hdpissa_config = hdpissa_config or HDPiSSAConfig(r=2, lora_alpha=4)
    if kind == "sft":
        from trl import SFTConfig

        return HDPiSSASFTTrainer(model=model, args=SFTConfig(**common(tmp_path), max_length=32),
                                 train_dataset=make_dataset(16), hdpissa_config=hdpissa_config, **kwargs)
    if kind == "dpo":
        from trl import DPOConfig

        args = DPOConfig(**common(tmp_path), max_length=64, gradient_checkpointing=False,
                         precompute_ref_log_probs=kwargs.pop("precompute", True))
        return HDPiSSADPOTrainer(model=model, args=args, train_dataset=rows("preference", 8),
                                 hdpissa_config=hdpissa_config, **kwargs)
    if kind == "grpo":
        from trl import GRPOConfig

        args = GRPOConfig(**common(tmp_path), num_generations=4, max_completion_length=4, gradient_checkpointing=False,
                          beta=0.1)
        return HDPiSSAGRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=rows("prompts", 8),
                                  hdpissa_config=hdpissa_config, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model if isinstance(model, str) else model.config._name_or_path)
    data = make_dataset(16, "text").map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    model = AutoModelForCausalLM.from_pretrained(model) if isinstance(model, str) else model
    return CausalLMTrainer(model=model, args=TrainingArguments(**common(tmp_path)), train_dataset=data,
                           data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                           processing_class=tokenizer, hdpissa_config=hdpissa_config, **kwargs)


# ------------------------------------------------------------------------------------------------- optimizers ---
@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo", "plain"])
def test_optimizer_built_before_the_trainer_is_refused_by_every_trainer(tiny_model_dir, config_only_dir, tmp_path,
                                                                        kind):
    """optimizers=(SGD(model.parameters()), None) holds W, which HD-PiSSA freezes, and none of the adapters it creates
    later: the run trained nothing (3 folds, W bit-identical, no warning). Refused before anything is loaded (with a
    path) or wrapped (with the model object), naming what works for that trainer."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for source in ((model,) if kind == "plain" else (model, config_only_dir)):
        with pytest.raises(ValueError, match=r"optimizers=\(optimizer, scheduler\) cannot be used here") as e:
            build(kind, source, tmp_path, optimizers=(optimizer, None))
        assert "trainer.hdpissa_engine.adapter_parameters()" in str(e.value)
        assert ("optimizer_cls_and_kwargs" in str(e.value)) == (kind in ("sft", "plain"))  # DPO/GRPO do not take it
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ValueError, match="the lora adapter is created inside the trainer"):
        build(kind, model, tmp_path, optimizers=(None, scheduler), method="lora")


def adapted_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: layer.base_layer.weight.detach().clone()
            for n, layer in zip(trainer.hdpissa_engine.names, trainer.hdpissa_engine.layers)}


def test_an_optimizer_set_after_the_trainer_trains_and_a_wrong_one_is_refused(tiny_model_dir, tmp_path):
    """What the refusal points to works: an optimizer built on trainer.hdpissa_engine.adapter_parameters() after
    construction trains (W moves at every fold); one that misses the adapters, or a scheduler of another optimizer, is
    refused when training starts. optimizer_cls_and_kwargs builds the chosen class on the adapters."""
    trainer = build("plain", tiny_model_dir, tmp_path)
    trainer.optimizer = torch.optim.SGD(trainer.hdpissa_engine.adapter_parameters(), lr=0.5)
    start = adapted_weights(trainer)
    trainer.train()
    assert trainer.hdpissa_engine.step == 2
    assert all(not torch.equal(w, start[n]) for n, w in adapted_weights(trainer).items())

    wrong = build("plain", tiny_model_dir, tmp_path)
    wrong.optimizer = torch.optim.SGD(wrong.hdpissa_engine.adapter_parameters()[:-1], lr=0.5)
    with pytest.raises(ValueError, match="trainer.optimizer does not hold 1 of the .* parameters this run trains"):
        wrong.train()
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    wrong.optimizer = torch.optim.SGD(wrong.hdpissa_engine.adapter_parameters(), lr=0.5)
    wrong.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(other, lambda step: 1.0)
    with pytest.raises(ValueError, match="trainer.lr_scheduler drives another optimizer"):
        wrong.train()

    chosen = build("sft", tiny_model_dir, tmp_path, optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.5}))
    start = adapted_weights(chosen)
    chosen.train()
    assert isinstance(chosen.optimizer.optimizer if hasattr(chosen.optimizer, "optimizer") else chosen.optimizer,
                      torch.optim.SGD)
    assert all(not torch.equal(w, start[n]) for n, w in adapted_weights(chosen).items())


def test_full_fine_tuning_keeps_a_users_optimizer_of_the_model(tiny_model_dir, tmp_path):
    """Full fine-tuning of a model object trains that object's parameters: an optimizer built on them is accepted."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    start = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    trainer = build("plain", model, tmp_path, method="full",
                    optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None))
    trainer.train()
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, start)


# --------------------------------------------------------------------------------- refusals before any work ---
@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_dpo_and_grpo_refuse_the_output_head_and_sharded_w_before_loading_anything(config_only_dir, tmp_path,
                                                                                    monkeypatch, kind):
    """TRL builds the reference and precomputes every log-probability inside its __init__ (12 minutes in the SmolLM2
    DPO recipe) before the adapters are injected: the refusals now come first. From a directory without weights, a
    refusal that came after any loading would be an OSError instead."""
    name = "DPOTrainer" if kind == "dpo" else "GRPOTrainer"
    with pytest.raises(ValueError, match=f"output head 'lm_head' is not supported with {name}"):
        build(kind, config_only_dir, tmp_path, hdpissa_config=HDPiSSAConfig(r=2, target_modules=["q_proj", "lm_head"]))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match=f"HD-PiSSA with {name} supports replicated W only"):
        build(kind, config_only_dir, tmp_path)


def test_sft_refuses_an_adapted_output_head(tiny_model_dir, tmp_path):
    """SFTTrainer reads lm_head.weight directly (fused LM head): an adapter there would never be trained."""
    with pytest.raises(ValueError, match="output head 'lm_head' is not supported with SFTTrainer"):
        build("sft", tiny_model_dir, tmp_path, hdpissa_config=HDPiSSAConfig(r=2, target_modules=["q_proj", "lm_head"]))


def test_missing_trl_hooks_fail_at_construction_naming_the_trl_version(tiny_model_dir, tmp_path, monkeypatch):
    """If TRL renamed a private method the trainers override or patch, the override would silently never run (a PiSSA
    reference without its "ref" adapter; vLLM sent PEFT's names): fail at construction, naming the installed TRL."""
    import trl
    import trl.trainer.grpo_trainer as trl_grpo
    from trl import DPOTrainer, SFTTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    monkeypatch.delattr(SFTTrainer, "_prepare_dataset")
    with pytest.raises(RuntimeError, match=rf"SFTTrainer._prepare_dataset, which the installed TRL {trl.__version__}"):
        build("sft", tiny_model_dir, tmp_path)
    monkeypatch.delattr(DPOTrainer, "_precompute_ref_logps")
    with pytest.raises(RuntimeError, match=rf"DPOTrainer._precompute_ref_logps, which the installed TRL "
                                           rf"{trl.__version__} does not have"):
        build("dpo", tiny_model_dir, tmp_path)
    monkeypatch.delattr(trl_grpo, "create_model_from_path")
    with pytest.raises(RuntimeError, match=rf"create_model_from_path, which the installed TRL {trl.__version__}"):
        build("grpo", tiny_model_dir, tmp_path)
    monkeypatch.undo()
    monkeypatch.delattr(VLLMGeneration, "_iter_named_params")
    from trl import GRPOConfig

    args = GRPOConfig(**common(tmp_path), num_generations=4, max_completion_length=4, use_vllm=True)
    with pytest.raises(RuntimeError, match=r"VLLMGeneration._iter_named_params, which the installed TRL"):
        HDPiSSAGRPOTrainer(model=tiny_model_dir, reward_funcs=digit_reward, args=args, train_dataset=rows("prompts", 8))
