"""recipes/dpo.py and recipes/grpo.py: their script arguments, data and YAMLs, and the demo runs end to end.

* The preference / prompt files in ``recipes/demo/data_rl`` regenerate byte for byte with the command in
  ``recipes/demo/README.md``; chosen answers are right and rejected ones wrong (recomputed here), splits disjoint.
* Every DPO / GRPO YAML uses only keys the script knows and names files that exist.
* End to end (2 processes, ``accelerate launch``): the GRPO demo's mean reward rises; the DPO demo and a PiSSA
  baseline write the merged plain model and a card saying how the reference was kept.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _dist import child_env, free_port
from datasets import Dataset

from hdpissa_trl.scripts.data import DataError
from hdpissa_trl.scripts.recipe_rl import DPOScriptArguments, GRPOScriptArguments, apply_template, load_data

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes/demo/data_rl"
GENERATE = ("python recipes/data/generate_rl.py --out_dir recipes/demo/data_rl --style demo --seed 0 --n_train 1000 "
            "--n_test 50")


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------------------- data ---
def test_shipped_rl_data_regenerates_byte_for_byte(tmp_path):
    assert GENERATE in (REPO / "recipes/demo/README.md").read_text()
    argv = shlex.split(GENERATE)
    argv[argv.index("--out_dir") + 1] = str(tmp_path)
    subprocess.run([sys.executable, *argv[1:]], cwd=REPO, check=True, capture_output=True, text=True)
    names = sorted(p.name for p in DATA.glob("*.jsonl"))
    assert names == sorted(f"{k}_{s}.jsonl" for k in ("preference", "prompts") for s in ("train", "test"))
    for name in names:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def _value(prompt: str) -> int:
    a, op, b = re.fullmatch(r"What is (\d+) ([-+]) (\d+)\?\n", prompt).groups()
    return int(a) + int(b) if op == "+" else int(a) - int(b)


@pytest.mark.parametrize("split", ["train", "test"])
def test_pairs_prefer_the_right_answer_and_splits_are_disjoint(split):
    pairs, prompts = _rows(DATA / f"preference_{split}.jsonl"), _rows(DATA / f"prompts_{split}.jsonl")
    assert [p["prompt"] for p in pairs] == [p["prompt"] for p in prompts]
    for pair, prompt in zip(pairs, prompts):
        value = _value(pair["prompt"])
        assert prompt["answer"] == str(value)
        assert pair["chosen"].endswith(f"= {value}. The answer is {value}.")
        wrong = int(re.search(r"The answer is (-?\d+)\.$", pair["rejected"]).group(1))
        assert wrong != value and 1 <= abs(wrong - value) <= 10
        head = pair["chosen"].split(" = ")[0]  # "a op b": the same worked line, only the result differs
        assert pair["rejected"] == f"{head} = {wrong}. The answer is {wrong}."
    train = {p["prompt"] for p in _rows(DATA / "prompts_train.jsonl")}
    assert len(train) == 1000
    assert not train & {p["prompt"] for p in _rows(DATA / "prompts_test.jsonl")}


# -------------------------------------------------------------------------------------------- script options ---
def test_script_arguments_refuse_what_does_not_apply():
    with pytest.raises(ValueError, match="column_mapping is an option of the SFT recipe"):
        DPOScriptArguments(column_mapping={"x": {"q": "prompt"}})
    with pytest.raises(ValueError, match="GRPO needs a reward"):
        GRPOScriptArguments()
    args = GRPOScriptArguments(reward_funcs="answer_reward, format_reward")
    assert args.reward_funcs == ["answer_reward", "format_reward"] and len(args.rewards()) == 2


def test_templates_put_pairs_and_prompts_in_conversational_form():
    pairs = Dataset.from_list([{"prompt": "What is 1 + 2?\n", "chosen": "3", "rejected": "4"}])
    chat = apply_template(pairs, "chat")[0]
    assert chat["prompt"] == [{"role": "user", "content": "What is 1 + 2?\n"}]
    assert chat["chosen"] == [{"role": "assistant", "content": "3"}]
    assert chat["rejected"] == [{"role": "assistant", "content": "4"}]
    prompts = apply_template(Dataset.from_list([{"prompt": "Q", "answer": "1"}]), "alpaca")[0]
    assert prompts["prompt"].endswith("### Instruction:\nQ\n\n### Response:\n") and prompts["answer"] == "1"
    with pytest.raises(DataError, match="prompt_template must be one of"):
        apply_template(pairs, "nope")


def test_load_data_names_missing_columns_and_files(tmp_path):
    from trl import DatasetMixtureConfig
    from trl.scripts.utils import DatasetConfig

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    mixture = DatasetMixtureConfig(datasets=[DatasetConfig(path="json", data_files=str(path), split="train")])
    with pytest.raises(DataError, match=r"no column\(s\) \['rejected'\].*\['prompt', 'chosen'\]"):
        load_data(mixture, ("prompt", "chosen", "rejected"), "none")
    missing = DatasetMixtureConfig(datasets=[DatasetConfig(path="json", data_files=str(tmp_path / "no.jsonl"),
                                                           split="train")])
    with pytest.raises(DataError, match="no.jsonl' of dataset .* not found"):
        load_data(missing, ("prompt",), "none")


def test_test_split_is_the_same_in_every_process():
    """TRL's get_dataset splits without a seed (one drawn from NumPy's global state, which differs between the processes
    of a launch): each process trained on another train set in another order, and DPO's precomputed reference values
    landed on other rows. The recipes split with the training seed: the same split whatever NumPy's state."""
    import numpy as np
    from trl import DatasetMixtureConfig
    from trl.scripts.utils import DatasetConfig

    mixture = DatasetMixtureConfig(datasets=[DatasetConfig(path="json", data_files=str(DATA / "preference_train.jsonl"),
                                                           split="train")], test_split_size=0.05)
    splits = []
    for process_state in (1, 2):
        np.random.seed(process_state)
        data = load_data(mixture, ("prompt", "chosen", "rejected"), "none", seed=42)
        splits.append((data["train"]["prompt"], data["test"]["prompt"]))
    assert splits[0] == splits[1]
    assert len(splits[0][1]) == 50 and not set(splits[0][0]) & set(splits[0][1])


@pytest.mark.parametrize("script", ["dpo", "grpo"])
def test_yamls_use_known_keys_and_existing_files(script):
    from trl import DatasetMixtureConfig, DPOConfig, GRPOConfig, ModelConfig
    from trl.scripts.utils import DatasetConfig

    script_args, config = (DPOScriptArguments, DPOConfig) if script == "dpo" else (GRPOScriptArguments, GRPOConfig)
    known = {"env"} | {f.name for c in (script_args, config, ModelConfig, DatasetMixtureConfig)
                       for f in dataclasses.fields(c)}
    paths = sorted((REPO / "recipes").glob(f"*/{script}.yaml"))
    assert {p.parent.name for p in paths} >= {"demo", "smollm2-135m"}
    for path in paths:
        config = yaml.safe_load(path.read_text())
        assert set(config) <= known, (path, set(config) - known)
        assert config["method"] in {"hdpissa", "pissa", "lora", "full"}
        if config.get("use_cpu"):
            assert config["bf16"] is False, path
        for ds in config["datasets"]:
            assert set(ds) <= {f.name for f in dataclasses.fields(DatasetConfig)}, path
            assert (REPO / ds["data_files"]).is_file(), (path, ds["data_files"])
        for task in config.get("eval_tasks") or []:
            assert (REPO / task.split("=", 1)[1]).is_file(), (path, task)


# ------------------------------------------------------------------------------------------------ end to end ---
def run_recipe(script: str, config: str, out: Path, *overrides: str, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate_configs/cpu.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), f"recipes/{script}.py", "--config", config,
           "--output_dir", str(out), "--save_strategy", "no", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def check_plain_model(out: Path) -> None:
    from safetensors.torch import load_file

    keys = load_file(out / "model.safetensors")
    assert keys and not any("lora" in k or "base_layer" in k for k in keys)
    assert (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_grpo_demo_mean_reward_rises_and_pushes_two_processes(tmp_path):
    """The demo's mean reward rises; the merged model and its card reach a (local) Hub, the token in no file."""
    from mini_hub import run_mini_hub

    out = tmp_path / "grpo"
    token = "hf_grpo_secret_token_42"
    with run_mini_hub(token=token) as hub:
        proc = run_recipe("grpo", "recipes/demo/grpo.yaml", out, "--max_steps", "30", "--learning_rate", "5e-3",
                          "--push_to_hub", "true", "--hub_model_id", "test-user/grpo-demo", "--hub_token", token,
                          env=hub.client_env(tmp_path / "hf_home", child_env()))
        files = hub.repo_files("test-user/grpo-demo")
        hub.check()
    rewards = [h["reward"] for h in history(out) if "reward" in h]
    assert len(rewards) == 6
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.3, rewards
    check_plain_model(out)
    card = (out / "README.md").read_text()
    assert "| rewards | digit_reward |" in card and "| devices K | 2 |" in card and "hd-pissa" in card
    assert "Merged model:" in proc.stdout
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert files["README.md"].decode() == card
    assert all(token.encode() not in data for data in files.values())
    assert not any("hdpissa_state" in f or "optimizer" in f for f in files)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hdpissa", "pissa"])
def test_dpo_demo_runs_and_reports_margins_two_processes(tmp_path, method):
    """The demo as shipped (precomputed reference, 2 processes): the first loss is ln 2 with zero margins, since policy
    = reference at step 0 (it was 1.306 with margins -0.46 when each process split the data with its own seed)."""
    import math

    out = tmp_path / method
    run_recipe("dpo", "recipes/demo/dpo.yaml", out, "--method", method, "--max_steps", "20", "--eval_steps", "10",
               "--logging_steps", "1", "--eval_tasks", "math=recipes/demo/data_rl/prompts_test.jsonl",
               "--eval_limit", "4", "--eval_max_new_tokens", "8", "--eval_batch_size", "4")
    logged = history(out)
    train = [h for h in logged if "rewards/margins" in h]
    evals = [h for h in logged if "eval_rewards/margins" in h]
    assert len(train) == 20 and len(evals) == 2
    assert train[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5), train[0]
    assert train[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    check_plain_model(out)
    card = (out / "README.md").read_text()
    assert "precomputed log-probabilities of the starting model" in card and f"| method | {method} |" in card
    scores = json.loads((out / "eval_results.json").read_text())  # generation eval before and after, in the card
    assert scores["results"]["math"]["n"] == scores["before"]["results"]["math"]["n"] == 4
    assert "model-index" in card
