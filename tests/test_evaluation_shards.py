"""One evaluation split over K processes (evaluation/evaluator.py ``merge_reports``, evaluation/generation.py
``batch_plan``): every shard does batches of the one-process plan, and the merged report equals a one-process call's.

The shards run one after another in this process here; the real K-process run (the recipe, 2 processes, a short
``ddp_timeout``) is ``tests/test_recipe.py::test_no_process_waits_in_a_collective_while_another_evaluates``.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from evaluation import EvalConfig, evaluate_model, merge_reports, save_report
from evaluation.generation import batch_plan, generate, vllm_blocker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "recipes", "demo", "data")
TASKS = [f"math={DEMO}/math_test.jsonl", f"code={DEMO}/code_test.jsonl", f"text={DEMO}/text_test.jsonl"]


def without_seconds(report: dict) -> dict:
    report = json.loads(json.dumps(report, default=str))
    report["config"].pop("seconds")
    return report


def test_batch_plan_shards_are_the_one_process_batches():
    lengths = [random.Random(0).randint(1, 30) for _ in range(23)]
    one = batch_plan(lengths, 4)
    assert [n for n, _ in one] == list(range(6)) and sorted(i for _, b in one for i in b) == list(range(23))
    assert all(lengths[b[0]] >= lengths[b[-1]] for _, b in one)  # longest first: little padding
    shards = [batch_plan(lengths, 4, (k, 3)) for k in range(3)]
    assert sorted(b for s in shards for b in s) == sorted(one)  # the same batches, each in exactly one shard
    assert [n for n, _ in shards[1]] == [1, 4]
    assert batch_plan(lengths, 4, (5, 7)) == [(5, one[5][1])] and batch_plan([], 4, (0, 2)) == []
    with pytest.raises(ValueError, match="shard index must be in"):
        batch_plan(lengths, 4, (3, 3))


def test_shards_merged_equal_the_one_process_report(model, tokenizer, monkeypatch, tmp_path):
    """Math, code (its programs run in each shard's sandbox) and multiple choice (a row's choices may be scored by
    different shards), 3 shards merged in any order, also after a JSON round trip: the one-process report, every
    sample and number equal."""
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    config = EvalConfig(tasks=TASKS, limit=7, max_new_tokens=8, batch_size=2, show_progress=False)
    one = evaluate_model(model, tokenizer, config)
    parts = [evaluate_model(model, tokenizer, config, shard_index=k, num_shards=3) for k in range(3)]
    assert all("results" not in p for p in parts)  # partial reports
    assert [len(p["tasks"]["math"]["rows"]) for p in parts] == [3, 2, 2]  # the work is split, not done three times
    text_rows = [i for p in parts for i, _ in p["tasks"]["text"]["rows"]]
    assert len(text_rows) > 7  # some rows' choices were scored by two shards
    merged = merge_reports([parts[2], parts[0], parts[1]])
    assert without_seconds(merged) == without_seconds(one)
    assert merged["results"]["text"]["metrics"].keys() == {"accuracy", "accuracy_norm"}
    assert merged["results"]["code"]["sandbox"] == one["results"]["code"]["sandbox"]
    for k, p in enumerate(parts):
        save_report(p, tmp_path / f"part{k}.json")
    loaded = [json.loads((tmp_path / f"part{k}.json").read_text()) for k in range(3)]
    assert without_seconds(merge_reports(loaded)) == without_seconds(one)


def test_one_process_numbers_are_the_metrics_own(model, tokenizer):
    """The report's math accuracy (merged from per-row judgements) is what the metric computes on all rows at once."""
    from evaluation import load_metric

    report = evaluate_model(model, tokenizer, tasks=[TASKS[0]], limit=9, max_new_tokens=8, show_progress=False)
    samples = report["samples"]["math"]
    direct = load_metric("math_accuracy").compute(predictions=[s["completion"] for s in samples],
                                                  references=[s["gold"] for s in samples])
    assert report["results"]["math"]["value"] == direct["accuracy"]


def test_sampled_completions_do_not_depend_on_the_number_of_shards(model, tokenizer):
    """With sampling, batch b is drawn from seed + b: a prompt gets the same samples whichever shard draws it."""
    prompts = [f"def f{i}(x):" + " pass" * (i % 4) for i in range(5)]
    kwargs = dict(max_new_tokens=4, batch_size=2, num_samples=3, temperature=1.0, top_p=1.0, show_progress=False,
                  seed=11)
    one = generate(model, tokenizer, prompts, **kwargs)
    shards = [generate(model, tokenizer, prompts, shard=(k, 2), **kwargs) for k in range(2)]
    assert all(len(s) == 3 for s in one) and len({tuple(s) for s in one}) > 1
    assert [a or b for a, b in zip(*shards)] == one
    assert all(bool(a) != bool(b) for a, b in zip(*shards))  # each prompt in exactly one shard


def test_merge_refuses_missing_repeated_or_foreign_shards(model, tokenizer):
    config = EvalConfig(tasks=[TASKS[0]], limit=4, max_new_tokens=4, batch_size=2, show_progress=False)
    parts = [evaluate_model(model, tokenizer, config, shard_index=k, num_shards=2) for k in range(2)]
    with pytest.raises(ValueError, match=r"shards 0\.\.1 of one evaluation once each; got shards \[0\]"):
        merge_reports(parts[:1])
    with pytest.raises(ValueError, match=r"got shards \[1, 1\]"):
        merge_reports([parts[1], parts[1]])
    other = evaluate_model(model, tokenizer, config, shard_index=1, num_shards=2, max_new_tokens=5)
    with pytest.raises(ValueError, match="different evaluations"):
        merge_reports([parts[0], other])
    with pytest.raises(ValueError, match="at least one partial report"):
        merge_reports([])
    with pytest.raises(ValueError, match="0 <= shard_index < num_shards"):
        EvalConfig(shard_index=2, num_shards=2)


def test_vllm_never_starts_in_a_process_that_trains_or_holds_gpu_memory(model, tokenizer, monkeypatch, tmp_path):
    """The rule (vllm_blocker): no vLLM engine while a torch.distributed group is up in the process or it holds GPU
    memory. backend='vllm' is then refused before anything is loaded; 'auto' falls back to transformers."""
    import torch.distributed as dist

    from evaluation import evaluator
    from hdpissa_trl.launch import free_port

    assert vllm_blocker() is None
    # GPU memory held by this process (faked at the one call that reads it: there is no GPU here).
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 3 * 2**30 if i == 1 else 0)
    assert "already holds GPU memory (3.0 GiB on cuda:1" in vllm_blocker()
    monkeypatch.undo()
    # A process group (a training run): a real one-process gloo group.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert "torch.distributed process group is up" in vllm_blocker()
        monkeypatch.setattr(evaluator, "vllm_available", lambda: True)
        monkeypatch.setattr(evaluator, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
        model_dir = tmp_path / "m"
        model_dir.mkdir()
        with pytest.raises(RuntimeError, match=r"backend='vllm' refused: a torch.distributed .*python -m "
                                               r"evaluation.run --backend vllm"):
            evaluate_model(str(model_dir), tokenizer, tasks=[TASKS[0]], limit=2, backend="vllm")
        assert evaluator._use_vllm("auto", True) is False
    finally:
        dist.destroy_process_group()
