"""Injection, target matching, errors, update rank, merge to a plain model, engine checkpoint state."""

import re
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


def test_k_times_r_too_large_fits_rank_per_layer_with_one_warning(tok, caplog):
    """hidden 64, k/v out 32: with K=4, r=10 the k/v projections get the largest r with K·r <= 32 (8), every other
    layer r=10; their scale follows PEFT (lora_alpha / r of the layer). One warning names the fitted layers."""
    m = build_tiny_model("llama", tokenizer=tok)
    with caplog.at_level("WARNING", logger="hdpissa_trl.engine.model"):
        e = inject_hdpissa(m, HDPiSSAConfig(r=10, lora_alpha=20), rank=0, world_size=4, show_progress=False)
    ranks = {n: lyr.r for n, lyr in zip(e.names, e.layers)}
    assert ranks == {n: 8 if n.endswith(("k_proj", "v_proj")) else 10 for n in e.names}
    assert all(lyr.A0_all.shape == (4 * lyr.r, lyr.in_features) for lyr in e.layers)
    assert {lyr.scale for lyr in e.layers if lyr.r == 8} == {2.5} and {lyr.scale for lyr in e.layers if lyr.r == 10} == {2.0}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "r=10 with K=4 does not fit" in warnings[0] and "k_proj ×2 r=8" in warnings[0]
    assert "v_proj ×2 r=8" in warnings[0] and "strict_rank=True" in warnings[0]
    # A layer with min(out, in) < K can hold no slice: it gets no adapter (named), the others still do.
    caplog.clear()
    with caplog.at_level("WARNING", logger="hdpissa_trl.engine.model"):
        e = inject_hdpissa(build_tiny_model("llama", tokenizer=tok), HDPiSSAConfig(r=1), rank=0, world_size=40,
                           show_progress=False)
    assert not any(n.endswith(("k_proj", "v_proj")) for n in e.names) and len(e.names) == 10
    assert "no adapter (min(out, in) < K): model.layers.0.self_attn.k_proj" in caplog.records[0].getMessage()


def test_strict_rank_refuses_and_names_layer_and_largest_r(tok):
    m = build_tiny_model("llama", tokenizer=tok)  # hidden 64, k/v out = 32
    with pytest.raises(ValueError, match=r"K·r = 4·10 = 40 exceeds min\(out, in\) = 32 of layer "
                                         r"'model.layers.0.self_attn.k_proj'.*largest per-device r .* is 8"):
        inject_hdpissa(m, HDPiSSAConfig(r=10, strict_rank=True), rank=0, world_size=4)
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
    """load_state_dict restores what the checkpoint holds: the receiving engine starts from ANOTHER random model
    (other W, other SVD, bf16 W with a Kahan compensation), so every equality below is the load's doing."""
    model = build_tiny_model("llama", tokenizer=tok, num_layers=1).to(torch.bfloat16)
    engine = inject_hdpissa(model, HDPiSSAConfig(r=2, precision="bf16_kahan"), 0, 1, show_progress=False)
    _one_step_update(model, engine)
    state = engine.state_dict()
    other = build_tiny_model("llama", tokenizer=tok, num_layers=1, seed=1).to(torch.bfloat16)
    e2 = inject_hdpissa(other, HDPiSSAConfig(r=2, precision="bf16_kahan"), 0, 1, show_progress=False)
    assert not torch.equal(engine.layers[0].A0_all, e2.layers[0].A0_all) and e2.step == 0
    comp = [u.state()["compensation"] for u in engine.updaters]
    assert any(c.abs().sum() > 0 for c in comp)  # a real compensation state to restore
    e2.load_state_dict(state)
    for a, b, ua, ub in zip(engine.layers, e2.layers, engine.updaters, e2.updaters):
        assert torch.equal(a.A0_all, b.A0_all) and torch.equal(a.B0_all, b.B0_all)
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
        assert torch.equal(ua.state()["compensation"], ub.state()["compensation"])
    assert e2.step == 1
    one = dict(tokenizer=tok, num_layers=1)
    with pytest.raises(ValueError, match="different per-device rank r"):
        inject_hdpissa(build_tiny_model("llama", **one).to(torch.bfloat16), HDPiSSAConfig(r=3, precision="bf16_kahan"),
                       0, 1, show_progress=False).load_state_dict(state)
    with pytest.raises(ValueError, match="different number of devices K"):
        inject_hdpissa(build_tiny_model("llama", **one).to(torch.bfloat16), HDPiSSAConfig(r=2, precision="bf16_kahan"),
                       0, 2, show_progress=False).load_state_dict(state)
    with pytest.raises(ValueError, match="set of adapted layers"):
        inject_hdpissa(build_tiny_model("llama", tokenizer=tok, num_layers=2).to(torch.bfloat16),
                       HDPiSSAConfig(r=2, precision="bf16_kahan"), 0, 1, show_progress=False).load_state_dict(state)


@pytest.mark.parametrize("field,value", [("lora_alpha", 8.0), ("seed", 3), ("lora_dropout", 0.1),
                                         ("init_method", "randomized"), ("strict_rank", True)])
def test_resume_refuses_any_config_difference_naming_the_field(tok, field, value):
    """The whole HDPiSSAConfig is stored with the state; a resume with any field changed (the scale, the seed that
    drives stochastic rounding, dropout, ...) is refused, naming the field and both values."""
    engine = inject_hdpissa(build_tiny_model("llama", tokenizer=tok, num_layers=1), HDPiSSAConfig(r=2), 0, 1,
                            show_progress=False)
    state = engine.state_dict()
    other = inject_hdpissa(build_tiny_model("llama", tokenizer=tok, num_layers=1),
                           HDPiSSAConfig(r=2, **{field: value}), 0, 1, show_progress=False)
    saved = getattr(engine.config, field)
    with pytest.raises(ValueError, match=re.escape(f"made with HDPiSSAConfig.{field}={saved!r}, this run has "
                                                   f"{field}={value!r}")):
        other.load_state_dict(state)


def test_resume_accepts_operational_changes(tok):
    engine = inject_hdpissa(build_tiny_model("llama", tokenizer=tok, num_layers=1), HDPiSSAConfig(r=2), 0, 1,
                            show_progress=False)
    state = engine.state_dict()
    changed = HDPiSSAConfig(r=2, sync_check_steps=7, bucket_size_mb=1.0, on_sync_mismatch="resync", shard_init=False)
    other = inject_hdpissa(build_tiny_model("llama", tokenizer=tok, num_layers=1), changed, 0, 1, show_progress=False)
    other.load_state_dict(state)
    assert other.config.sync_check_steps == 7
