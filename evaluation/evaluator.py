"""``evaluate_model``: run tasks on a model (a directory or an already-loaded model) and collect scores + samples.

A trainer can call it in-process on the model it holds; the CLI (``python -m evaluation.run``) calls it on a
directory. Each task type has one small function: generate-then-score for math and code, log-likelihood ranking
for multiple choice. Scores always come from the bundled ``evaluate`` modules, never from ad-hoc code here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .config import EvalConfig
from .generation import generate, generate_vllm, loglikelihoods, vllm_available, vllm_blocker
from .metrics import load_metric
from .metrics.code_pass_at_k.code_pass_at_k import pass_at_k
from .metrics.code_pass_at_k.sandbox import describe_isolation
from .tasks import TaskSpec, build_prompt, code_candidate, code_test_program, get_task

DEFAULT_KS = (1, 10, 100)
logger = logging.getLogger(__name__)


def load_model(path: str, dtype: str | None = "auto", device: str | None = None, trust_remote_code: bool = False):
    """``AutoModelForCausalLM`` from a directory/hub id, on CUDA when available, in eval mode.

    A model that needs custom code is refused unless ``trust_remote_code=True`` (never an interactive prompt).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype in (None, "auto") else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def _task_name(task: str | TaskSpec) -> str:
    return task.name if isinstance(task, TaskSpec) else task.split("=", 1)[0].strip()


def _uses_chat(tokenizer, chat: bool) -> bool:
    return bool(chat and getattr(tokenizer, "chat_template", None))


def _check_code_opt_in(names: list[str]) -> None:
    """Refuse before spending time on generation if code could not be executed afterwards."""
    if os.getenv("HF_ALLOW_CODE_EVAL", "0") != "1":
        raise ValueError(f"Task(s) {', '.join(names)} execute model-written code, which needs your explicit opt-in: set "
                         f'HF_ALLOW_CODE_EVAL="1" in the environment (what the sandbox does and does not guarantee: '
                         f"evaluation/metrics/code_pass_at_k/README.md).")


def _prompts(spec: TaskSpec, rows: list[dict], tokenizer, chat: bool) -> tuple[list[str], bool]:
    shots = spec.fewshot_examples()
    built = [build_prompt(row, shots, tokenizer, chat) for row in rows]
    return [text for text, _ in built], (built[0][1] if built else True)


def _eval_math(metric, rows, prompts, generate_fn) -> list[tuple[int, dict]]:
    """``(row index, sample)`` of the rows this process generated (all of them without shards)."""
    generated = generate_fn(prompts, 1)
    own = [i for i, comps in enumerate(generated) if comps]
    completions = [generated[i][0] for i in own]
    scored = metric.compute(predictions=completions, references=[rows[i]["answer"] for i in own], return_details=True)
    return [(i, {"id": rows[i]["id"], "prompt": prompts[i], "completion": c, "gold": d["gold"],
                 "extracted": d["extracted"], "correct": d["correct"]})
            for i, c, d in zip(own, completions, scored["details"])]


def _eval_code(metric, rows, prompts, generate_fn, chat, num_samples, ks, timeout, workers,
               memory_mb) -> list[tuple[int, dict]]:
    """``(row index, sample)`` of the rows this process generated; their programs run here, in the sandbox."""
    generated = generate_fn(prompts, num_samples)
    own = [i for i, comps in enumerate(generated) if comps]
    if not own:
        return []
    candidates = [[code_candidate(rows[i], c, chat) for c in generated[i]] for i in own]
    _, details = metric.compute(
        predictions=candidates, references=[code_test_program(rows[i]) for i in own], k=list(ks),
        num_workers=workers, timeout=timeout, memory_mb=memory_mb)
    samples = []
    for j, i in enumerate(own):
        outcomes = [res for _, res in sorted(details.get(j, []), key=lambda x: x[0])]
        samples.append((i, {"id": rows[i]["id"], "prompt": prompts[i], "completions": generated[i],
                            "results": [{"passed": o["passed"], "result": o["result"]} for o in outcomes],
                            "num_passed": sum(o["passed"] for o in outcomes)}))
    return samples


def _eval_mc(spec, rows, prompts, model, tokenizer, chat, add_special, batch_size, show_progress, shard):
    """This process's share of the choices' log-likelihoods: ``(rows, requests)`` with ``rows`` the ``(index, id,
    prompt, choices, label)`` of every row it scored a choice of, ``requests`` the ``(index, loglik, tokens)``."""
    conts = [[c.lstrip() if chat else c for c in r["choices"]] for r in rows]
    requests = [(p, c) for p, cs in zip(prompts, conts) for c in cs]
    row_of = [i for i, cs in enumerate(conts) for _ in cs]
    flat = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, add_special_tokens=add_special,
                          show_progress=show_progress, desc=f"{spec.name}: scoring", shard=shard)
    done = [(j, ll[0], ll[1]) for j, ll in enumerate(flat) if ll is not None]
    touched = sorted({row_of[j] for j, _, _ in done})
    return ([(i, {"id": rows[i]["id"], "prompt": prompts[i], "choices": conts[i], "label": int(rows[i]["label"])})
             for i in touched], done)


def _merge_mc(metric, rows: dict[int, dict], requests: dict[int, tuple[float, int]]) -> tuple[dict, list[dict]]:
    """The task's numbers and samples from every row's choice log-likelihoods (all shards' together)."""
    ordered = [rows[i] for i in range(len(rows))]
    logliks, pos = [], 0
    for r in ordered:
        logliks.append([requests[pos + j][0] for j in range(len(r["choices"]))])
        pos += len(r["choices"])
    labels = [r["label"] for r in ordered]
    plain = metric.compute(predictions=logliks, references=labels, return_details=True)
    norm = metric.compute(predictions=logliks, references=labels,
                          lengths=[[len(c) for c in r["choices"]] for r in ordered])
    samples = [{**r, "logliks": ll, "predicted": d["predicted"], "correct": d["correct"]}
               for r, ll, d in zip(ordered, logliks, plain["details"])]
    return {"accuracy": plain["accuracy"], "accuracy_norm": norm["accuracy"]}, samples


def save_report(report: dict, path: str | os.PathLike) -> None:
    """Write a report as JSON atomically (temp file + rename): a crash never leaves a half-written results file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False, default=str)
    os.replace(tmp, path)


METRIC_OF_TYPE = {"math": "math_accuracy", "code": "code_pass_at_k", "mc": "multiple_choice"}


def evaluate_model(model_or_path, tokenizer=None, config: EvalConfig | Sequence[str | TaskSpec] | None = None,
                   **settings: Any) -> dict:
    """Score a model on ``config.tasks`` and return ``{"model", "config", "results", "samples"}``.

    ``config`` is an :class:`~evaluation.config.EvalConfig`; keyword ``settings`` set (or override) its fields, so
    ``evaluate_model(path, tasks=["gsm8k"], limit=50)`` and ``evaluate_model(path, None, ["gsm8k"], limit=50)`` (a
    list of tasks in place of the config) are shorthands. Every task's rows, few-shot examples, prompts and metric are
    prepared before anything is generated: a task whose data is missing fails the call before any time is spent.

    ``results[task] = {"metric", "value", "n", "dataset", "split", "type", "num_fewshot", "metrics"}`` where
    ``metric``/``value`` is the headline number (``accuracy`` or ``pass@1``) and ``metrics`` holds all of them.
    Code tasks need ``HF_ALLOW_CODE_EVAL=1``. A model or tokenizer that needs custom code is refused unless
    ``trust_remote_code=True``.

    With ``num_shards=K`` (K processes, each with its ``shard_index``) the call does only that shard's share of the
    work (generation, log-likelihoods, code execution) and returns a *partial* report; :func:`merge_reports` of all K
    gives the report of a one-process call on the same rows.
    """
    if isinstance(config, EvalConfig):
        cfg = dataclasses.replace(config, **settings) if settings else config
    else:
        cfg = EvalConfig(**({"tasks": config} if config is not None else {}), **settings)
    specs = [get_task(t, data_files=cfg.data_files.get(_task_name(t)), num_fewshot=cfg.num_fewshot)
             for t in cfg.tasks]
    code_tasks = [s.name for s in specs if s.type == "code"]
    if code_tasks:
        _check_code_opt_in(code_tasks)

    is_path = isinstance(model_or_path, (str, os.PathLike))
    path = os.fspath(model_or_path) if is_path else getattr(model_or_path, "name_or_path", None)
    if is_path and path.startswith((os.sep, ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"Model directory {path} does not exist (a local path, so not a Hub id).")
    if tokenizer is None:
        if not path:
            raise ValueError("Pass a tokenizer along with an in-memory model that has no name_or_path")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    use_vllm = _use_vllm(cfg.backend, is_path)
    state: dict = {"hf": None if is_path else model_or_path, "llm": None}
    shard = (cfg.shard_index, cfg.num_shards)

    def hf_model():
        if state["hf"] is None:
            state["hf"] = load_model(path, cfg.dtype, cfg.device, cfg.trust_remote_code)
        return state["hf"]

    # Every task's data first (rows, few-shot rows, prompts, metric), so a missing dataset stops the run here.
    started = time.time()
    chat_used = _uses_chat(tokenizer, cfg.chat)
    metrics_by_type = {t: load_metric(METRIC_OF_TYPE[t]) for t in sorted({s.type for s in specs})}
    prepared = []
    for spec in specs:
        rows = spec.load(cfg.limit)
        prepared.append((spec, rows, *_prompts(spec, rows, tokenizer, cfg.chat)))

    tasks = {}
    for spec, rows, prompts, add_special in prepared:
        stop = () if chat_used else spec.stop
        new_tokens = spec.max_new_tokens or cfg.max_new_tokens
        metric = metrics_by_type[spec.type]
        torch.manual_seed(cfg.seed)

        def generate_fn(texts: list[str], n: int, spec=spec, add_special=add_special, stop=stop,
                        new_tokens=new_tokens) -> list[list[str]]:
            if use_vllm:
                if state["llm"] is None:
                    from vllm import LLM

                    state["llm"] = LLM(model=path, dtype=cfg.dtype or "auto", seed=cfg.seed)
                own = [i for i in range(len(texts)) if i % shard[1] == shard[0]]  # vLLM batches by itself
                outs = generate_vllm(state["llm"], [texts[i] for i in own], new_tokens, n, cfg.temperature,
                                     cfg.top_p, stop, cfg.seed)
                out: list[list[str]] = [[] for _ in texts]
                for i, o in zip(own, outs):
                    out[i] = o
                return out
            return generate(hf_model(), tokenizer, texts, max_new_tokens=new_tokens, batch_size=cfg.batch_size,
                            num_samples=n, temperature=cfg.temperature, top_p=cfg.top_p, stop=stop,
                            add_special_tokens=add_special, show_progress=cfg.show_progress,
                            desc=f"{spec.name}: generating", shard=shard, seed=cfg.seed)

        dataset = spec.dataset if not spec.data_files else str(spec.data_files)
        task = {"type": spec.type, "n": len(rows), "dataset": dataset, "split": spec.split,
                "num_fewshot": spec.num_fewshot, "requests": None}
        if spec.type == "math":
            task["rows"] = _eval_math(metric, rows, prompts, generate_fn)
        elif spec.type == "code":
            task["ks"] = [kk for kk in (cfg.k or DEFAULT_KS) if kk <= cfg.num_samples] or [1]
            task["rows"] = _eval_code(metric, rows, prompts, generate_fn, chat_used, cfg.num_samples, task["ks"],
                                      cfg.code_timeout, cfg.code_workers, cfg.code_memory_mb)
            task["sandbox"] = describe_isolation()  # provenance: which sandbox layers were active for these numbers
        else:
            task["rows"], task["requests"] = _eval_mc(spec, rows, prompts, hf_model(), tokenizer, chat_used,
                                                      add_special, cfg.batch_size, cfg.show_progress, shard)
        tasks[spec.name] = task

    partial = {
        "model": path or type(model_or_path).__name__,
        "config": {"tasks": [s.name for s in specs], "limit": cfg.limit, "batch_size": cfg.batch_size,
                   "max_new_tokens": cfg.max_new_tokens, "num_samples": cfg.num_samples,
                   "temperature": cfg.temperature, "top_p": cfg.top_p, "chat": chat_used,
                   "num_fewshot": cfg.num_fewshot, "seed": cfg.seed, "backend": "vllm" if use_vllm else "transformers",
                   "seconds": round(time.time() - started, 2)},
        "shard": {"index": cfg.shard_index, "count": cfg.num_shards},
        "tasks": tasks,
    }
    report = merge_reports([partial]) if cfg.num_shards == 1 else partial
    if cfg.output_path:
        save_report(report, cfg.output_path)
    return report


def merge_reports(parts: Sequence[dict]) -> dict:
    """The report of one evaluation from the partial reports of all its shards (``evaluate_model`` with
    ``num_shards=K``, ``shard_index`` 0..K-1, in any order): equal to a one-process call's report on the same rows.

    Each shard computed its rows exactly as one process would (the same batches, see
    :func:`evaluation.generation.batch_plan`); here the rows are put back in order and every task's numbers are
    computed from all of them: math accuracy is the fraction of rows the metric judged correct, pass@k the code
    metric's own aggregate of the per-row counts, multiple choice the metric run on all rows' log-likelihoods.
    ``config.seconds`` is the slowest shard's time.
    """
    if not parts:
        raise ValueError("merge_reports needs at least one partial report (evaluate_model with num_shards > 1).")
    count = parts[0]["shard"]["count"]
    got = sorted(p["shard"]["index"] for p in parts)
    if got != list(range(count)) or any(p["shard"]["count"] != count for p in parts):
        raise ValueError(f"merge_reports needs the partial reports of shards 0..{count - 1} of one evaluation once "
                         f"each; got shards {got} (of {sorted({p['shard']['count'] for p in parts})}).")
    same = [{k: v for k, v in p["config"].items() if k != "seconds"} for p in parts]
    if any(c != same[0] for c in same) or len({p["model"] for p in parts}) > 1:
        raise ValueError("merge_reports got partial reports of different evaluations (model or settings differ).")
    results, samples = {}, {}
    for name, first in parts[0]["tasks"].items():
        rows: dict[int, dict] = {}
        requests: dict[int, tuple[float, int]] = {}
        for p in parts:
            rows.update((int(i), s) for i, s in p["tasks"][name]["rows"])
            requests.update((int(j), (ll, n)) for j, ll, n in p["tasks"][name]["requests"] or ())
        if sorted(rows) != list(range(first["n"])):
            raise ValueError(f"merge_reports: task {name!r} has {len(rows)} of its {first['n']} rows in these "
                             f"partial reports.")
        if first["type"] == "mc":
            task_metrics, task_samples = _merge_mc(load_metric("multiple_choice"), rows, requests)
            headline = "accuracy"
        else:
            task_samples = [rows[i] for i in range(first["n"])]
            if first["type"] == "math":  # the math metric's accuracy: the fraction of rows it judged correct
                correct = sum(s["correct"] for s in task_samples)
                task_metrics = {"accuracy": float(correct / len(task_samples) if task_samples else 0.0)}
                headline = "accuracy"
            else:
                task_metrics = pass_at_k([len(s["completions"]) for s in task_samples],
                                         [s["num_passed"] for s in task_samples], first["ks"])
                headline = "pass@1"
        results[name] = {"metric": headline, "value": float(task_metrics.get(headline, 0.0)), "n": first["n"],
                         "dataset": first["dataset"], "split": first["split"], "type": first["type"],
                         "num_fewshot": first["num_fewshot"], "metrics": task_metrics}
        if "sandbox" in first:
            results[name]["sandbox"] = first["sandbox"]
        samples[name] = task_samples
    config = {**parts[0]["config"], "seconds": max(p["config"]["seconds"] for p in parts)}
    return {"model": parts[0]["model"], "config": config, "results": results, "samples": samples}


def _use_vllm(backend: str, is_path: bool) -> bool:
    """Whether to generate with vLLM: never while this process trains or holds a GPU (see :func:`vllm_blocker`)."""
    if backend == "transformers" or not is_path or not vllm_available():
        if backend == "vllm":
            raise RuntimeError("backend='vllm' needs the vllm package, a CUDA device and a model path")
        return False
    reason = vllm_blocker()
    if reason is not None:
        if backend == "vllm":
            raise RuntimeError(f"backend='vllm' refused: {reason}. vLLM reserves most of a GPU's memory for its own "
                               f"engine; evaluate the saved model in its own process once training has ended "
                               f"(python -m evaluation.run --backend vllm --model DIR), or use backend='transformers'.")
        logger.warning("Evaluating with transformers, not vLLM: %s.", reason)
        return False
    return True


def summary_table(report: dict, print_fn: Callable[[str], None] = print) -> None:
    """One line per task: name, headline metric, value, n."""
    for name, res in report["results"].items():
        print_fn(f"{name:<20} {res['metric']:<10} {res['value']:.4f}  (n={res['n']}, {res['dataset']})")
