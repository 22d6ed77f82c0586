"""hdpissa_trl/trainer/checkpoint.py alone: writing, publishing and reading a checkpoint of an engine (single process).

The trainer-level behaviour (atomic saves under `accelerate launch`, SIGKILL + resume, corrupt files) is tested in
test_reliability*.py and test_trainer.py; here each function is checked against what it must produce.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from _dist import child_env, free_port

from hdpissa_trl import HDPiSSAConfig, inject_hdpissa
from hdpissa_trl.testing_utils import build_tiny_model
from hdpissa_trl.trainer.checkpoint import (
    COMPLETE_MARKER,
    HDPISSA_STATE_NAME,
    load_hdpissa_checkpoint,
    load_optimizer_state,
    mark_complete,
    publish,
    remove_stale_temp_checkpoints,
    restore_replaced_checkpoints,
    save_engine_state,
    save_optimizer_state,
)


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


CRASH_IN_PUBLISH = """
import os, sys
from hdpissa_trl.trainer.checkpoint import publish
real = os.replace
def replace(src, dst):  # dies at the first rename of the re-save: before it (0) or right after it (1)
    if sys.argv[3] == "1":
        real(src, dst)
    os._exit(9)
os.replace = replace
publish(sys.argv[1], sys.argv[2])
"""


@pytest.mark.parametrize("after_first_rename", [False, True], ids=["before_first_rename", "after_first_rename"])
def test_resave_under_the_same_name_never_leaves_no_checkpoint(tmp_path, after_first_rename):
    """A process killed while it re-publishes checkpoint-4 over an older checkpoint-4 (a resumed run saving that
    step again). Removing the old directory before the rename, a crash in between left none; now the old one is
    renamed aside first, and put back before the next resume or save if the new one never arrived."""
    from transformers.trainer_utils import get_last_checkpoint

    run = tmp_path / "run"
    tmp = run / ".tmp-checkpoint-4" / "checkpoint-4"
    tmp.mkdir(parents=True)
    (tmp / "new.txt").write_text("new")
    mark_complete(str(tmp), {"global_step": 4})
    (run / "checkpoint-4").mkdir()
    (run / "checkpoint-4" / "old.txt").write_text("old")
    mark_complete(str(run / "checkpoint-4"), {"global_step": 4})
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_PUBLISH, str(tmp), str(run / "checkpoint-4"),
                           "1" if after_first_rename else "0"], env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    if after_first_rename:
        assert not (run / "checkpoint-4").exists() and (run / ".old-checkpoint-4" / "old.txt").exists()
    restore_replaced_checkpoints(str(run))  # what every resume and every save does first
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-4")
    assert (run / "checkpoint-4" / "old.txt").read_text() == "old"
    assert (run / "checkpoint-4" / COMPLETE_MARKER).exists() and not (run / ".old-checkpoint-4").exists()


def test_resume_puts_back_a_checkpoint_a_crash_left_aside(tiny_model_dir, tmp_path):
    """What a crash between the two renames leaves (the only checkpoint under .old-checkpoint-2): the trainer's
    resume_from_checkpoint=True finds it again (transformers alone finds no checkpoint at all)."""
    from trl import SFTConfig
    from workers.trainer_worker import make_dataset

    from hdpissa_trl import HDPiSSASFTTrainer

    out = tmp_path / "out"

    def trainer(max_steps: int):
        cfg = SFTConfig(output_dir=str(out), use_cpu=True, bf16=False, max_steps=max_steps, save_steps=2,
                        report_to=[], per_device_train_batch_size=4, max_length=32, logging_steps=1)
        return HDPiSSASFTTrainer(model=tiny_model_dir, args=cfg, train_dataset=make_dataset(16),
                                 hdpissa_config=HDPiSSAConfig(r=2))

    trainer(2).train()
    os.replace(out / "checkpoint-2", out / ".old-checkpoint-2")
    resumed = trainer(3)
    resumed.train(resume_from_checkpoint=True)  # transformers alone: "No valid checkpoint found"
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3]  # steps 1-2 from checkpoint
    assert (out / "checkpoint-2" / COMPLETE_MARKER).exists() and not (out / ".old-checkpoint-2").exists()


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


# -- several nodes: save_on_each_node ------------------------------------------------------------------------------

WORKER = os.path.join(os.path.dirname(__file__), "workers", "trainer_worker.py")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_two_nodes(model: str, node_dirs: list, rec, *args: str, timeout: float = 400,
                     fsdp2: bool = False) -> list[tuple[int, str]]:
    """One process on each of two "nodes" (two `accelerate launch --num_machines 2` on this machine). Each node runs
    in its own working directory and the worker's output_dir is RELATIVE, so each node sees its own disk: a
    filesystem the nodes do not share. ``fsdp2``: W sharded by rows (recipes/accelerate_configs/cpu_fsdp2.yaml)."""
    port = str(free_port())
    procs = []
    mode = (["--config_file", os.path.join(ROOT, "recipes", "accelerate_configs", "cpu_fsdp2.yaml")] if fsdp2
            else ["--multi_gpu"])
    for node, cwd in enumerate(node_dirs):
        os.makedirs(cwd, exist_ok=True)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_machines", "2",
               "--machine_rank", str(node), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no", WORKER,
               "--model", model, "--output_dir", "out", "--record_dir", str(rec), "--lr", "1e-2", *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            pytest.fail("the two-node launch hung")
        results.append((p.returncode, out))
    return results


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from hdpissa_trl.testing_utils import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.mark.slow
def test_save_on_each_node_gives_every_node_a_complete_checkpoint_that_resumes(tiny_model_dir, tmp_path):
    """2 nodes, no shared filesystem, save_on_each_node=True: each node publishes its own complete checkpoint (its
    rank's optimizer state included) and both resume from their own copy, ending with the uninterrupted run's W."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    common = ["--save_on_each_node", "--max_steps", "4", "--save_steps", "2"]
    results = launch_two_nodes(tiny_model_dir, nodes, tmp_path / "rec", *common)
    assert [code for code, _ in results] == [0, 0], [out[-3000:] for _, out in results]
    straight = [torch.load(tmp_path / "rec" / f"rank{k}.pt", weights_only=False)["W"] for k in range(2)]
    for k, node in enumerate(nodes):
        ckpt = node / "out" / "checkpoint-2"
        assert (ckpt / COMPLETE_MARKER).exists() and (ckpt / HDPISSA_STATE_NAME).exists()
        assert sorted(p.name for p in ckpt.glob("optimizer_rank*.pt")) == [f"optimizer_rank{k}.pt"]
        assert not list((node / "out").glob(".tmp-*"))
    results = launch_two_nodes(tiny_model_dir, nodes, tmp_path / "rec2", *common, "--resume", "out/checkpoint-2")
    assert [code for code, _ in results] == [0, 0], [out[-3000:] for _, out in results]
    for k in range(2):
        resumed = torch.load(tmp_path / "rec2" / f"rank{k}.pt", weights_only=False)
        assert len(resumed["stepped"]) == 2  # steps 3 and 4 only
        assert all(torch.equal(resumed["W"][n], w) for n, w in straight[k].items())


@pytest.mark.slow
def test_unshared_output_dir_without_save_on_each_node_is_a_clear_error(tiny_model_dir, tmp_path):
    """The same two nodes with save_on_each_node=False: rank 0 alone would publish, on its own disk, a checkpoint
    without node 1's optimizer state, and rotate out the last good one (save_total_limit=1). Now every rank confirms
    it sees what the checkpoint needs first: both nodes stop at the first save saying what is required, nothing is
    marked complete or published, and the older checkpoint stays."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    old = nodes[0] / "out" / "checkpoint-1"  # a good checkpoint of an earlier run: rotation must not remove it
    old.mkdir(parents=True)
    mark_complete(str(old), {"global_step": 1})
    results = launch_two_nodes(tiny_model_dir, nodes, tmp_path / "rec", "--max_steps", "4", "--save_steps", "2",
                               "--save_total_limit", "1", "--ddp_timeout", "60")
    for code, out in results:
        assert code != 0
        assert "Checkpoint" in out and "was not published: rank(s) [1] cannot see the files" in out
        assert "output_dir is not on a filesystem that all nodes share" in out and "Set save_on_each_node=True" in out
    assert (old / COMPLETE_MARKER).exists()
    for node in nodes:
        assert not (node / "out" / "checkpoint-2").exists()
        assert not list((node / "out").rglob(f"*/checkpoint-2/{COMPLETE_MARKER}"))


@pytest.mark.slow
def test_fsdp2_across_machines_refuses_per_node_storage_before_any_work(tiny_model_dir, tmp_path):
    """W sharded by rows (FSDP2) on two machines, each with its own disk. With save_on_each_node=True (storage declared
    per node) both refuse at construction, before the model is sharded or trained. Without it, both stop at the first
    checkpoint, before anything is marked complete or published: rank 0 cannot see rank 1's rows and the reverse.
    (Before: node 0 published a checkpoint without node 1's rows and rotated out the last good one; node 1 kept a
    checkpoint-2 with the completion marker and no .metadata.)"""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    results = launch_two_nodes(tiny_model_dir, nodes, tmp_path / "rec", "--max_steps", "4", "--save_steps", "2",
                               "--save_on_each_node", "--ddp_timeout", "60", fsdp2=True)
    for code, out in results:
        assert code != 0 and "save_on_each_node=True declares storage per machine" in out, out[-3000:]
        assert "HD-PiSSA: K=" not in out  # refused before the adapters (and the sharding) exist
    old = nodes[0] / "out" / "checkpoint-1"
    old.mkdir(parents=True)
    mark_complete(str(old), {"global_step": 1})
    results = launch_two_nodes(tiny_model_dir, nodes, tmp_path / "rec", "--max_steps", "4", "--save_steps", "2",
                               "--save_total_limit", "1", "--ddp_timeout", "60", fsdp2=True)
    for code, out in results:
        assert code != 0 and "W sharded by rows" in out
        assert "was not published: rank(s) [0, 1] cannot see every process's files" in out, out[-3000:]
        assert "output_dir must be on storage that every machine shares" in out
    assert (old / COMPLETE_MARKER).exists()
    for node in nodes:
        assert not (node / "out" / "checkpoint-2").exists()
        assert not list((node / "out").rglob(f"*/checkpoint-2/{COMPLETE_MARKER}"))
