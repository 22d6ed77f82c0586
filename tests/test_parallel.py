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


# -- GPU-only set-ups, checked where CPU can reach them --------------------------------------------------------------

def gpu_args(tmp_path, n_gpu: int, **kw) -> SFTConfig:
    """Training arguments of a process that sees ``n_gpu`` GPUs without a launcher: transformers' own count
    (``TrainingArguments._n_gpu``, the number ``Trainer`` reads to wrap the model in ``nn.DataParallel``) set to it,
    the one value faked (there is no GPU here)."""
    cfg = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], **kw)
    assert cfg.n_gpu == 0  # set up (CPU)
    cfg._n_gpu = n_gpu
    return cfg


def test_several_gpus_in_one_process_are_refused_with_the_launch_command(tmp_path, monkeypatch):
    """nn.DataParallel (one process, K = 1, one slice for all GPUs) is refused before the model is loaded, with the
    command to use; a model split over the GPUs by a device_map the user chose (model parallelism, K = 1) passes."""
    import trl.trainer.sft_trainer as sft
    from datasets import Dataset

    from hdpissa_trl import HDPiSSASFTTrainer

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    cfg = gpu_args(tmp_path, 2)
    for model in ("org/model", SimpleNamespace(hf_device_map={"": 0}), None):
        with pytest.raises(ValueError, match=r"2 GPUs are visible to this one process.*nn.DataParallel.*"
                                             r"`accelerate launch --num_processes N script.py`"):
            check_parallelism(cfg, model)
    check_parallelism(cfg, SimpleNamespace(hf_device_map={"a": 0, "b": 1}))
    check_parallelism(gpu_args(tmp_path, 2, model_init_kwargs={"device_map": "auto"}), "org/model")
    check_parallelism(gpu_args(tmp_path, 1), "org/model")
    monkeypatch.setattr(sft, "create_model_from_path", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="accelerate launch --num_processes N"):
        HDPiSSASFTTrainer(model="org/model", args=cfg, train_dataset=Dataset.from_list([{"text": "hi"}] * 2))


def test_a_model_on_the_cpu_under_nccl_is_refused():
    """NCCL moves GPU tensors only: a model left on the CPU is refused before the first collective (the broadcast of
    the initial slices); gloo, or no process group, takes it."""
    from hdpissa_trl.testing_utils import build_tiny_model
    from hdpissa_trl.trainer.parallel import check_model_on_device

    model = build_tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match=r"model is on the CPU \(\d+ weight tensors, e.g. 'model.embed_tokens.weight'\)"
                                         r" but the processes talk over NCCL.*use_cpu=True"):
        check_model_on_device(model, "nccl")
    check_model_on_device(model, "gloo")
    check_model_on_device(model, None)
    check_model_on_device(model.to("meta"), "nccl")


def test_fsdp_loads_a_model_name_whole_in_every_process(tmp_path, monkeypatch):
    """Under FSDP, TRL would load a model name with device_map="auto" on a GPU machine (it passes None only for
    MULTI_GPU and DeepSpeed), spreading every process's copy over all the GPUs; the trainer asks for device_map=None,
    so accelerate's FSDP2 preparation gets the whole model and moves each rank's rows to its GPU. A device_map the
    user set is kept."""
    import trl.trainer.sft_trainer as sft
    from datasets import Dataset

    from hdpissa_trl import HDPiSSASFTTrainer

    class Loaded(Exception):
        pass

    seen = []

    def create_model_from_path(model_id, **kwargs):
        seen.append(kwargs)
        raise Loaded

    monkeypatch.setattr(sft, "create_model_from_path", create_model_from_path)
    data = Dataset.from_list([{"text": "hi"}] * 2)
    for kw, expected in (({}, None), ({"model_init_kwargs": {"device_map": "cuda:0"}}, "cuda:0")):
        cfg = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], fsdp="full_shard",
                        fsdp_config={"version": 2}, **kw)
        with pytest.raises(Loaded):
            HDPiSSASFTTrainer(model="org/model", args=cfg, train_dataset=data)
        assert "device_map" in seen[-1] and seen[-1]["device_map"] == expected
    cfg = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[])  # no FSDP: TRL decides
    with pytest.raises(Loaded):
        HDPiSSASFTTrainer(model="org/model", args=cfg, train_dataset=data)
    assert "device_map" not in seen[-1]
