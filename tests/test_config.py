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
