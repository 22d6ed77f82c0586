"""Tasks, generation and the runner, on a tiny random model built offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation.data import DatasetUnavailableError
from evaluation.evaluator import evaluate_model
from evaluation.generation import _StopOnStrings, generate, loglikelihoods, truncate_at_stop
from evaluation.tasks import (
    TaskSpec,
    build_prompt,
    code_candidate,
    code_test_program,
    extract_code,
    get_task,
    infer_task_type,
)
from hdpissa_trl.testing_utils import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 12 + 30?", "def add(a, b):\n    return", "the quick brown fox jumps over the lazy dog. THE QUICK",
           "0"]
# Code rows whose outcome does not depend on what the random model writes: the completion lands inside a raw string
# that the test program closes. Row 0's check holds (pass), row 1's does not (fail) -> pass@1 = 0.5 exactly.
CODE_ROWS = [{"prompt": 'def add(a, b):\n    return a + b\n\n\n_completion = r"""',
              "test": '"""\n\n\ndef check(f):\n    assert f(1, 2) == 3\n', "entry_point": "add"},
             {"prompt": 'def add(a, b):\n    return a + b\n\n\n_completion = r"""',
              "test": '"""\n\n\ndef check(f):\n    assert f(1, 2) == 4\n', "entry_point": "add"}]
MATH_ROWS = [{"prompt": f"What is {a} + {b}? Answer:", "answer": str(a + b)} for a, b in
             [(12, 30), (1, 1), (2, 3), (7, 8), (10, 5)]]
MC_ROWS = [{"prompt": "The sky is", "choices": [" blue", " the quick brown fox", " 0"], "label": 0},
           {"prompt": "2 + 2 =", "choices": [" 4", " 5", " 22"], "label": 1},
           {"prompt": "def add(a, b):", "choices": ["\n    return a + b", " pass"], "label": 0}]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Slow, obvious greedy decoding: full forward, argmax, append, until EOS."""
    ids, out = tokenizer(prompt)["input_ids"], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == model.generation_config.eos_token_id:
                break
            out.append(nxt)
    return tokenizer.decode(out, skip_special_tokens=True)


def reference_loglik(model, tokenizer, context: str, continuation: str) -> float:
    ctx, whole = tokenizer(context)["input_ids"], tokenizer(context + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return float(sum(logprobs[t - 1, whole[t]] for t in range(len(ctx), len(whole))))


def test_left_padded_batch_equals_unbatched_greedy(model, tokenizer):
    side = tokenizer.padding_side
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4, show_progress=False)
    single = [generate(model, tokenizer, [p], max_new_tokens=12, batch_size=1, show_progress=False)[0]
              for p in PROMPTS]
    assert batched == single
    assert [b[0] for b in batched] == [reference_greedy(model, tokenizer, p, 12) for p in PROMPTS]
    assert tokenizer.padding_side == side  # padding is done by hand: the caller's tokenizer is not mutated


def test_sampling_returns_num_samples(model, tokenizer):
    torch.manual_seed(0)
    out = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=6, num_samples=3, batch_size=2, show_progress=False)
    assert [len(o) for o in out] == [3, 3]


def test_stop_sequences_truncate_output(model, tokenizer):
    full = generate(model, tokenizer, [PROMPTS[0]], max_new_tokens=24, show_progress=False)[0][0]
    assert len(full) >= 8, full
    stop = full[5:7]
    expected = full[: full.find(stop)]
    got = generate(model, tokenizer, [PROMPTS[0]], max_new_tokens=24, stop=[stop], show_progress=False)[0][0]
    assert got == expected and stop not in got
    assert truncate_at_stop("abc\ndef x\nclass", ["\nclass", "\ndef"]) == "abc"
    assert truncate_at_stop("no stop here", ["\ndef", ""]) == "no stop here"


def test_stop_criterion_looks_only_at_generated_tokens(tokenizer):
    prompt = tokenizer("x\ndef y")["input_ids"]
    criterion = _StopOnStrings(tokenizer, ["\ndef"], prompt_length=len(prompt))
    assert not criterion(torch.tensor([prompt + tokenizer("abc")["input_ids"]]), None).item()
    assert criterion(torch.tensor([prompt + tokenizer("a\ndef b")["input_ids"]]), None).item()


def test_loglikelihoods_match_unbatched_reference(model, tokenizer):
    requests = [("The sky is", " blue"), ("2 + 2 =", " 4"), ("def add(a, b):", "\n    return a + b"),
                ("the quick brown fox jumps over the lazy dog.", " THE QUICK BROWN FOX")]
    got = loglikelihoods(model, tokenizer, requests, batch_size=3, show_progress=False)
    for (ctx, cont), (ll, n) in zip(requests, got):
        assert n > 0
        assert ll == pytest.approx(reference_loglik(model, tokenizer, ctx, cont), abs=1e-4)


def test_multiple_choice_task_scores_by_loglik(model, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    report = evaluate_model(model, tokenizer, [f"q={path}"], show_progress=False)
    res = report["results"]["q"]
    logliks = [[reference_loglik(model, tokenizer, r["prompt"], c) for c in r["choices"]] for r in MC_ROWS]
    predicted = [max(range(len(ll)), key=ll.__getitem__) for ll in logliks]
    expected = sum(p == r["label"] for p, r in zip(predicted, MC_ROWS)) / len(MC_ROWS)
    assert (res["type"], res["metric"], res["n"]) == ("mc", "accuracy", 3)
    assert res["value"] == pytest.approx(expected, abs=1e-12)
    assert [s["predicted"] for s in report["samples"]["q"]] == predicted
    norm = [max(range(len(ll)), key=lambda i, ll=ll, r=r: ll[i] / len(r["choices"][i]))
            for ll, r in zip(logliks, MC_ROWS)]
    assert res["metrics"]["accuracy_norm"] == pytest.approx(
        sum(p == r["label"] for p, r in zip(norm, MC_ROWS)) / 3, abs=1e-12)


def test_local_task_type_inference(tmp_path):
    assert infer_task_type({"prompt": "p", "answer": 3}) == "math"
    assert infer_task_type({"prompt": "p", "test": "t", "entry_point": "f"}) == "code"
    assert infer_task_type({"prompt": "p", "choices": ["a"], "label": 0}) == "mc"
    with pytest.raises(ValueError, match="Cannot infer"):
        infer_task_type({"prompt": "p", "solution": "x"})
    spec = get_task(f"demo={write_jsonl(tmp_path / 'm.jsonl', MATH_ROWS)}")
    rows = spec.load(limit=2)
    assert (spec.name, spec.type, len(rows)) == ("demo", "math", 2)
    assert rows[0]["answer"] == "42" and rows[0]["chat_prompt"] == rows[0]["prompt"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "choices": ["a", "b"], "label": 5}])
    with pytest.raises(ValueError, match="out of range"):
        get_task(f"bad={bad}").load()


def test_builtin_task_on_local_files_with_fewshot(tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}])
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}])
    spec = get_task("gsm8k", data_files={"test": test, "train": train}, num_fewshot=1)
    rows, shots = spec.load(), spec.fewshot_examples()
    prompt, add_special = build_prompt(rows[0], shots)
    assert add_special and prompt.count("### Instruction:") == 2
    assert prompt.index("What is 1 + 1?") < prompt.index("#### 2") < prompt.index("What is 2 + 2?")
    assert rows[0]["answer"].endswith("#### 4")
    with pytest.raises(ValueError, match="leak|few-shot"):  # shots must not come from the evaluation file itself
        get_task("gsm8k", data_files=test, num_fewshot=1).fewshot_examples()


def test_chat_template_used_only_when_requested(tokenizer):
    row = {"prompt": "plain prompt", "chat_prompt": "chat question"}
    shot = {"prompt": "p0", "chat_prompt": "q0", "target": " a0"}
    text, add_special = build_prompt(row, [shot], tokenizer, chat=True)
    assert not add_special
    assert text == ("<|im_start|>user\nq0<|im_end|>\n<|im_start|>assistant\na0<|im_end|>\n"
                    "<|im_start|>user\nchat question<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt(row, [shot], tokenizer, chat=False) == ("p0 a0\n\nplain prompt", True)


def test_humaneval_loads_offline_and_programs_are_assembled():
    rows = get_task("humaneval").load()
    assert len(rows) == 164 and rows[0]["id"] == "HumanEval/0"
    row = rows[0]
    program = code_candidate(row, "    return True\n") + code_test_program(row)
    assert program.startswith(row["prompt"] + "    return True\n") and program.endswith("check(has_close_elements)\n")
    chat_reply = "Sure:\n```python\ndef has_close_elements(numbers, threshold):\n    return False\n```\nDone."
    assert extract_code(chat_reply) == "def has_close_elements(numbers, threshold):\n    return False\n"
    assert code_candidate(row, chat_reply, chat=True).endswith("\n    return False\n")


def test_missing_dataset_offline_gives_actionable_error():
    spec = TaskSpec("nowhere", "math", "hdpissa-tests/no-such-dataset-anywhere")
    with pytest.raises(DatasetUnavailableError, match="--data_files nowhere="):
        spec.load(limit=1)


def test_code_tasks_refuse_before_generating_without_opt_in(model, tokenizer, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(ValueError, match="HF_ALLOW_CODE_EVAL=\"1\""):
        evaluate_model(model, tokenizer, ["humaneval"], limit=1, show_progress=False)


def test_runner_cli_writes_eval_results(tmp_path, tokenizer):
    model_dir = tmp_path / "model"
    build_tiny_model("llama", seed=1, tokenizer=tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    math_file = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    code_file = write_jsonl(tmp_path / "code.jsonl", CODE_ROWS)
    mc_file = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    output = tmp_path / "eval_results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ALLOW_CODE_EVAL": "1"}
    cmd = [sys.executable, "-m", "evaluation.run", "--model", str(model_dir), "--tasks",
           f"arith={math_file},code={code_file},mc={mc_file}", "--limit", "2", "--max_new_tokens", "16",
           "--output", str(output), "--no_progress"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert set(report) == {"model", "config", "results", "samples"}
    assert set(report["results"]) == {"arith", "code", "mc"}
    for name, res in report["results"].items():
        assert res["n"] == 2 and len(report["samples"][name]) == 2  # --limit
        assert {"metric", "value", "n", "dataset", "split", "type", "metrics"} <= set(res)
    arith = report["results"]["arith"]
    assert arith["metric"] == "accuracy" and arith["dataset"] == math_file
    assert arith["value"] == sum(s["correct"] for s in report["samples"]["arith"]) / 2
    assert report["results"]["code"]["metric"] == "pass@1" and report["results"]["code"]["value"] == 0.5
    assert [s["num_passed"] for s in report["samples"]["code"]] == [1, 0]
    assert "arith" in done.stdout and "pass@1" in done.stdout


def test_chat_mode_end_to_end(model, tokenizer, tmp_path):
    math_file = write_jsonl(tmp_path / "m.jsonl", MATH_ROWS)
    mc_file = write_jsonl(tmp_path / "q.jsonl", MC_ROWS)
    report = evaluate_model(model, tokenizer, [f"m={math_file}", f"q={mc_file}"], limit=1, chat=True,
                            max_new_tokens=4, show_progress=False)
    assert report["config"]["chat"] is True
    for name in ("m", "q"):
        prompt = report["samples"][name][0]["prompt"]
        assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert report["samples"]["q"][0]["choices"] == ["blue", "the quick brown fox", "0"]  # no leading space in chat


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generation_and_scoring_on_cuda_match_cpu(model, tokenizer):
    cpu = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4, show_progress=False)
    cuda_model = build_tiny_model("llama", seed=0, tokenizer=tokenizer).cuda().eval()
    assert generate(cuda_model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4, show_progress=False) == cpu
    requests = [("The sky is", " blue"), ("2 + 2 =", " 4")]
    for (a, _), (b, _) in zip(loglikelihoods(model, tokenizer, requests, show_progress=False),
                              loglikelihoods(cuda_model, tokenizer, requests, show_progress=False)):
        assert a == pytest.approx(b, abs=1e-3)
