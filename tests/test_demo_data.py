"""The data and configs shipped under ``recipes/``: reproducible, train/test disjoint, correct, and well-formed.

* The JSONL files in ``recipes/demo/data`` and ``recipes/smollm2-135m/data`` are regenerated (into ``tmp_path``) with
  the command their README states and must match byte for byte.
* Held-out prompts never occur in training; math answers and multiple-choice labels are recomputed from the prompt;
  every held-out code row's canonical completion passes its test (executed in-process: the data is our own).
* Every YAML under ``recipes/`` parses; recipe YAMLs use only keys the recipe script knows and name files that exist;
  the LoRA/PiSSA baselines differ from ``math.yaml`` by exactly the ``method:`` line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
FAMILIES = ("math", "code", "text")

# data dir -> (README that documents it, the exact generate command, as written in that README)
SHIPPED = {
    "recipes/demo/data": (
        "recipes/demo/README.md",
        "python recipes/data/generate.py --out_dir recipes/demo/data --style demo --seed 0 --n_train 2000 --n_test 50",
    ),
    "recipes/smollm2-135m/data": (
        "recipes/smollm2-135m/README.md",
        "python recipes/data/generate.py --out_dir recipes/smollm2-135m/data --style chat --seed 0 --n_train 3000 "
        "--n_test 100",
    ),
}

# Keys of recipes/sft_multitask.py that are not fields of TRL's SFTConfig, ModelConfig or DatasetMixtureConfig
# (``env`` is read by TrlParser itself).
SCRIPT_KEYS = {
    "method",
    "column_mapping",
    "prompt_template",
    "eval_tasks",
    "eval_limit",
    "build_tiny_model",
    "gguf_file",
    "hdpissa_init",
    "hdpissa_niter",
    "hdpissa_precision",
    "hdpissa_sync_check_steps",
    "env",
}
RECIPE_REQUIRED = {
    "model_name_or_path",
    "method",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "datasets",
    "prompt_template",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "bf16",
    "output_dir",
}
ACCELERATE_REQUIRED = {
    "compute_environment",
    "distributed_type",
    "mixed_precision",
    "num_machines",
    "num_processes",
    "machine_rank",
    "use_cpu",
}


def _rows(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _shipped(data_dir: str, family: str, split: str) -> list[dict[str, Any]]:
    return _rows(REPO / data_dir / f"{family}_{split}.jsonl")


def _recipe_yamls() -> list[Path]:
    return sorted(
        p for p in RECIPES.rglob("*.yaml") if "accelerate_configs" not in p.parts and "_cache" not in p.parts
        and p.stem not in ("dpo", "grpo")  # recipes/dpo.py and recipes/grpo.py: see test_recipe_rl.py
    )


# ------------------------------------------------------------------------------------------------------- data ---
@pytest.mark.parametrize("data_dir", sorted(SHIPPED))
def test_shipped_data_regenerates_byte_for_byte(data_dir: str, tmp_path: Path) -> None:
    readme, command = SHIPPED[data_dir]
    assert command in (REPO / readme).read_text(), f"{readme} must state the exact command: {command}"
    argv = shlex.split(command)
    argv[argv.index("--out_dir") + 1] = str(tmp_path)
    subprocess.run([sys.executable, *argv[1:]], cwd=REPO, check=True, capture_output=True, text=True)
    names = sorted(p.name for p in (REPO / data_dir).glob("*.jsonl"))
    assert names == sorted(f"{f}_{s}.jsonl" for f in FAMILIES for s in ("train", "test"))
    for name in names:
        assert (tmp_path / name).read_bytes() == (REPO / data_dir / name).read_bytes(), f"{data_dir}/{name} differs"


def test_demo_files_are_small() -> None:
    for path in (REPO / "recipes/demo/data").glob("*.jsonl"):
        assert path.stat().st_size < 500 * 1024, path


@pytest.mark.parametrize("data_dir", sorted(SHIPPED))
@pytest.mark.parametrize("family", FAMILIES)
def test_splits_are_disjoint_and_well_formed(data_dir: str, family: str) -> None:
    train, test = _shipped(data_dir, family, "train"), _shipped(data_dir, family, "test")
    train_prompts = [r["prompt"] for r in train]
    assert len(set(train_prompts)) == len(train_prompts), "duplicate training prompts"
    assert not {r["prompt"] for r in test} & set(train_prompts), "a held-out prompt appears in train"
    for row in train:
        assert set(row) == {"prompt", "completion", "task"} and row["task"] == family
    scoring = {"math": {"answer"}, "code": {"test", "entry_point"}, "text": {"choices", "label"}}[family]
    for row in test:
        assert set(row) == {"prompt", "completion", "task"} | scoring and row["task"] == family


def _math_from_prompt(prompt: str) -> int:
    """The answer of a generated math prompt, recomputed from the prompt alone."""
    demo = re.fullmatch(r"What is (\d+) ([-+]) (\d+)\?\n", prompt)
    if demo:
        a, op, b = int(demo.group(1)), demo.group(2), int(demo.group(3))
        return a + b if op == "+" else a - b
    n = [int(x) for x in re.findall(r"\d+", prompt)]
    if "sells" in prompt:
        return n[0] - n[1] - n[2]
    if "packs" in prompt:
        return n[0] * n[1] + n[2]
    if "gets" in prompt:
        return n[0] + n[1]
    if "gives away" in prompt:
        return n[0] - n[1]
    if "Each box" in prompt:
        return n[0] * n[1]
    if "shares" in prompt:
        assert n[0] % n[1] == 0
        return n[0] // n[1]
    raise AssertionError(f"unrecognised math prompt {prompt!r}")


@pytest.mark.parametrize("data_dir", sorted(SHIPPED))
def test_math_answers_are_correct(data_dir: str) -> None:
    for split in ("train", "test"):
        for row in _shipped(data_dir, "math", split):
            answer = _math_from_prompt(row["prompt"])
            assert row["completion"].endswith(f"The answer is {answer}."), row
            if split == "test":
                assert row["answer"] == str(answer)
            for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", row["completion"]):
                a, b, c = int(a), int(b), int(c)
                assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c, row["completion"]


def _passes(program: str, entry_point: str) -> bool:
    namespace: dict[str, Any] = {}
    try:
        exec(program, namespace)  # our own generated data, not model output
        namespace["check"](namespace[entry_point])
    except Exception:
        return False
    return True


@pytest.mark.parametrize("data_dir", sorted(SHIPPED))
def test_code_canonical_completions_pass_their_tests(data_dir: str) -> None:
    rows = _shipped(data_dir, "code", "test")
    for row in rows:
        assert row["test"].startswith("def check(candidate):\n")
        program = row["prompt"] + row["completion"] + "\n\n" + row["test"]
        assert _passes(program, row["entry_point"]), row["entry_point"]
        # A body-less stub fails, so the test really depends on the completion.
        assert not _passes(row["prompt"] + "    pass\n\n" + row["test"], row["entry_point"]), row["entry_point"]
        if "chat" in SHIPPED[data_dir][1]:  # chat completions are whole functions: they work on their own too
            assert _passes(row["completion"] + "\n\n" + row["test"], row["entry_point"])


def _text_answer(prompt: str) -> str:
    """The correct option of a generated multiple-choice prompt, recomputed from the prompt alone."""
    word = re.search(r"'([a-z]+)'", prompt)
    options = re.search(r"Options: (.*)", prompt).group(1).split(", ")
    if prompt.startswith("Reverse"):
        return word.group(1)[::-1]
    if prompt.startswith(("Uppercase", "Write the word")):
        return word.group(1).upper()
    if prompt.startswith("Sort"):
        return "".join(sorted(word.group(1)))
    if prompt.startswith(("Length", "How many letters")):
        return str(len(word.group(1)))
    if "argest" in prompt.split("\n")[0]:
        return str(max(int(x) for x in options))
    if "mallest" in prompt.split("\n")[0]:
        return str(min(int(x) for x in options))
    raise AssertionError(f"unrecognised text prompt {prompt!r}")


@pytest.mark.parametrize("data_dir", sorted(SHIPPED))
def test_multiple_choice_labels_are_correct(data_dir: str) -> None:
    for split in ("train", "test"):
        for row in _shipped(data_dir, "text", split):
            assert row["completion"] == _text_answer(row["prompt"]), row
            if split == "test":
                choices = row["choices"]
                assert len(choices) == 4 and len(set(choices)) == 4
                assert choices[row["label"]] == row["completion"]
                assert f"Options: {', '.join(choices)}" in row["prompt"]


# ------------------------------------------------------------------------------------------------------ configs ---
def _walk_strings(obj: Any):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_strings(k)
            yield from _walk_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_strings(v)


def test_every_yaml_parses_without_machine_paths() -> None:
    paths = sorted(p for p in RECIPES.rglob("*.yaml") if "_cache" not in p.parts)
    assert len(paths) >= 13
    for path in paths:
        config = yaml.safe_load(path.read_text())
        assert isinstance(config, dict), path
        for s in _walk_strings(config):
            assert not os.path.isabs(s) and not s.startswith("~"), f"{path}: machine-specific path {s!r}"


def test_accelerate_configs() -> None:
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (RECIPES / "accelerate_configs").glob("*.yaml")}
    assert set(configs) >= {"cpu", "single_gpu", "multi_gpu", "multi_node"}
    for name, config in configs.items():
        assert ACCELERATE_REQUIRED <= set(config), (name, ACCELERATE_REQUIRED - set(config))
    # CPU: the MULTI_GPU (torchrun) launcher is what starts K gloo processes; MULTI_CPU / use_cpu start one.
    assert configs["cpu"]["distributed_type"] == "MULTI_GPU" and configs["cpu"]["use_cpu"] is False
    assert configs["cpu"]["num_processes"] == 2 and configs["cpu"]["mixed_precision"] == "no"
    assert configs["single_gpu"]["num_processes"] == 1
    assert configs["multi_gpu"]["num_processes"] == 8
    assert configs["multi_node"]["num_machines"] == 2 and configs["multi_node"]["num_processes"] == 16


def test_recipe_yamls_use_known_keys_and_existing_files() -> None:
    from trl import DatasetMixtureConfig, ModelConfig, SFTConfig
    from trl.scripts.utils import DatasetConfig

    from hdpissa_trl.scripts.recipe import HDPiSSAScriptArguments

    known = SCRIPT_KEYS | {
        f.name for c in (SFTConfig, ModelConfig, DatasetMixtureConfig, HDPiSSAScriptArguments)
        for f in dataclasses.fields(c)
    }
    dataset_keys = {f.name for f in dataclasses.fields(DatasetConfig)}
    paths = _recipe_yamls()
    assert {p.relative_to(RECIPES).as_posix() for p in paths} >= {
        "demo/config.yaml",
        *(f"{m}/{t}.yaml" for m in ("llama-3.1-8b", "smollm2-135m") for t in ("math", "code", "multitask")),
        "llama-3.1-8b/math_lora.yaml",
        "llama-3.1-8b/math_pissa.yaml",
    }
    for path in paths:
        config = yaml.safe_load(path.read_text())
        assert RECIPE_REQUIRED <= set(config), (path, RECIPE_REQUIRED - set(config))
        assert set(config) <= known, (path, set(config) - known)
        assert config["method"] in {"hdpissa", "pissa", "lora", "full"}
        assert config["prompt_template"] in {"alpaca", "chat", "none"}
        if config.get("use_cpu"):
            assert config["bf16"] is False, f"{path}: SFTConfig's bf16=True default fails on CPU"
        for ds in config["datasets"]:
            assert set(ds) <= dataset_keys, (path, set(ds) - dataset_keys)
            if ds["path"] == "json":
                assert (REPO / ds["data_files"]).is_file(), (path, ds["data_files"])
        for source, mapping in (config.get("column_mapping") or {}).items():
            assert source in {ds["path"] for ds in config["datasets"]}, (path, source)
            assert set(mapping.values()) <= {"prompt", "completion", "messages"}
        for task in config.get("eval_tasks") or []:
            if "=" in task:
                assert (REPO / task.split("=", 1)[1]).is_file(), (path, task)


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_baseline_variants_differ_by_one_line(method: str) -> None:
    base = (RECIPES / "llama-3.1-8b/math.yaml").read_text().splitlines()
    variant = (RECIPES / f"llama-3.1-8b/math_{method}.yaml").read_text().splitlines()
    assert len(base) == len(variant)
    diff = [(a, b) for a, b in zip(base, variant) if a != b]
    assert diff == [("method: hdpissa", f"method: {method}")]
