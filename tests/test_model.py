"""Injection, target matching, errors, update rank, merge to a plain model, engine checkpoint state."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
from hdpissa_trl.testing_utils import build_tiny_model, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_forward_equals_base_model(tok):
    base = build_tiny_model("qwen2", tokenizer=tok)
    model = build_tiny_model("qwen2", tokenizer=tok)
    engine = inject_hdpissa(model, HDPiSSAConfig(r=4), rank=1, world_size=2, show_progress=False)
    assert len(engine.layers) == 14
    ids = torch.randint(0, len(tok), (2, 9))
    assert torch.equal(model(ids).logits, base(ids).logits)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_target_matching_by_list_regex_and_errors(tok):
    m = build_tiny_model("llama", tokenizer=tok)
    e = inject_hdpissa(m, HDPiSSAConfig(r=2, target_modules=["q_proj", "v_proj"]), 0, 1, show_progress=False)
    assert e.names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    m = build_tiny_model("llama", tokenizer=tok)
    e = inject_hdpissa(m, HDPiSSAConfig(r=2, target_modules=r".*\.mlp\..*_proj", exclude_modules=["down_proj"]),
                       0, 1, show_progress=False)
    assert e.names == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")]
    with pytest.raises(ValueError, match=r"No module matches target_modules=\['qkv'\].*'q_proj'"):
        inject_hdpissa(build_tiny_model("llama", tokenizer=tok), HDPiSSAConfig(r=2, target_modules=["qkv"]), 0, 1)


def test_unsupported_layer_type(tok):
    gpt2 = build_tiny_model("gpt2", tokenizer=tok)
    with pytest.raises(TypeError, match="supports torch.nn.Linear layers only.*Conv1D"):
        inject_hdpissa(gpt2, HDPiSSAConfig(r=2, target_modules=["c_attn"]), 0, 1)
    # 'all-linear' means what it means in PEFT (linear and Conv1D layers): the Conv1D ones are refused by name.
    with pytest.raises(TypeError, match="target 'transformer.h.0.attn.c_attn' is a Conv1D.*exclude_modules"):
        inject_hdpissa(build_tiny_model("gpt2", tokenizer=tok), HDPiSSAConfig(r=2), 0, 1)


def _peft_adapted_layers(model, config) -> list[str]:
    """The layers PEFT's LoRA baseline of ``config`` adapts (the trainer's own ``build_peft_config``)."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from hdpissa_trl import build_peft_config

    peft_model = get_peft_model(model, build_peft_config("lora", config))
    return [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("targets,exclude", [
    ("all-linear", None),
    ("all-linear", ["down_proj", "model.layers.1.self_attn.q_proj"]),
    (["q_proj", "v_proj", "model.layers.1.mlp.up_proj"], None),
    (r".*\.(k|o)_proj", None),
    (r"model\.layers\.0\..*_proj", ["gate_proj"]),
])
def test_same_layers_as_the_peft_baseline(tok, arch, targets, exclude):
    """HD-PiSSA's targets are PEFT's targets for the same settings, by construction (list, regex, all-linear)."""
    config = HDPiSSAConfig(r=2, target_modules=targets, exclude_modules=exclude)
    engine = inject_hdpissa(build_tiny_model(arch, tokenizer=tok), config, 0, 1, show_progress=False)
    expected = _peft_adapted_layers(build_tiny_model(arch, tokenizer=tok), config)
    assert engine.names == expected and len(expected) >= 2
    assert not any("lm_head" in n or "embed" in n for n in engine.names)


def test_k_times_r_too_large_names_layer_and_largest_r(tok):
    m = build_tiny_model("llama", tokenizer=tok)  # hidden 64, k/v out = 32
    with pytest.raises(ValueError, match=r"K·r = 4·10 = 40 exceeds min\(out, in\) = 32 of layer "
                                         r"'model.layers.0.self_attn.k_proj'.*largest per-device r .* is 8"):
        inject_hdpissa(m, HDPiSSAConfig(r=10), rank=0, world_size=4)
    # Nothing was replaced: the model is still usable as it was.
    assert not any("lora_A" in n for n, _ in m.named_parameters())


def _one_step_update(model, engine):
    W0 = {n: lyr.base_layer.weight.detach().clone() for n, lyr in zip(engine.names, engine.layers)}
    ids = torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(engine.adapter_parameters(), lr=1.0).step()
    engine.fold()
    return {n: lyr.base_layer.weight.detach() - W0[n] for n, lyr in zip(engine.names, engine.layers)}


def test_one_step_update_rank_2r_single_device(tok):
    """K=1 (PiSSA / DP-LoRA with averaged grads): one step moves W in at most 2r directions."""
    model = build_tiny_model("llama", tokenizer=tok)
    engine = inject_hdpissa(model, HDPiSSAConfig(r=3), 0, 1, show_progress=False)
    dW = _one_step_update(model, engine)["model.layers.0.mlp.up_proj"]
    assert torch.linalg.matrix_rank(dW.double(), rtol=1e-6).item() == 6


def test_merged_model_loads_without_hdpissa(tok, tmp_path):
    model = build_tiny_model("llama", tokenizer=tok)
    engine = inject_hdpissa(model, HDPiSSAConfig(r=2), 0, 1, show_progress=False)
    _one_step_update(model, engine)
    ids = torch.randint(0, len(tok), (1, 7))
    with torch.no_grad():
        expect = model(ids).logits
    sd = engine.merged_state_dict()
    assert not any("lora" in k or "A0_all" in k or "base_layer" in k for k in sd)
    model.save_pretrained(tmp_path, state_dict=sd)
    tok.save_pretrained(tmp_path)
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(expect, tmp_path / "expect.pt")
    code = (
        "import sys, torch; sys.modules['hdpissa_trl'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}); e = torch.load({str(tmp_path / 'expect.pt')!r})\n"
        "assert type(m).__name__ == 'LlamaForCausalLM'\n"
        "assert all(type(mod).__name__ != 'HDPiSSALinear' for mod in m.modules())\n"
        "torch.testing.assert_close(m(ids).logits, e, rtol=0, atol=0); print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1",
                         "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
    plain = engine.merge_and_unload()
    assert not any(isinstance(mod, type(engine)) for mod in plain.modules())
    assert all(type(mod) is nn.Linear for n, mod in plain.named_modules() if n.endswith("proj"))


def test_engine_state_roundtrip_and_resume_errors(tok):
    model = build_tiny_model("llama", tokenizer=tok, num_layers=1)
    engine = inject_hdpissa(model, HDPiSSAConfig(r=2), 0, 1, show_progress=False)
    _one_step_update(model, engine)
    state = engine.state_dict()
    other = build_tiny_model("llama", tokenizer=tok, num_layers=1)
    e2 = inject_hdpissa(other, HDPiSSAConfig(r=2), 0, 1, show_progress=False)
    e2.load_state_dict(state)
    for a, b in zip(engine.layers, e2.layers):
        assert torch.equal(a.A0_all, b.A0_all) and torch.equal(a.lora_B, b.lora_B)
    assert e2.step == 1
    with pytest.raises(ValueError, match="different per-device rank r"):
        inject_hdpissa(build_tiny_model("llama", tokenizer=tok, num_layers=1), HDPiSSAConfig(r=3), 0, 1,
                       show_progress=False).load_state_dict(state)
    with pytest.raises(ValueError, match="different number of devices K"):
        inject_hdpissa(build_tiny_model("llama", tokenizer=tok, num_layers=1), HDPiSSAConfig(r=2), 0, 2,
                       show_progress=False).load_state_dict(state)
    with pytest.raises(ValueError, match="set of adapted layers"):
        inject_hdpissa(build_tiny_model("llama", tokenizer=tok, num_layers=2), HDPiSSAConfig(r=2), 0, 1,
                       show_progress=False).load_state_dict(state)
