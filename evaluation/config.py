"""What the user sets for an evaluation run: one dataclass, validated on construction (``EvalConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("auto", "transformers", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class EvalConfig:
    """Settings of :func:`evaluation.evaluate_model` (and of ``python -m evaluation.run``).

    Parameters (grouped by concern):
        What to score:
            tasks: built-in names (``gsm8k``, ``math``, ``humaneval``, ``mmlu``/``mc``), ``"name=path.jsonl"`` local
                tasks, or :class:`~evaluation.tasks.TaskSpec` objects; a comma-separated string is split.
            limit: score only the first ``limit`` rows of each task.
            num_fewshot: override the tasks' number of few-shot examples.
            data_files: ``{task: path | [paths] | {split: path}}`` pointing built-in tasks at local files.
            chat: wrap prompts in the tokenizer's chat template (when it has one).
        Generation:
            batch_size, max_new_tokens: batching and generation budget per example.
            num_samples: completions per code prompt (pass@k); 1 means greedy. Math and multiple choice are greedy.
            k: the k values of pass@k (default 1, 10, 100, those ≤ ``num_samples``).
            temperature, top_p: sampling settings when ``num_samples > 1``.
            seed: seeds torch before each task.
        Model:
            dtype, device, backend: how a model *path* is loaded and run (vLLM only when installed, with CUDA).
            trust_remote_code: allow a model or tokenizer that needs custom code.
        Code execution (sandboxed, opt-in with ``HF_ALLOW_CODE_EVAL=1``):
            code_timeout, code_workers, code_memory_mb: per-program time limit, parallel programs, memory cap.
        Output:
            show_progress: progress bars; output_path: write the report there (atomically) as JSON.
        Several processes:
            shard_index, num_shards: do only this shard's share of the work and return a partial report;
                :func:`evaluation.merge_reports` of all ``num_shards`` gives the one-process report.
    """

    tasks: list[Any] = field(
        default_factory=lambda: ["gsm8k"],
        metadata={"help": "Tasks: gsm8k, math, humaneval, mmlu|mc, NAME=FILE (comma-separated on the command line)."},
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N rows of each task."})
    num_fewshot: int | None = field(
        default=None, metadata={"help": "Override the tasks' number of few-shot examples."}
    )
    data_files: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Point a task at local json/jsonl/parquet/csv files: TASK=PATH."}
    )
    chat: bool = field(default=False, metadata={"help": "Wrap prompts in the tokenizer's chat template if it has one."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation / scoring batch."})
    max_new_tokens: int = field(default=512, metadata={"help": "Generation budget per example."})
    num_samples: int = field(
        default=1, metadata={"help": "Samples per code prompt (pass@k); 1 = greedy."}
    )
    k: list[int] | None = field(
        default=None, metadata={"help": "k values for pass@k (default 1,10,100 up to num_samples)."}
    )
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature when num_samples > 1."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling threshold when num_samples > 1."})
    seed: int = field(default=0, metadata={"help": "Seed of torch before each task."})
    dtype: str | None = field(default="auto", metadata={"help": "dtype of a model loaded from a path (auto: as saved)."})
    device: str | None = field(default=None, metadata={"help": "Device of a loaded model (default: cuda if available)."})
    backend: str = field(
        default="auto", metadata={"help": "auto (vLLM only if installed and CUDA is available), transformers, vllm."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow a model or tokenizer that needs custom code."}
    )
    code_timeout: float = field(default=10.0, metadata={"help": "Seconds per sandboxed program."})
    code_workers: int = field(default=2, metadata={"help": "Sandboxed programs run in parallel."})
    code_memory_mb: int = field(default=2048, metadata={"help": "Memory cap (MiB) of one sandboxed program."})
    show_progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    output_path: str | None = field(default=None, metadata={"help": "Write the JSON report here (atomically)."})
    shard_index: int = field(default=0, metadata={"help": "This process's shard, 0 .. num_shards - 1."})
    num_shards: int = field(
        default=1, metadata={"help": "Split the work over this many processes; each returns a partial report for "
                                     "evaluation.merge_reports."})

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        else:
            self.tasks = list(self.tasks)
        if not self.tasks:
            raise ValueError("EvalConfig.tasks is empty: name at least one task (e.g. tasks=['gsm8k']).")
        if self.backend not in BACKENDS:
            raise ValueError(f"EvalConfig.backend must be one of {BACKENDS}, got {self.backend!r}.")
        if self.dtype not in (None, *DTYPES):
            raise ValueError(f"EvalConfig.dtype must be one of {DTYPES}, got {self.dtype!r}.")
        for name in ("batch_size", "max_new_tokens", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"EvalConfig needs 0 <= shard_index < num_shards, got shard_index={self.shard_index!r}, "
                             f"num_shards={self.num_shards!r}.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EvalConfig.limit must be >= 1 (or None for all rows), got {self.limit!r}.")
        self.data_files = dict(self.data_files or {})
