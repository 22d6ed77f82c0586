"""Bad input fails in one clear line before any work is lost (single process, tiny offline model).

Covered elsewhere, not repeated here (see ``docs/reliability.md``): unknown target modules, unsupported layer types,
K·r too large (``test_model.py``); non-positive r / alpha and other config values (``test_config.py``); missing columns,
empty files in a mixture (``test_data.py``); unknown method (``test_trainer.py``, ``test_recipe.py``); malformed YAML and
unknown YAML keys (``test_recipe.py``); resuming the engine with another K, r or layer set (``test_model.py``).
This file adds the trainer-level paths: what a user of ``HDPiSSASFTTrainer`` hits.
"""

from __future__ import annotations

import re
import shutil
import warnings

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import TrainerCallback
from trl import SFTConfig
from workers.trainer_worker import make_dataset

from hdpissa_trl import HDPiSSAConfig, HDPiSSASFTTrainer, inject_hdpissa
from hdpissa_trl.testing_utils import build_tiny_model, save_tiny_model
from hdpissa_trl.trainer.checkpoint import COMPLETE_MARKER, HDPISSA_STATE_NAME
from hdpissa_trl.trainer.data_checks import DataError


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def make_trainer(model: str, out, r: int = 2, save_steps: int = 0, dataset=None, max_steps: int = 2,
                 strict_rank: bool = False, **cfg_kwargs) -> HDPiSSASFTTrainer:
    cfg = SFTConfig(output_dir=str(out), use_cpu=True, bf16=False, max_steps=max_steps, learning_rate=1e-2,
                    logging_steps=1,
                    save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to=[],
                    per_device_train_batch_size=4, **{"max_length": 32, **cfg_kwargs})
    return HDPiSSASFTTrainer(model=model, args=cfg, train_dataset=make_dataset(16) if dataset is None else dataset,
                             hdpissa_config=HDPiSSAConfig(r=r, lora_alpha=4, strict_rank=strict_rank))


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


# -- adapter shape -----------------------------------------------------------------------------------------------

def test_r_too_large_for_a_layer_with_strict_rank_fails_at_construction(tiny_model_dir, tmp_path):
    """K=1, r=40 > min(out, in)=32 of k_proj with strict_rank: refused when the trainer is built, before any step
    (without strict_rank that layer gets r=32, see test_model.py)."""
    with pytest.raises(ValueError) as e:
        make_trainer(tiny_model_dir, tmp_path, r=40, strict_rank=True)
    assert one_line(e).startswith("K·r = 1·40 = 40 exceeds min(out, in) = 32 of layer 'model.layers.0.self_attn.k_proj'")
    assert "largest per-device r that fits this layer with K=1 is 32" in str(e.value)


# -- precision mode vs the weights' dtype --------------------------------------------------------------------------

def test_bf16_sr_on_fp16_weights_is_refused_before_anything_changes():
    model = build_tiny_model("llama", num_layers=1).to(torch.float16)
    with pytest.raises(ValueError) as e:
        inject_hdpissa(model, HDPiSSAConfig(r=2, precision="bf16_sr"), 0, 1, show_progress=False)
    assert one_line(e).startswith("precision='bf16_sr' cannot update layer 'model.layers.0.self_attn.q_proj': its "
                                  "weight is torch.float16")
    assert not any("lora_A" in n for n, _ in model.named_parameters())  # the model is untouched


@pytest.mark.parametrize("mode", ["bf16_sr", "bf16_kahan"])
def test_bf16_modes_on_fp32_weights_warn_that_they_do_nothing(mode):
    with pytest.warns(UserWarning, match=f"precision='{mode}' has no effect: the adapted weights are float32"):
        inject_hdpissa(build_tiny_model("llama", num_layers=1), HDPiSSAConfig(r=2, precision=mode), 0, 1,
                       show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same mode on bf16 weights: no warning, it is what the mode is for
        inject_hdpissa(build_tiny_model("llama", num_layers=1).to(torch.bfloat16), HDPiSSAConfig(r=2, precision=mode),
                       0, 1, show_progress=False)


# -- datasets ------------------------------------------------------------------------------------------------------

def test_empty_dataset_is_refused_before_the_model_loads(tmp_path):
    # A model path that does not exist: the dataset check must come first, so the error is about the data.
    with pytest.raises(DataError) as e:
        make_trainer(str(tmp_path / "no-model"), tmp_path, dataset=Dataset.from_dict({"prompt": [], "completion": []}))
    assert one_line(e) == "The train dataset is empty (0 rows): nothing to train on. Check its split and filters."


def test_dataset_without_sft_columns_names_its_columns(tmp_path):
    ds = Dataset.from_list([{"question": "q", "answer": "a"}] * 4)
    with pytest.raises(DataError) as e:
        make_trainer(str(tmp_path / "no-model"), tmp_path, dataset=ds)
    assert one_line(e).startswith("The train dataset has columns ['question', 'answer']; SFT needs 'prompt'+"
                                  "'completion', 'messages', 'conversations' (ShareGPT from/value) or 'text'")


def test_all_examples_truncated_away_is_a_clear_error(tiny_model_dir, tmp_path):
    """Prompts longer than max_length: TRL drops every example whose completion was cut away, silently; when that is
    every example, say so (instead of `num_samples=0` at train time). keep_end keeps the completions: no error."""
    ds = Dataset.from_list([{"prompt": "reverse " * 40, "completion": " 4321"}] * 8)
    with pytest.raises(DataError) as e:
        make_trainer(tiny_model_dir, tmp_path, dataset=ds, max_length=16)
    assert one_line(e).startswith("All 8 examples of the train dataset have no completion token left after "
                                  "truncation to max_length=16")
    trainer = make_trainer(tiny_model_dir, tmp_path, dataset=ds, max_length=16, truncation_mode="keep_end")
    assert len(trainer.train_dataset) == 8


# -- resuming from a checkpoint that does not fit -----------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    """A complete single-process checkpoint (K=1, r=2) after 2 steps."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    make_trainer(tiny_model_dir, out, save_steps=2).train()
    ckpt = out / "checkpoint-2"
    assert (ckpt / COMPLETE_MARKER).exists()
    return ckpt


def resumable(model: str, tmp_path, r: int = 2) -> tuple[HDPiSSASFTTrainer, list[int]]:
    """A trainer set to run 4 steps, and the list of steps it starts (a checkpoint at step 2 leaves 2 to run)."""
    trainer = make_trainer(model, tmp_path / "resumed", r=r, max_steps=4)
    steps: list[int] = []
    trainer.add_callback(type("CountSteps", (TrainerCallback,), {
        "on_step_begin": lambda self, args, state, control, **kw: steps.append(state.global_step)})())
    return trainer, steps


def test_intact_checkpoint_resumes(tiny_model_dir, checkpoint, tmp_path):
    """The control for the refusals below: the same checkpoint, undamaged, resumes and runs steps 3 and 4."""
    trainer, steps = resumable(tiny_model_dir, tmp_path)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert steps == [2, 3] and trainer.hdpissa_engine.step == 4


def resume_error(model: str, ckpt, tmp_path, r: int = 2) -> str:
    trainer, steps = resumable(model, tmp_path, r)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert steps == []  # refused before any step
    return one_line(e)


def copy_of(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / ckpt.name)


def test_resume_with_different_r_or_k(tiny_model_dir, checkpoint, tmp_path):
    assert resume_error(tiny_model_dir, checkpoint, tmp_path, r=3) == (
        "Cannot resume: the checkpoint was made with a different per-device rank r (checkpoint: 2, now: 3).")
    ckpt = copy_of(checkpoint, tmp_path)
    path = ckpt / HDPISSA_STATE_NAME
    with safe_open(path, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    save_file(tensors, path, metadata={**meta, "world_size": "2"})  # as if written by a 2-device run
    assert resume_error(tiny_model_dir, ckpt, tmp_path) == (
        "Cannot resume: the checkpoint was made with a different number of devices K (checkpoint: 2, now: 1).")


def test_resume_checkpoint_of_another_model(checkpoint, tmp_path):
    other = save_tiny_model(tmp_path / "other", arch="llama", intermediate_size=96)  # same layer names, other shapes
    msg = resume_error(other, checkpoint, tmp_path)
    assert msg == ("Cannot resume: model.layers.0.mlp.gate_proj.B0_all has shape (128, 2) in the checkpoint but "
                   "(96, 2) in this model (another model?).")
    deeper = save_tiny_model(tmp_path / "deeper", arch="llama", num_layers=3)
    assert "different set of adapted layers (another model or target_modules?) (checkpoint: 14 layers, now: 21" in (
        resume_error(deeper, checkpoint, tmp_path))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(b"\x00\x01not a safetensors file" * 10)


CORRUPTIONS = {
    "truncated_model_safetensors": ("model.safetensors", _truncate, r"model.safetensors is corrupt or truncated"),
    "garbage_hdpissa_state": (HDPISSA_STATE_NAME, _garbage, r"hdpissa_state.safetensors is corrupt or truncated"),
    "missing_hdpissa_state": (HDPISSA_STATE_NAME, lambda p: p.unlink(),
                              r"hdpissa_state.safetensors is missing \(not an HD-PiSSA checkpoint\?\)"),
    "truncated_optimizer_state": ("optimizer_rank0.pt", _truncate, r"optimizer_rank0.pt is corrupt or truncated"),
    "missing_marker": (COMPLETE_MARKER, lambda p: p.unlink(), r"is incomplete \(no CHECKPOINT_COMPLETE\)"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_or_incomplete_checkpoint_is_refused(tiny_model_dir, checkpoint, tmp_path, case):
    name, damage, match = CORRUPTIONS[case]
    ckpt = copy_of(checkpoint, tmp_path)
    damage(ckpt / name)
    msg = resume_error(tiny_model_dir, ckpt, tmp_path)
    assert msg.startswith("Cannot resume: ") or msg.startswith(f"Checkpoint {ckpt}"), msg
    assert re.search(match, msg), msg
