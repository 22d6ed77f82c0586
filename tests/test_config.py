import pytest

from hdpissa_trl import HDPiSSAConfig


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -2}, "r must be a positive integer"),
        ({"lora_alpha": 0}, "lora_alpha must be positive"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in"),
        ({"init_method": "qr"}, "init_method must be one of"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"fold_matmul": "bf16"}, r"fold_matmul must be one of \('auto', 'ieee', 'tf32'\)"),
        ({"bucket_size_mb": -1}, "bucket_size_mb must be >= 0"),
        ({"sync_check_steps": -1}, "sync_check_steps must be >= 0"),
        ({"on_sync_mismatch": "ignore"}, "on_sync_mismatch must be one of"),
        ({"target_modules": []}, "target_modules is empty"),
    ],
)
def test_invalid_config_raises_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HDPiSSAConfig(**kwargs)


def test_scale_and_help_text():
    from dataclasses import fields

    cfg = HDPiSSAConfig(r=8, lora_alpha=16)
    assert cfg.scale == 2.0
    assert all(f.metadata.get("help") for f in fields(HDPiSSAConfig))


def test_from_peft_maps_settings_and_refuses_what_has_no_equivalent():
    from peft import LoraConfig

    cfg = HDPiSSAConfig.from_peft(LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                             exclude_modules=["mlp.down_proj"]))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.init_method) == (8, 32, 0.05, "svd")
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.exclude_modules == ["mlp.down_proj"]
    cfg = HDPiSSAConfig.from_peft(LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa_niter_6"),
                                  precision="bf16_sr")
    assert (cfg.target_modules, cfg.init_method, cfg.n_iter, cfg.precision) == ("all-linear", "randomized", 6,
                                                                                 "bf16_sr")
    with pytest.raises(ValueError, match=r"LoraConfig.use_dora=True has no HD-PiSSA equivalent"):
        HDPiSSAConfig.from_peft(LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    with pytest.raises(ValueError, match=r"LoraConfig.rank_pattern=\{'q_proj': 2\} has no HD-PiSSA equivalent"):
        HDPiSSAConfig.from_peft(LoraConfig(r=4, target_modules="all-linear", rank_pattern={"q_proj": 2}))
    with pytest.raises(ValueError, match=r"target_modules is None .*set it explicitly"):
        HDPiSSAConfig.from_peft(LoraConfig(r=4))


def test_to_dict_round_trips():
    cfg = HDPiSSAConfig(r=3, lora_alpha=6, target_modules=["q_proj"], strict_rank=True, seed=9)
    assert HDPiSSAConfig(**cfg.to_dict()) == cfg


def test_fold_matmul_resolves_per_device_and_a_resume_may_change_it():
    """``auto`` is TF32 on CUDA and plain fp32 elsewhere; it changes how the fold's GEMM rounds, not what the run
    computes, so a resume may pick another value (an operational field)."""
    import torch

    from hdpissa_trl.engine.config import OPERATIONAL_FIELDS
    from hdpissa_trl.engine.precision import resolve_fold_matmul

    assert HDPiSSAConfig().fold_matmul == "auto" and "fold_matmul" in OPERATIONAL_FIELDS
    assert resolve_fold_matmul("auto", torch.device("cpu")) == "ieee"
    assert resolve_fold_matmul("auto", torch.device("cuda", 0)) == "tf32"
    assert resolve_fold_matmul("ieee", torch.device("cuda", 0)) == "ieee"
    assert resolve_fold_matmul("tf32", torch.device("cpu")) == "tf32"
