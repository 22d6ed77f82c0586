"""Command line: ``python -m evaluation.run --model DIR --tasks gsm8k,math,humaneval,mc --limit N``.

Writes ``eval_results.json`` (see :func:`evaluation.evaluator.evaluate_model` for the schema) and prints one line
per task. Code tasks execute model-generated code and need ``HF_ALLOW_CODE_EVAL=1`` in the environment. Every task's
data is checked before anything is generated; a setting or data problem ends the run with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from .config import BACKENDS, DTYPES, EvalConfig
from .data import DatasetUnavailableError

_FIELDS = {f.name: f for f in fields(EvalConfig)}


def _pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in values or ():
        if "=" not in item:
            raise ValueError(f"{flag} expects TASK=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def option(name: str, flag: str | None = None, **kwargs) -> None:
        """A flag for an EvalConfig field: its help and default come from the field."""
        f = _FIELDS[name]
        kwargs.setdefault("default", f.default)
        if "action" not in kwargs and "type" not in kwargs and isinstance(f.default, (int, float)):
            kwargs["type"] = type(f.default)
        p.add_argument(f"--{flag or name}", dest=name, help=f.metadata["help"], **kwargs)

    p.add_argument("--model", required=True, help="model directory or hub id (any AutoModelForCausalLM)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's)")
    option("tasks", default="gsm8k")
    option("limit", type=int)
    p.add_argument("--output", default="eval_results.json", help="where to write the JSON report")
    option("batch_size")
    option("max_new_tokens")
    option("num_samples")
    p.add_argument("--k", default=None, help=_FIELDS["k"].metadata["help"] + " Comma-separated.")
    option("temperature")
    option("top_p")
    option("num_fewshot", type=int)
    p.add_argument("--data_files", nargs="*", action="extend", default=[], metavar="TASK=PATH",
                   help=_FIELDS["data_files"].metadata["help"] + " Repeatable.")
    option("chat", action="store_true")
    option("dtype", choices=DTYPES)
    option("device")
    option("backend", choices=BACKENDS)
    option("code_timeout")
    option("code_workers")
    option("seed")
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        tasks=args.tasks, limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        num_samples=args.num_samples, k=[int(x) for x in args.k.split(",")] if args.k else None,
        temperature=args.temperature, top_p=args.top_p, chat=args.chat, num_fewshot=args.num_fewshot,
        data_files=_pairs(args.data_files, "--data_files"), dtype=args.dtype, device=args.device,
        backend=args.backend, code_timeout=args.code_timeout, code_workers=args.code_workers, seed=args.seed,
        show_progress=not args.no_progress, output_path=args.output)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_progress:  # the libraries' own bars too (dataset preparation, weight loading)
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    from .evaluator import evaluate_model, summary_table

    try:
        config = config_from_args(args)
        tokenizer = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
        report = evaluate_model(args.model, tokenizer, config)
    except (DatasetUnavailableError, FileNotFoundError, KeyError, OSError, ValueError) as exc:
        # Settings and data problems (unknown task, missing or unreachable data, no code opt-in, a model path that
        # does not load): one line, no traceback. Anything else is a bug and keeps its traceback.
        message = " ".join(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).split())
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    summary_table(report, print_fn=lambda line: print(line, file=sys.stdout))
    print(f"wrote {args.output}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
