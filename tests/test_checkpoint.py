"""hdpissa_trl/checkpoint.py alone: writing, publishing and reading a checkpoint of an engine (single process).

The trainer-level behaviour (atomic saves under `accelerate launch`, SIGKILL + resume, corrupt files) is tested in
test_reliability*.py and test_trainer.py; here each function is checked against what it must produce.
"""

from __future__ import annotations

import json

import pytest
import torch

from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
from hdpissa_trl.checkpoint import (
    COMPLETE_MARKER,
    HDPISSA_STATE_NAME,
    load_hdpissa_checkpoint,
    load_optimizer_state,
    mark_complete,
    publish,
    remove_stale_temp_checkpoints,
    save_engine_state,
    save_optimizer_state,
)
from hdpissa_trl.testing_utils import build_tiny_model


def make_engine(model_seed: int = 0, **config):
    model = build_tiny_model("llama", seed=model_seed, num_layers=1)
    return inject_hdpissa(model, HDPiSSAConfig(**{"r": 2, **config}), 0, 1, show_progress=False)


def train(engine, steps: int = 2) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(engine.adapter_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 500, (2, 12), generator=g)
        engine.model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        engine.fold()
    return opt


def write_checkpoint(engine, ckpt, **save_pretrained_kwargs) -> None:
    """What the trainer writes: plain weights (save_pretrained), the engine state, the marker last."""
    engine.model.save_pretrained(ckpt, state_dict=engine.merged_state_dict(), **save_pretrained_kwargs)
    save_engine_state(engine, str(ckpt))
    mark_complete(str(ckpt), {"global_step": engine.step})


def plain_state(engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.merged_state_dict().items()}


@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_load_restores_w_factors_and_step_exactly(tmp_path, shard_size):
    """A trained engine's checkpoint loaded into an engine built from ANOTHER random model (other W, other SVD):
    afterwards every plain tensor, every initial factor and the fold counter are the checkpoint's, bit for bit.
    With a small max_shard_size save_pretrained writes an index and several shards, read one shard at a time."""
    src = make_engine(model_seed=0)
    train(src)
    ckpt = tmp_path / "checkpoint-2"
    write_checkpoint(src, ckpt, **({"max_shard_size": shard_size} if shard_size else {}))
    shards = sorted(p.name for p in ckpt.glob("model*.safetensors"))
    if shard_size:
        assert len(shards) > 2 and (ckpt / "model.safetensors.index.json").exists(), shards
    else:
        assert shards == ["model.safetensors"]

    dst = make_engine(model_seed=1)
    before = plain_state(dst)
    expect = plain_state(src)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], expect["model.layers.0.mlp.up_proj.weight"])
    load_hdpissa_checkpoint(dst, str(ckpt))
    got = plain_state(dst)
    assert got.keys() == expect.keys()
    assert all(torch.equal(got[k], expect[k]) for k in expect)
    for a, b in zip(src.layers, dst.layers):
        assert torch.equal(a.A0_all, b.A0_all) and torch.equal(a.B0_all, b.B0_all)
        assert torch.equal(b.lora_A, b.A0) and torch.equal(b.lora_B, b.B0)  # adapters at this device's slice
    assert dst.step == src.step == 2


def test_missing_shard_and_incomplete_checkpoint_are_named(tmp_path):
    src = make_engine()
    ckpt = tmp_path / "checkpoint-1"
    write_checkpoint(src, ckpt, max_shard_size="20KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (ckpt / victim).unlink()
    with pytest.raises(FileNotFoundError, match=f"Cannot resume: .*{victim} is missing"):
        load_hdpissa_checkpoint(make_engine(model_seed=1), str(ckpt))
    (ckpt / COMPLETE_MARKER).unlink()
    with pytest.raises(ValueError, match=r"is incomplete \(no CHECKPOINT_COMPLETE\)"):
        load_hdpissa_checkpoint(make_engine(model_seed=1), str(ckpt))


def test_publish_replaces_and_cleans_and_stale_temps_go(tmp_path):
    run = tmp_path / "run"
    tmp = run / ".tmp-checkpoint-4" / "checkpoint-4"
    tmp.mkdir(parents=True)
    (tmp / "new.txt").write_text("new")
    (run / "checkpoint-4").mkdir()
    (run / "checkpoint-4" / "old.txt").write_text("old")
    mark_complete(str(tmp), {"global_step": 4})
    assert json.loads((tmp / COMPLETE_MARKER).read_text())["global_step"] == 4
    publish(str(tmp), str(run / "checkpoint-4"))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4"]
    assert sorted(p.name for p in (run / "checkpoint-4").iterdir()) == [COMPLETE_MARKER, "new.txt"]
    for stale in (".tmp-checkpoint-6", ".tmp-checkpoint-99"):
        (run / stale / stale[5:]).mkdir(parents=True)
    (run / ".tmp-other").mkdir()  # not ours: left alone
    remove_stale_temp_checkpoints(str(run))
    assert sorted(p.name for p in run.iterdir()) == [".tmp-other", "checkpoint-4"]


def test_optimizer_state_roundtrip_is_per_rank(tmp_path):
    engine = make_engine()
    opt = train(engine)
    save_optimizer_state(opt, str(tmp_path), rank=3)
    assert (tmp_path / "optimizer_rank3.pt").exists()
    fresh = torch.optim.AdamW(make_engine(model_seed=1).adapter_parameters(), lr=1e-2)
    load_optimizer_state(fresh, str(tmp_path), rank=3)
    a, b = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
    with pytest.raises(FileNotFoundError, match="optimizer_rank0.pt is missing .every device's optimizer state"):
        load_optimizer_state(fresh, str(tmp_path), rank=0)


def test_engine_state_file_holds_the_whole_config(tmp_path):
    from safetensors import safe_open

    engine = make_engine(lora_alpha=8, lora_dropout=0.1, seed=5)
    save_engine_state(engine, str(tmp_path))
    with safe_open(tmp_path / HDPISSA_STATE_NAME, "pt") as f:
        saved = json.loads(f.metadata()["config"])
    assert saved == engine.config.to_dict()
