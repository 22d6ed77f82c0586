"""The evaluation settings and command line (evaluation/config.py, evaluation/run.py): EvalConfig and its keyword
shorthand, every task's data checked before anything is generated, one-line command-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation import EvalConfig, evaluate_model, save_report
from evaluation.data import DatasetUnavailableError
from evaluation.generation import _StopOnStrings, generate
from hdpissa_trl.testing_utils import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
MATH_ROWS = [{"prompt": f"What is {a} + {b}? Answer:", "answer": str(a + b)} for a, b in [(12, 30), (1, 1)]]


@pytest.fixture
def math_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    return str(path)


def test_eval_config_validates_and_splits_tasks():
    assert EvalConfig(tasks="gsm8k, humaneval,,mc").tasks == ["gsm8k", "humaneval", "mc"]
    with pytest.raises(ValueError, match="EvalConfig.backend must be one of"):
        EvalConfig(backend="tgi")
    with pytest.raises(ValueError, match="EvalConfig.num_samples must be >= 1"):
        EvalConfig(num_samples=0)
    with pytest.raises(ValueError, match="EvalConfig.tasks is empty"):
        EvalConfig(tasks="")
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(EvalConfig))


def test_config_keywords_and_task_list_are_the_same_call(model, tokenizer, math_file):
    config = EvalConfig(tasks=[f"m={math_file}"], limit=1, max_new_tokens=4, show_progress=False)
    a = evaluate_model(model, tokenizer, config)
    b = evaluate_model(model, tokenizer, tasks=[f"m={math_file}"], limit=1, max_new_tokens=4, show_progress=False)
    c = evaluate_model(model, tokenizer, [f"m={math_file}"], limit=1, max_new_tokens=4, show_progress=False)
    d = evaluate_model(model, tokenizer, EvalConfig(tasks=[f"m={math_file}"]), limit=1, max_new_tokens=4,
                       show_progress=False)  # keywords override the config's fields
    for report in (b, c, d):
        assert report["samples"] == a["samples"] and report["results"] == a["results"]
    assert a["config"]["limit"] == 1 and a["results"]["m"]["n"] == 1
    with pytest.raises(TypeError, match="unexpected keyword argument 'limt'"):
        evaluate_model(model, tokenizer, tasks=[f"m={math_file}"], limt=1)


def test_every_task_is_loaded_before_anything_is_generated(model, tokenizer, math_file, monkeypatch):
    """A task whose data is unavailable stops the call before the first task generates (its score would be lost)."""
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    calls = []
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1))
    with pytest.raises(DatasetUnavailableError, match="Task 'mc': dataset 'cais/mmlu'"):
        evaluate_model(model, tokenizer, [f"m={math_file}", "humaneval", "mc"], limit=1, show_progress=False)
    assert calls == []


def test_save_report_is_atomic_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "eval_results.json"
    save_report({"results": {"x": 1.0}}, path)
    save_report({"results": {"x": 2.0}}, path)
    assert json.loads(path.read_text()) == {"results": {"x": 2.0}}
    assert os.listdir(path.parent) == ["eval_results.json"]


def test_generation_pads_with_a_copy_when_the_tokenizer_has_no_pad_token(model, tokenizer):
    prompts = ["What is 12 + 30?", "0"]
    expected = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=1, show_progress=False)
    import copy

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    assert generate(model, no_pad, prompts, max_new_tokens=6, batch_size=2, show_progress=False) == expected
    assert no_pad.pad_token_id is None  # the caller's tokenizer is not changed


def test_stop_strings_starting_in_the_prompt_do_not_stop_generation(tokenizer):
    """Why ``_StopOnStrings`` stays: transformers' built-in stop strings also match across the prompt boundary."""
    from transformers import StopStringCriteria

    prompt = tokenizer('def f():\n    """doc"""\n')["input_ids"]
    first = tokenizer("# note")["input_ids"][:1]  # "#": with the prompt's final newline it reads "\n#"
    ids = torch.tensor([prompt + first])
    assert bool(StopStringCriteria(tokenizer, ["\n#"])(ids, None)[0])  # if this fails, the built-in can replace ours
    assert not _StopOnStrings(tokenizer, ["\n#"], prompt_length=len(prompt))(ids, None)[0]


def run_cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ALLOW_CODE_EVAL": "1"}
    return subprocess.run([sys.executable, "-m", "evaluation.run", "--no_progress", "--output",
                           str(tmp_path / "eval_results.json"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("model")
    build_tiny_model("llama", seed=1, tokenizer=tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("args,message", [
    (["--tasks", "humaneval,mc"], "error: Task 'mc': dataset 'cais/mmlu' (config='all', split='test') is unavailable"),
    (["--tasks", "humaneval,nosuchtask"], "error: Unknown task 'nosuchtask'"),
    (["--tasks", "gsm8k", "--data_files", "gsm8k"], "error: --data_files expects TASK=VALUE, got 'gsm8k'"),
    (["--tasks", "q=missing.jsonl"], "error: Data file(s) for task 'q' not found"),
    (["--tasks", "gsm8k", "--limit", "0"], "error: EvalConfig.limit must be >= 1"),
])
def test_cli_errors_are_one_line_and_nothing_is_written(tmp_path, model_dir, args, message):
    proc = run_cli(tmp_path, "--model", model_dir, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m evaluation.run: error: ") and message in lines[0], lines
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "eval_results.json").exists()


def test_cli_bad_model_path_is_one_line(tmp_path, math_file):
    proc = run_cli(tmp_path, "--model", str(tmp_path / "no-model-here"), "--tasks", f"m={math_file}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "no-model-here" in proc.stderr
