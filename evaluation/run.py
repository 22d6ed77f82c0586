"""Command line: ``python -m evaluation.run --model DIR --tasks gsm8k,math,humaneval,mc --limit N``.

Writes ``eval_results.json`` (see :func:`evaluation.evaluator.evaluate_model` for the schema) and prints one line
per task. Code tasks execute model-generated code and need ``HF_ALLOW_CODE_EVAL=1`` in the environment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in values or ():
        if "=" not in item:
            raise SystemExit(f"{flag} expects TASK=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _split_tasks(text: str) -> list[str]:
    """``gsm8k,demo=data/a.jsonl`` -> ``["gsm8k", "demo=data/a.jsonl"]`` (commas separate tasks)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or hub id (any AutoModelForCausalLM)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's)")
    p.add_argument("--tasks", default="gsm8k", help="comma-separated: gsm8k, math, humaneval, mmlu|mc, NAME=FILE")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each task")
    p.add_argument("--output", default="eval_results.json", help="where to write the JSON report")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--num_samples", type=int, default=1, help="samples per code prompt (pass@k); 1 = greedy")
    p.add_argument("--k", default=None, help="comma-separated k values for pass@k (default 1,10,100 up to n)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when num_samples > 1")
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--num_fewshot", type=int, default=None, help="override the tasks' number of few-shot examples")
    p.add_argument("--data_files", nargs="*", action="extend", default=[], metavar="TASK=PATH",
                   help="point a task at local json/jsonl/parquet/csv files (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template if it has one")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "transformers", "vllm"],
                   help="auto = vLLM only if installed and CUDA is available")
    p.add_argument("--code_timeout", type=float, default=10.0, help="seconds per sandboxed program")
    p.add_argument("--code_workers", type=int, default=2, help="sandboxed programs run in parallel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from .evaluator import evaluate_model, summary_table

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
    report = evaluate_model(
        args.model, tokenizer, _split_tasks(args.tasks), args.limit, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
        k=[int(x) for x in args.k.split(",")] if args.k else None, temperature=args.temperature, top_p=args.top_p,
        chat=args.chat, num_fewshot=args.num_fewshot, data_files=_pairs(args.data_files, "--data_files"),
        dtype=args.dtype, device=args.device, backend=args.backend, code_timeout=args.code_timeout,
        code_workers=args.code_workers, seed=args.seed, show_progress=not args.no_progress, output_path=args.output)
    summary_table(report, print_fn=lambda line: print(line, file=sys.stdout))
    print(f"wrote {args.output}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
