"""``evaluate_model``: run tasks on a model (a directory or an already-loaded model) and collect scores + samples.

A trainer can call it in-process on the model it holds; the CLI (``python -m evaluation.run``) calls it on a
directory. Each task type has one small function: generate-then-score for math and code, log-likelihood ranking
for multiple choice. Scores always come from the bundled ``evaluate`` modules, never from ad-hoc code here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .config import EvalConfig
from .generation import generate, generate_vllm, loglikelihoods, vllm_available
from .metrics import load_metric
from .metrics.code_pass_at_k.sandbox import describe_isolation
from .tasks import TaskSpec, build_prompt, code_candidate, code_test_program, get_task

DEFAULT_KS = (1, 10, 100)


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


def _eval_math(metric, rows, prompts, generate_fn) -> tuple[dict, list[dict]]:
    completions = [c[0] for c in generate_fn(prompts, 1)]
    scored = metric.compute(predictions=completions, references=[r["answer"] for r in rows],
                                                  return_details=True)
    samples = [{"id": r["id"], "prompt": p, "completion": c, "gold": d["gold"], "extracted": d["extracted"],
                "correct": d["correct"]} for r, p, c, d in zip(rows, prompts, completions, scored["details"])]
    return {"accuracy": scored["accuracy"]}, samples


def _eval_code(metric, rows, prompts, generate_fn, chat, num_samples, ks, timeout, workers, memory_mb):
    completions = generate_fn(prompts, num_samples)
    candidates = [[code_candidate(r, c, chat) for c in comps] for r, comps in zip(rows, completions)]
    pass_at_k, details = metric.compute(
        predictions=candidates, references=[code_test_program(r) for r in rows], k=list(ks), num_workers=workers,
        timeout=timeout, memory_mb=memory_mb)
    samples = []
    for i, (r, p, comps) in enumerate(zip(rows, prompts, completions)):
        outcomes = [res for _, res in sorted(details.get(i, []), key=lambda x: x[0])]
        samples.append({"id": r["id"], "prompt": p, "completions": comps,
                        "results": [{"passed": o["passed"], "result": o["result"]} for o in outcomes],
                        "num_passed": sum(o["passed"] for o in outcomes)})
    return pass_at_k, samples


def _eval_mc(metric, spec, rows, prompts, model, tokenizer, chat, add_special, batch_size, show_progress):
    conts = [[c.lstrip() if chat else c for c in r["choices"]] for r in rows]
    requests = [(p, c) for p, cs in zip(prompts, conts) for c in cs]
    flat = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, add_special_tokens=add_special,
                          show_progress=show_progress, desc=f"{spec.name}: scoring")
    logliks, pos = [], 0
    for cs in conts:
        logliks.append([ll for ll, _ in flat[pos:pos + len(cs)]])
        pos += len(cs)
    labels = [int(r["label"]) for r in rows]
    plain = metric.compute(predictions=logliks, references=labels, return_details=True)
    norm = metric.compute(predictions=logliks, references=labels, lengths=[[len(c) for c in cs] for cs in conts])
    samples = [{"id": r["id"], "prompt": p, "choices": cs, "label": lab, "logliks": ll, "predicted": d["predicted"],
                "correct": d["correct"]}
               for r, p, cs, lab, ll, d in zip(rows, prompts, conts, labels, logliks, plain["details"])]
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
    if cfg.backend == "vllm" and not (is_path and vllm_available()):
        raise RuntimeError("backend='vllm' needs the vllm package, a CUDA device and a model path")
    use_vllm = is_path and cfg.backend != "transformers" and vllm_available()
    state: dict = {"hf": None if is_path else model_or_path, "llm": None}

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

    results, samples = {}, {}
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
                return generate_vllm(state["llm"], texts, new_tokens, n, cfg.temperature, cfg.top_p, stop, cfg.seed)
            return generate(hf_model(), tokenizer, texts, max_new_tokens=new_tokens, batch_size=cfg.batch_size,
                            num_samples=n, temperature=cfg.temperature, top_p=cfg.top_p, stop=stop,
                            add_special_tokens=add_special, show_progress=cfg.show_progress,
                            desc=f"{spec.name}: generating")

        if spec.type == "math":
            task_metrics, task_samples = _eval_math(metric, rows, prompts, generate_fn)
            headline = "accuracy"
        elif spec.type == "code":
            ks = [kk for kk in (cfg.k or DEFAULT_KS) if kk <= cfg.num_samples] or [1]
            task_metrics, task_samples = _eval_code(metric, rows, prompts, generate_fn, chat_used, cfg.num_samples,
                                                    ks, cfg.code_timeout, cfg.code_workers, cfg.code_memory_mb)
            headline = "pass@1"
        else:
            task_metrics, task_samples = _eval_mc(metric, spec, rows, prompts, hf_model(), tokenizer, chat_used,
                                                  add_special, cfg.batch_size, cfg.show_progress)
            headline = "accuracy"
        dataset = spec.dataset if not spec.data_files else str(spec.data_files)
        results[spec.name] = {"metric": headline, "value": float(task_metrics.get(headline, 0.0)), "n": len(rows),
                              "dataset": dataset, "split": spec.split, "type": spec.type,
                              "num_fewshot": spec.num_fewshot, "metrics": task_metrics}
        if spec.type == "code":  # provenance: which sandbox layers were active for these numbers
            results[spec.name]["sandbox"] = describe_isolation()
        samples[spec.name] = task_samples

    report = {
        "model": path or type(model_or_path).__name__,
        "config": {"tasks": [s.name for s in specs], "limit": cfg.limit, "batch_size": cfg.batch_size,
                   "max_new_tokens": cfg.max_new_tokens, "num_samples": cfg.num_samples,
                   "temperature": cfg.temperature, "top_p": cfg.top_p, "chat": chat_used,
                   "num_fewshot": cfg.num_fewshot, "seed": cfg.seed, "backend": "vllm" if use_vllm else "transformers",
                   "seconds": round(time.time() - started, 2)},
        "results": results,
        "samples": samples,
    }
    if cfg.output_path:
        save_report(report, cfg.output_path)
    return report


def summary_table(report: dict, print_fn: Callable[[str], None] = print) -> None:
    """One line per task: name, headline metric, value, n."""
    for name, res in report["results"].items():
        print_fn(f"{name:<20} {res['metric']:<10} {res['value']:.4f}  (n={res['n']}, {res['dataset']})")
