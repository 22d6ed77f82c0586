"""Deterministic generator of the preference pairs (DPO) and prompts with answers (GRPO) of the offline recipes.

Built on the math task of ``generate.py`` (same samplers, same styles, same train/held-out disjointness by problem
key), written as four JSONL files:

* ``preference_{train,test}.jsonl``: ``prompt``, ``chosen`` (the worked answer), ``rejected`` (the same text with the
  final result wrong by 1 to 10: an arithmetic slip, identical format, so only correctness separates the two).
* ``prompts_{train,test}.jsonl``: ``prompt`` and ``answer`` (the final number as a string; the GRPO rewards in
  ``hdpissa_trl.rewards`` compare against it).

Output is a pure function of the arguments, so the shipped files regenerate byte for byte (see the recipes' READMEs).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import STYLES, _write_jsonl, check_math_row, make_splits, sampler_for


def wrong_completion(completion: str, answer: int, rng: random.Random) -> str:
    """``completion`` with its final result replaced by a wrong one (``answer ± 1..10``, never negative)."""
    deltas = [d for d in range(-10, 11) if d and answer + d >= 0]
    wrong = answer + rng.choice(deltas)
    head, sep, last = completion.rpartition("\n")  # chat style: steps, then "The answer is N."
    if sep:
        steps = head.rsplit("\n", 1)
        steps[-1] = re.sub(rf"= {answer}\.$", f"= {wrong}.", steps[-1])
        return "\n".join(steps) + sep + f"The answer is {wrong}."
    return re.sub(rf"= {answer}\. The answer is {answer}\.$", f"= {wrong}. The answer is {wrong}.", completion)


def generate(out_dir: str, seed: int, n_train: int, n_test: int, style: str) -> dict[str, int]:
    """Write the four JSONL files into ``out_dir``; returns ``{file name: size in bytes}``."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(f"hdpissa-rl-data:{seed}:{style}")
    train, test = make_splits(sampler_for("math", style), rng, n_train, n_test)
    sizes = {}
    for split, examples in (("train", train), ("test", test)):
        pairs, prompts = [], []
        for ex in examples:
            answer = int(ex.extra["answer"])
            rejected = wrong_completion(ex.completion, answer, rng)
            check_math_row({"completion": ex.completion, "answer": str(answer)})
            assert rejected != ex.completion and rejected.count("\n") == ex.completion.count("\n"), rejected
            pairs.append({"prompt": ex.prompt, "chosen": ex.completion, "rejected": rejected})
            prompts.append({"prompt": ex.prompt, "answer": str(answer)})
        for kind, rows in (("preference", pairs), ("prompts", prompts)):
            name = f"{kind}_{split}.jsonl"
            sizes[name] = _write_jsonl(os.path.join(out_dir, name), rows)
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True, help="directory for the four JSONL files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=1000, help="training problems")
    parser.add_argument("--n_test", type=int, default=50, help="held-out problems")
    parser.add_argument("--style", choices=STYLES, default="demo")
    args = parser.parse_args(argv)
    for name, size in generate(args.out_dir, args.seed, args.n_train, args.n_test, args.style).items():
        print(f"{os.path.join(args.out_dir, name)}: {size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
