"""The recipe contract: `accelerate launch ... recipes/sft_multitask.py --config recipes/demo/config.yaml`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml
from _dist import child_env, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join("recipes", "sft_multitask.py")


def contract(output_dir, *overrides: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate_configs/cpu.yaml",
           "--num_processes", str(nproc), "--main_process_port", str(free_port()), SCRIPT,
           "--config", "recipes/demo/config.yaml", "--output_dir", str(output_dir), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def load_script():
    spec = importlib.util.spec_from_file_location("sft_multitask", os.path.join(ROOT, SCRIPT))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_contract_end_to_end(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "demo"
    proc = contract(out, "--max_steps", "6", "--eval_limit", "4", "--logging_steps", "2")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "trainer_state.json", "eval_results.json"):
        assert (out / name).exists(), name
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all("lora" not in k and "base_layer" not in k for k in keys)
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype.__repr__() == "torch.float32"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    card = (out / "README.md").read_text()
    assert "model-index" in card and "| devices K | 2 |" in card and "| per-device r | 4 |" in card
    assert ROOT not in card, "no absolute machine path in the card"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(h["hdpissa/collectives_per_step"] == 1 for h in state["log_history"]
                                    if "loss" in h)
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["results"]) == {"math", "code", "text"} and results["before"] is not None
    assert str(out / "model.safetensors") in proc.stdout


@pytest.mark.slow
def test_overrides_and_resume(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    sys.path.insert(0, ROOT)
    from hdpissa_trl.testing_utils import save_tiny_model

    save_tiny_model(base, "qwen2", hidden_size=64, intermediate_size=128)
    out = tmp_path / "lora"
    common = ["--model_name_or_path", str(base), "--build_tiny_model", "false", "--method", "lora", "--lora_r", "2",
              "--lora_alpha", "4", "--lora_target_modules", "q_proj", "v_proj", "--learning_rate", "0.01",
              "--lr_scheduler_type", "constant", "--seed", "3", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "2", "--dtype", "float32", "--save_steps", "2", "--save_total_limit", "3",
              "--eval_tasks",
              "text=recipes/demo/data/text_test.jsonl", "--eval_limit", "4", "--max_steps", "4"]
    contract(out, *common)
    card = (out / "README.md").read_text()
    assert "| method | lora |" in card and "| r | 2 |" in card and "| learning rate | 0.01 |" in card
    assert "| effective batch | 8 |" in card and "| lr scheduler | constant |" in card
    assert (out / "checkpoint-4").exists() and (out / "checkpoint-2").exists()
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert type(tuned).__name__ == "Qwen2ForCausalLM"
    # Resume from a checkpoint on the command line (HD-PiSSA this time, K=2).
    out2 = tmp_path / "hd"
    hd = [a if a != "lora" else "hdpissa" for a in common]
    contract(out2, *hd[:-2], "--max_steps", "2")
    contract(out2, *hd[:-2], "--max_steps", "4", "--resume_from_checkpoint", str(out2 / "checkpoint-2"))
    state = json.loads((out2 / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_yaml_cli_precedence_and_unknown_keys(tmp_path):
    mod = load_script()
    parser = mod.make_parser()
    cfg = os.path.join(ROOT, "recipes", "demo", "config.yaml")
    script_args, training_args, model_args, data_args = parser.parse_args_and_config(
        ["--config", cfg, "--learning_rate", "0.5", "--lora_r", "7", "--method", "pissa"])
    raw = yaml.safe_load(open(cfg))
    assert training_args.learning_rate == 0.5 and raw["learning_rate"] != 0.5  # CLI beats YAML
    assert model_args.lora_r == 7 and script_args.method == "pissa"
    assert training_args.max_steps == raw["max_steps"]  # YAML beats defaults
    assert len(data_args.datasets) == 3
    assert script_args.eval_tasks == raw["eval_tasks"] and len(raw["eval_tasks"]) == 3
    # An empty value on the command line switches off the YAML's evaluation; blanks in a list are dropped.
    assert parser.parse_args_and_config(["--config", cfg, "--eval_tasks", ""])[0].eval_tasks == []
    assert parser.parse_args_and_config(["--config", cfg, "--eval_tasks", "math", " "])[0].eval_tasks == ["math"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(cfg).read() + "\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        mod.make_parser().parse_args_and_config(["--config", str(bad)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [0.1\nmax_steps: 3\n")
    with pytest.raises(yaml.YAMLError):
        mod.make_parser().parse_args_and_config(["--config", str(broken)])
    with pytest.raises(ValueError, match="Unknown method 'dora'"):
        mod.make_parser().parse_args_and_config(["--config", cfg, "--method", "dora"])


@pytest.mark.slow
def test_demo_score_rises_from_base_to_trained(tmp_path):
    """The full embedded demo (2 processes): the mean held-out score of the trained model beats the base model's."""
    out = tmp_path / "demo"
    contract(out)
    results = json.loads((out / "eval_results.json").read_text())
    after = {t: r["value"] for t, r in results["results"].items()}
    before = {t: r["value"] for t, r in results["before"]["results"].items()}
    assert sum(after.values()) / len(after) > sum(before.values()) / len(before) + 0.05, (before, after)
    assert after["text"] > before["text"]


EVAL_ROWS = ["--eval_tasks", "math=recipes/demo/data/math_test.jsonl", "text=recipes/demo/data/text_test.jsonl",
             "--eval_limit", "50", "--eval_max_new_tokens", "128", "--eval_batch_size", "8"]


@pytest.mark.slow
def test_no_process_waits_in_a_collective_while_another_evaluates(tmp_path):
    """2 processes, `--ddp_timeout 8`, an evaluation of 100 rows (50 math prompts, 128 new tokens each; 50 multiple
    choice) that takes one process longer than that, before and after training. Every process scores its share of the
    rows and the shares are exchanged in a group of their own, so the run passes; eval_results.json (the trained
    model's report and the base model's under "before") and the card equal a one-process evaluation of the same rows.

    Before: rank 0 evaluated alone while rank 1 waited in `wait_for_everyone` and died with "Timed out waiting
    8000ms for recv operation to complete" (on NCCL the watchdog kills the job once the wait passes ddp_timeout)."""
    import torch

    from evaluation import evaluate_model

    out, base = tmp_path / "run", tmp_path / "tiny"
    proc = contract(out, "--model_name_or_path", str(base), "--max_steps", "2", "--save_strategy", "no",
                    "--ddp_timeout", "8", *EVAL_ROWS)
    assert proc.stdout.count("2 process(es) each scoring its share of the rows") == 2
    report = json.loads((out / "eval_results.json").read_text())
    before = report.pop("before")

    torch.set_num_threads(1)  # as the launched processes: the same kernels, the same bits
    settings = dict(tasks=EVAL_ROWS[1:3], limit=50, max_new_tokens=128, batch_size=8, show_progress=False,
                    device="cpu")
    one_after = evaluate_model(str(out), dtype="auto", **settings)
    one_before = evaluate_model(str(base), dtype="float32", **settings)
    for got, want in ((report, one_after), (before, one_before)):
        want = json.loads(json.dumps(want, default=str))
        assert got["config"].pop("seconds") > 0 and want["config"].pop("seconds") > 0
        assert got == want
    assert len(report["samples"]["math"]) == 50 and len(report["samples"]["text"]) == 50
    card = (out / "README.md").read_text()
    for name in ("math", "text"):  # the card's model-index carries the same numbers
        assert f"value: {report['results'][name]['value']}" in card, name


# -- build_tiny_model never touches a model the user named ---------------------------------------------------------

def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def gguf_dir(tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "model.Q4.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (d / "notes.txt").write_text("mine")
    return d


def test_build_tiny_model_refuses_a_users_gguf_dir_and_leaves_it_untouched(gguf_dir):
    from hdpissa_trl.scripts.recipe import resolve_model_source

    before = snapshot(gguf_dir)
    with pytest.raises(ValueError, match=r"build_tiny_model=true \(build a random demo model\) conflicts with the GGUF "
                                         r"model you named .*gguf_file='model.Q4.gguf'.*--build_tiny_model false"):
        resolve_model_source(str(gguf_dir), "model.Q4.gguf", build_tiny=True)
    with pytest.raises(ValueError, match="conflicts with the GGUF model you named"):
        resolve_model_source(str(gguf_dir / "model.Q4.gguf"), None, build_tiny=True)
    # Without gguf_file the directory is still not a model directory: refused, named, never written into.
    with pytest.raises(ValueError, match=r"already exists and is not a model directory \(it holds \['model.Q4.gguf', "
                                         r"'notes.txt'\]\); hdpissa_trl never writes into or deletes it"):
        resolve_model_source(str(gguf_dir), None, build_tiny=True)
    assert snapshot(gguf_dir) == before
    assert sorted(p.name for p in gguf_dir.parent.iterdir()) == ["my-model"]  # no temp dir, no lock left beside it


def test_recipe_with_demo_yaml_and_a_users_gguf_model_stops_before_touching_it(gguf_dir):
    """The demo YAML sets build_tiny_model: true; naming a real GGUF model on the command line must not replace it."""
    before = snapshot(gguf_dir)
    args = load_script().make_parser().parse_args_and_config(
        ["--config", os.path.join(ROOT, "recipes", "demo", "config.yaml"), "--model_name_or_path", str(gguf_dir),
         "--gguf_file", "model.Q4.gguf", "--output_dir", str(gguf_dir.parent / "out")])
    assert args[0].build_tiny_model is True
    with pytest.raises(ValueError, match="conflicts with the GGUF model you named"):
        load_script().main(*args)
    assert snapshot(gguf_dir) == before


def test_build_tiny_model_builds_only_where_nothing_is(tmp_path):
    from hdpissa_trl.scripts.recipe import TINY_MODEL_MARKER, ensure_tiny_model, resolve_model_source

    with pytest.raises(ValueError, match=r"'org/model', which looks like a Hub model id.*--build_tiny_model false"):
        resolve_model_source("org/model", None, build_tiny=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ensure_tiny_model(empty, hidden_size=32, intermediate_size=64) == str(empty)
    assert (empty / "config.json").exists() and (empty / TINY_MODEL_MARKER).exists()
    # A directory that already holds a model is the model trained: returned as it is, not rebuilt.
    from hdpissa_trl.testing_utils import save_tiny_model

    user = save_tiny_model(tmp_path / "user", "qwen2", hidden_size=32, intermediate_size=64)
    before = snapshot(tmp_path / "user")
    assert resolve_model_source(user, None, build_tiny=True) == (user, None)
    assert snapshot(tmp_path / "user") == before
