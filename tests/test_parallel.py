"""Parallel set-ups HD-PiSSA cannot train with are refused in one place, before any weight is loaded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from trl import SFTConfig

from hdpissa_trl.trainer.parallel import check_parallelism

ARGS = dict(deepspeed=None, deepspeed_plugin=None, fsdp=False, bf16_full_eval=False, fp16_full_eval=False)


def args(**kw):
    return SimpleNamespace(**{**ARGS, **kw})


@pytest.mark.parametrize("kw,env,match", [
    ({"deepspeed": {"zero_optimization": {"stage": 2}}}, {}, "cannot train under DeepSpeed"),
    ({}, {"ACCELERATE_USE_DEEPSPEED": "true"}, "cannot train under DeepSpeed"),
    ({"fsdp": True, "fsdp_config": {"version": 1}}, {}, "cannot train under FSDP1"),
    ({}, {"ACCELERATE_USE_FSDP": "true"}, "cannot train under FSDP1"),  # accelerate's default FSDP version is 1
    ({"bf16_full_eval": True}, {}, "cannot train with `bf16_full_eval=True`"),
    ({"fp16_full_eval": True}, {}, "cannot train with `fp16_full_eval=True`"),
])
def test_refusals_name_the_setting_and_the_alternative(monkeypatch, kw, env, match):
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=match) as e:
        check_parallelism(args(**kw))
    msg = str(e.value)
    assert "\n" not in msg
    assert "replicated data parallelism" in msg or "autocast" in msg or "fsdp_version: 2" in msg


def test_fsdp2_is_accepted(monkeypatch):
    """FSDP2 shards W by rows (hdpissa_trl.engine.sharded): requested through the training arguments (transformers'
    default version is 2) or an accelerate launch config with fsdp_version 2, it passes the check."""
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(var, raising=False)
    check_parallelism(args(fsdp=True))
    check_parallelism(args(fsdp=True, fsdp_config={"version": 2}))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_parallelism(args())


def test_plain_data_parallel_and_single_device_maps_pass(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_parallelism(None)
    check_parallelism(args())
    check_parallelism(args(), SimpleNamespace(hf_device_map={"": "cuda:0"}), world_size=4)
    check_parallelism(args(), SimpleNamespace(hf_device_map={"a": 0, "b": 1}), world_size=1)  # K=1: PiSSA-like
    with pytest.raises(ValueError, match=r"split over devices with `device_map` .*\['0', '1'\].* in 2 processes"):
        check_parallelism(args(), SimpleNamespace(hf_device_map={"a": 0, "b": 1}), world_size=2)


@pytest.mark.parametrize("kw,match", [({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, "cannot train under FSDP1"),
                                      ({"bf16_full_eval": True, "bf16": True}, "bf16_full_eval")])
def test_trainer_refuses_before_loading_the_model(tmp_path, kw, match):
    """FSDP1 (which transformers would ignore on CPU) and bf16_full_eval are refused before the trainer even looks at
    the model path, which does not exist here."""
    from datasets import Dataset

    from hdpissa_trl import HDPiSSASFTTrainer

    cfg = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{"bf16": False, **kw})
    with pytest.raises(ValueError, match=match):
        HDPiSSASFTTrainer(model=str(tmp_path / "no-model"), args=cfg,
                          train_dataset=Dataset.from_list([{"text": "hi"}] * 2))
