"""Score any causal-LM directory (or an already-loaded model) on math, code and multiple-choice tasks.

Independent of ``hdpissa_trl`` on purpose: it evaluates whatever ``AutoModelForCausalLM`` it is given, so baselines
and models trained elsewhere are measured by the same code. Metrics are local ``evaluate`` modules
(``evaluation/metrics``). Heavy imports (torch, transformers) happen only when the API is first used.

    from evaluation import EvalConfig, evaluate_model
    report = evaluate_model("path/to/model", config=EvalConfig(tasks=["gsm8k", "demo=data/demo.jsonl"], limit=50))
    report = evaluate_model("path/to/model", tasks=["gsm8k"], limit=50)  # the same, fields as keywords
    # K processes, each its share of the rows; the merged report equals the one-process report:
    part = evaluate_model("path/to/model", tasks=["gsm8k"], shard_index=k, num_shards=K)
    report = merge_reports([part_0, ..., part_K_minus_1])
"""

from __future__ import annotations

__all__ = ["EvalConfig", "evaluate_model", "merge_reports", "save_report", "TaskSpec", "get_task", "load_metric",
           "metric_path"]


def __getattr__(name: str):
    if name in ("evaluate_model", "merge_reports", "save_report"):
        from . import evaluator

        return getattr(evaluator, name)
    if name == "EvalConfig":
        from .config import EvalConfig

        return EvalConfig
    if name in ("TaskSpec", "get_task"):
        from . import tasks

        return getattr(tasks, name)
    if name in ("load_metric", "metric_path"):
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
