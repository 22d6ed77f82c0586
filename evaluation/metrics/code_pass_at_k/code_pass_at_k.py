"""pass@k of generated code, in the call shape of the Hub's ``code_eval`` but with a real sandbox.

Every candidate + test program runs in its own sandboxed subprocess (see ``sandbox.py``); pass@k uses the unbiased
estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)``, computed as a product so large n does not overflow.
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import datasets
import evaluate
import numpy as np

from .sandbox import run_program

_DESCRIPTION = """Functional correctness of generated code: each candidate is concatenated with its test program and
executed in a sandboxed subprocess (time, memory, file-size and process limits; no network; fresh temp dir; minimal
environment). pass@k is the unbiased estimate of the chance that at least one of k samples passes."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list[list[str]]): candidates per task (n samples each; n may differ between tasks).
    references (list[str]): the test program per task; it is appended to each candidate (candidate + "\\n" + test),
        e.g. HumanEval's `test + f"\\ncheck({entry_point})"`.
    k (list[int] | int, default [1, 10, 100]): pass@k values to report; a k larger than the smallest n is skipped.
    num_workers (int, default 4): sandboxes run in parallel.
    timeout (float, default 3.0): wall-clock seconds per program (interpreter start-up included).
    memory_mb (int, default 2048): address-space limit per program.
Returns:
    (pass_at_k, results): pass_at_k = {"pass@1": float, ...};
    results = {task_idx: [(candidate_idx, {"task_id", "completion_id", "passed": bool, "result": str}), ...]} where
    result is "passed", "timed out" or "failed: <reason>".
Requires:
    the environment variable HF_ALLOW_CODE_EVAL=1 (explicit opt-in to executing model-generated code).
Example:
    >>> os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    >>> m = evaluate.load("evaluation/metrics/code_pass_at_k")
    >>> m.compute(predictions=[["def f(x):\\n    return x"]], references=["assert f(1) == 1"], k=[1])[0]
    {'pass@1': 1.0}
"""

_CITATION = """@misc{chen2021codex, title={Evaluating Large Language Models Trained on Code}, author={Mark Chen and
  others}, year={2021}, eprint={2107.03374}, archivePrefix={arXiv}}"""

OPT_IN_MESSAGE = """
################################################################################
                                  !!!WARNING!!!
################################################################################
code_pass_at_k executes untrusted, model-generated Python code. It runs every
program in a sandboxed subprocess (time/memory/file-size/process limits, no
network, temp dir, stripped environment), but that sandbox is a safety net for
mistakes, not a security boundary against deliberately malicious code (see the
metric's README for exactly what is and is not guaranteed). Run it inside a
container or VM you can throw away.

Once you have read this, opt in by setting the environment variable
HF_ALLOW_CODE_EVAL="1", e.g. `export HF_ALLOW_CODE_EVAL=1` in the shell or
`os.environ["HF_ALLOW_CODE_EVAL"] = "1"` in Python.
################################################################################"""


def estimate_pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as prod(1 - k / i) over i in (n-c, n] (no huge binomials)."""
    if num_samples - num_correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


def pass_at_k(num_samples: list[int], num_correct: list[int], ks: list[int]) -> dict[str, float]:
    """``{"pass@k": mean over tasks of the unbiased estimate}`` for each k that every task has samples for.

    The metric's aggregate, also used to combine per-task counts scored in several processes."""
    total, correct = np.array(num_samples), np.array(num_correct)
    return {f"pass@{kk}": float(np.mean([estimate_pass_at_k(n, c, kk) for n, c in zip(total, correct)]))
            for kk in ks if len(total) and (total >= kk).all()}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CodePassAtK(evaluate.Metric):
    """``evaluate`` front-end of the sandbox: fan candidates out to workers, aggregate pass@k."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://arxiv.org/abs/2107.03374"],
        )

    def _compute(self, predictions: list[list[str]], references: list[str], k: list[int] | int = (1, 10, 100),
                 num_workers: int = 4, timeout: float = 3.0, memory_mb: int = 2048) -> tuple[dict, dict]:
        if os.getenv("HF_ALLOW_CODE_EVAL", "0") != "1":
            raise ValueError(OPT_IN_MESSAGE)
        ks = [k] if isinstance(k, int) else list(k)
        jobs = [(task, cand, candidate + "\n" + test)
                for task, (candidates, test) in enumerate(zip(predictions, references))
                for cand, candidate in enumerate(candidates)]
        results: dict[int, list] = defaultdict(list)
        with ThreadPoolExecutor(max_workers=max(1, int(num_workers))) as pool:
            outcomes = pool.map(lambda job: run_program(job[2], timeout=timeout, memory_mb=memory_mb), jobs)
            for (task, cand, _), outcome in zip(jobs, outcomes):
                results[task].append((cand, {"task_id": task, "completion_id": cand, **outcome}))
        total = [len(c) for c in predictions]
        correct = [sum(r["passed"] for _, r in results[task]) for task in range(len(predictions))]
        return pass_at_k(total, correct, ks), dict(results)
