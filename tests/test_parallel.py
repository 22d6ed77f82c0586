"""Parallel set-ups HD-PiSSA cannot train with are refused in one place, before any weight is loaded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from trl import SFTConfig

from hdpissa_trl.parallel import check_parallelism

ARGS = dict(deepspeed=None, deepspeed_plugin=None, fsdp=False, bf16_full_eval=False, fp16_full_eval=False)


def args(**kw):
    return SimpleNamespace(**{**ARGS, **kw})


@pytest.mark.parametrize("kw,env,match", [
    ({"deepspeed": {"zero_optimization": {"stage": 3}}}, None, "cannot train under DeepSpeed"),
    ({}, "ACCELERATE_USE_DEEPSPEED", "cannot train under DeepSpeed"),
    ({"fsdp": True}, None, "cannot train under FSDP"),
    ({}, "ACCELERATE_USE_FSDP", "cannot train under FSDP"),
    ({"bf16_full_eval": True}, None, "cannot train with `bf16_full_eval=True`"),
    ({"fp16_full_eval": True}, None, "cannot train with `fp16_full_eval=True`"),
])
def test_refusals_name_the_setting_and_the_alternative(monkeypatch, kw, env, match):
    if env:
        monkeypatch.setenv(env, "true")
    with pytest.raises(ValueError, match=match) as e:
        check_parallelism(args(**kw))
    msg = str(e.value)
    assert "\n" not in msg
    assert "replicated data parallelism" in msg or "autocast" in msg
    assert "FSDP2" not in msg  # no promise of what is not there


def test_plain_data_parallel_and_single_device_maps_pass(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_parallelism(None)
    check_parallelism(args())
    check_parallelism(args(), SimpleNamespace(hf_device_map={"": "cuda:0"}), world_size=4)
    check_parallelism(args(), SimpleNamespace(hf_device_map={"a": 0, "b": 1}), world_size=1)  # K=1: PiSSA-like
    with pytest.raises(ValueError, match=r"split over devices with `device_map` .*\['0', '1'\].* in 2 processes"):
        check_parallelism(args(), SimpleNamespace(hf_device_map={"a": 0, "b": 1}), world_size=2)


@pytest.mark.parametrize("kw,match", [({"fsdp": "full_shard"}, "cannot train under FSDP"),
                                      ({"bf16_full_eval": True, "bf16": True}, "bf16_full_eval")])
def test_trainer_refuses_before_loading_the_model(tmp_path, kw, match):
    """On CPU transformers would ignore `--fsdp full_shard` silently; the trainer refuses it (and bf16_full_eval)
    before it even looks at the model path, which does not exist here."""
    from datasets import Dataset

    from hdpissa_trl import HDPiSSASFTTrainer

    cfg = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{"bf16": False, **kw})
    with pytest.raises(ValueError, match=match):
        HDPiSSASFTTrainer(model=str(tmp_path / "no-model"), args=cfg,
                          train_dataset=Dataset.from_list([{"text": "hi"}] * 2))
