"""W sharded by rows through accelerate's FSDP2 settings, end to end with the recipe (2 CPU processes, gloo).

`accelerate launch --config_file recipes/accelerate_configs/cpu_fsdp2.yaml --num_processes 2 recipes/sft_multitask.py
--config recipes/demo/config.yaml` must train the same W as the replicated run (cpu.yaml), write sharded checkpoints
(torch.distributed.checkpoint) that resume exactly, and save a plain merged model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _dist import child_env, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join("recipes", "sft_multitask.py")
SHORT = ["--max_steps", "4", "--save_steps", "2", "--save_total_limit", "3", "--logging_steps", "1",
         "--eval_tasks", "", "--per_device_train_batch_size", "4"]


def launch(config: str, output_dir, *overrides: str, nproc: int = 2, timeout: float = 600, env=None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", str(nproc),
           "--main_process_port", str(free_port()), SCRIPT, "--config", "recipes/demo/config.yaml",
           "--output_dir", str(output_dir), *SHORT, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    state = {}
    for f in files:
        state.update(load_file(os.path.join(out, f)))
    return state


def losses(out) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


TOKEN = "hf_fsdp2_secret_token_42"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps replicated (cpu.yaml) and sharded (cpu_fsdp2.yaml), checkpoints every 2 steps; the sharded
    run recomputes activations (gradient_checkpointing) and pushes its merged model to a local Hub stand-in."""
    from mini_hub import run_mini_hub

    base = tmp_path_factory.mktemp("fsdp")
    rep = launch("recipes/accelerate_configs/cpu.yaml", base / "replicated", "--save_adapter", "true")
    with run_mini_hub(token=TOKEN) as hub:
        env = hub.client_env(base / "hf_home", child_env())  # the token only in the arguments
        # Also with transformers' gradient checkpointing: it must not change W.
        shd = launch("recipes/accelerate_configs/cpu_fsdp2.yaml", base / "sharded", "--push_to_hub", "true",
                     "--hub_model_id", "test-user/hd-fsdp2", "--hub_token", TOKEN, "--gradient_checkpointing", "true",
                     "--save_adapter", "true", env=env)
        shd.pushed = hub.repo_files("test-user/hd-fsdp2")
        shd.pushed_adapter = hub.repo_files("test-user/hd-fsdp2-adapter")
        hub.check()  # the client used no call the server does not answer
    return base, rep, shd


@pytest.mark.slow
def test_fsdp2_recipe_equals_replicated(runs):
    base, _, proc = runs
    assert "world size 2" in proc.stdout and "W sharded by rows" in proc.stdout
    rep, shd = weights(base / "replicated"), weights(base / "sharded")
    assert sorted(rep) == sorted(shd)
    assert all("lora" not in k and "base_layer" not in k for k in shd)
    for k in rep:
        rel = ((shd[k].double() - rep[k].double()).norm() / rep[k].double().norm()).item()
        assert rel <= 1e-6, k
    assert losses(base / "sharded") == pytest.approx(losses(base / "replicated"), rel=1e-6)
    state = json.loads((base / "sharded" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert all(h["hdpissa/collectives_per_step"] == 2 for h in logged)  # all_gather(dA) + all_to_all(dB rows)


@pytest.mark.slow
def test_fsdp2_push_to_hub_pushes_the_merged_model(runs, tmp_path):
    from safetensors.torch import load_file

    base, _, proc = runs
    files = proc.pushed
    assert {"config.json", "tokenizer.json", "README.md"} <= set(files)
    assert not any(f.endswith(".distcp") or f.startswith("checkpoint-") or "optimizer" in f for f in files)
    for data in files.values():
        assert TOKEN.encode() not in data
    pushed = {}
    for name, data in files.items():
        if name.endswith(".safetensors"):
            path = tmp_path / name
            path.write_bytes(data)
            pushed.update(load_file(str(path)))
    local = weights(base / "sharded")
    assert sorted(pushed) == sorted(local) and all(torch.equal(pushed[k], local[k]) for k in local)


@pytest.mark.slow
def test_fsdp2_adapter_equals_replicated_and_is_pushed(runs):
    """--save_adapter with W sharded (each layer's rows gathered on its owner rank, one layer at a time) writes the
    replicated run's adapter, and push_to_hub sends it to <hub_model_id>-adapter (the merged model's repo keeps none)."""
    from safetensors.torch import load_file

    base, _, proc = runs
    rep, shd = (load_file(str(base / run / "adapter" / "adapter_model.safetensors")) for run in ("replicated", "sharded"))
    assert sorted(rep) == sorted(shd) and rep
    for layer in {k.rsplit(".lora_", 1)[0] for k in rep}:
        ba_rep, ba_shd = (t[f"{layer}.lora_B.weight"].double() @ t[f"{layer}.lora_A.weight"].double() for t in (rep, shd))
        assert ((ba_shd - ba_rep).norm() / ba_rep.norm()).item() <= 1e-5, layer
    config = json.loads((base / "sharded" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config == json.loads((base / "replicated" / "adapter" / "adapter_config.json").read_text())
    assert not any(f.startswith("adapter/") for f in proc.pushed)
    assert set(proc.pushed_adapter) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    for name, data in proc.pushed_adapter.items():
        assert data == (base / "sharded" / "adapter" / name).read_bytes() and TOKEN.encode() not in data


# -- several machines, on one host -------------------------------------------------------------------------------
def machine_config(tmp_path, sharded: bool) -> str:
    """recipes/accelerate_configs/multi_node.yaml for 2 "machines" on this host: loopback address, 1 process each;
    sharded: with the FSDP2 settings of cpu_fsdp2.yaml (plus FSDP activation checkpointing)."""
    import yaml

    with open(os.path.join(ROOT, "recipes", "accelerate_configs", "multi_node.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg.update(main_process_ip="127.0.0.1", main_process_port=free_port(), num_machines=2, num_processes=2,
               mixed_precision="no")
    if sharded:  # with FSDP's own activation checkpointing this time: W must not change
        with open(os.path.join(ROOT, "recipes", "accelerate_configs", "cpu_fsdp2.yaml")) as f:
            fsdp_config = dict(yaml.safe_load(f)["fsdp_config"], fsdp_activation_checkpointing=True)
        cfg.update(distributed_type="FSDP", fsdp_config=fsdp_config)
    path = tmp_path / f"multi_node_{'fsdp2' if sharded else 'replicated'}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def two_machines(config: str, output_dir, *overrides: str, timeout: float = 600) -> list[str]:
    """Two `accelerate launch` commands, machine_rank 0 and 1, as on two machines; returns their stdouts."""
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--machine_rank",
               str(rank), SCRIPT, "--config", "recipes/demo/config.yaml", "--output_dir", str(output_dir), *SHORT,
               *overrides]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, out[-3000:] + err[-6000:]
        outs.append(out)
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "fsdp2"])
def test_two_machines_equal_one_launch(runs, tmp_path, sharded):
    """num_machines 2 (machine_rank 0 and 1, loopback main address, 1 process each) trains the same W as one launch of
    2 processes. FSDP2: the checkpoint the two machines wrote is sharded (one DCP file per rank, no gathered W) and
    resumes exactly (here with one launch of 2 processes: same K, another topology)."""
    from transformers import AutoModelForCausalLM

    base, _, _ = runs
    out = tmp_path / "two_machines"
    stdout = two_machines(machine_config(tmp_path, sharded), out)
    assert "world size 2" in stdout[0]
    assert ("W sharded by rows" if sharded else "W replicated") in stdout[0]
    ref = weights(base / ("sharded" if sharded else "replicated"))
    got = weights(out)
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    if not sharded:
        return
    ckpt = out / "checkpoint-2"
    names = set(os.listdir(ckpt))
    assert {"__0_0.distcp", "__1_0.distcp", "hdpissa_sharded.json", "CHECKPOINT_COMPLETE"} <= names
    assert not any(n.endswith(".safetensors") for n in names), "W is never gathered into a checkpoint"
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt, resumed / "checkpoint-2")
    launch("recipes/accelerate_configs/cpu_fsdp2.yaml", resumed, "--resume_from_checkpoint",
           str(resumed / "checkpoint-2"))
    final = weights(resumed)
    assert all(torch.equal(final[k], ref[k]) for k in ref)
    assert losses(resumed)[-2:] == losses(base / "sharded")[-2:]
    model = AutoModelForCausalLM.from_pretrained(resumed)  # plain transformers, no hdpissa_trl needed
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if k in ref)


# -- settings, read before anything is sharded ---------------------------------------------------------------------
def _accelerator(mixed_precision: str = "no"):
    """The two attributes of an Accelerator that decide which FSDP settings apply (a CPU run: no FSDP plugin)."""
    from types import SimpleNamespace

    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None), mixed_precision=mixed_precision)


def test_fsdp_settings_come_from_the_launch_environment_or_the_training_arguments(monkeypatch):
    from types import SimpleNamespace

    from hdpissa_trl.trainer.fsdp import requested_fsdp_plugin

    no_fsdp = SimpleNamespace(fsdp_plugin_args=None)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert requested_fsdp_plugin(no_fsdp, _accelerator()) is None
    # What `accelerate launch` exports for cpu_fsdp2.yaml.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    plugin = requested_fsdp_plugin(no_fsdp, _accelerator("bf16"))
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    # SFTConfig(fsdp=..., fsdp_config={"version": 2}) as transformers turns it into plugin arguments.
    plugin = requested_fsdp_plugin(SimpleNamespace(fsdp_plugin_args={"fsdp_version": 2}), _accelerator())
    assert plugin.fsdp_version == 2


def test_fsdp1_and_cpu_offload_are_refused():
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    from hdpissa_trl.trainer.fsdp import requested_fsdp_plugin, shard_like_accelerate

    with pytest.raises(ValueError, match="needs FSDP2.*fsdp_version=1.*fsdp_version: 2"):
        requested_fsdp_plugin(SimpleNamespace(fsdp_plugin_args={"fsdp_version": 1}), _accelerator())
    offload = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_offload=True)
    with pytest.raises(ValueError, match="CPU offload.*fsdp_offload_params: false"):
        shard_like_accelerate(torch.nn.Linear(2, 2), _accelerator(), offload)


def test_deepspeed_is_refused_and_zero3_points_to_fsdp2(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from hdpissa_trl.trainer.parallel import check_deepspeed

    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(var, raising=False)
    check_deepspeed(SimpleNamespace(deepspeed=None, deepspeed_plugin=None))  # no DeepSpeed: nothing to refuse
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    for args in (SimpleNamespace(deepspeed={"zero_optimization": {"stage": 3}}, deepspeed_plugin=None),
                 SimpleNamespace(deepspeed=str(config), deepspeed_plugin=None),
                 SimpleNamespace(deepspeed=None, deepspeed_plugin=SimpleNamespace(zero_stage=3))):
        with pytest.raises(ValueError, match="ZeRO-3.*not rows of W.*fsdp2.yaml"):
            check_deepspeed(args)
    with pytest.raises(ValueError, match="ZeRO stage 2.*averages the adapter gradients.*fsdp2.yaml"):
        check_deepspeed(SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}, deepspeed_plugin=None))
    # An accelerate DeepSpeed launch config, seen through the environment accelerate launch exports.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_deepspeed(SimpleNamespace(deepspeed=None, deepspeed_plugin=None))


def test_trainer_refuses_deepspeed_zero3_before_loading_the_model(monkeypatch, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from hdpissa_trl import HDPiSSASFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    data = Dataset.from_list([{"prompt": "1 + 1 =", "completion": " 2"}])
    with pytest.raises(ValueError, match="ZeRO-3.*fsdp2.yaml"):  # not an OSError about the missing model
        HDPiSSASFTTrainer(model=str(tmp_path / "no-such-model"), args=args, train_dataset=data)


def test_sharded_save_on_each_node_across_machines_is_refused_before_loading_the_model(monkeypatch, tmp_path):
    """save_on_each_node=True declares storage per machine; with W sharded each checkpoint is one directory all
    processes write into, so two machines are refused before anything loads (the model path does not even exist).
    On one machine, or with W replicated, the setting stays allowed."""
    from datasets import Dataset
    from trl import SFTConfig

    from hdpissa_trl import HDPiSSASFTTrainer
    from hdpissa_trl.trainer.fsdp import check_sharded_storage

    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], save_on_each_node=True)
    data = Dataset.from_list([{"prompt": "1 + 1 =", "completion": " 2"}])
    # What `accelerate launch` exports on each of two machines with one process each, W sharded (cpu_fsdp2.yaml).
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="save_on_each_node=True declares storage per machine.*2 machines.*shares"):
        HDPiSSASFTTrainer(model=str(tmp_path / "no-such-model"), args=args, train_dataset=data)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one machine: nothing to refuse
    check_sharded_storage(args)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # W replicated: each node keeps a complete copy
    check_sharded_storage(args)
