"""Math answer accuracy: extract the final answer from model text, judge equivalence with ``math_verify``.

Hand-written string normalisation gets ``0.5`` vs ``\\frac{1}{2}`` or ``1,000`` vs ``1000`` wrong in endless small
ways; ``math_verify`` (the parser/verifier TRL and open-r1 use) compares the answers symbolically instead. This module
only decides *which span* of the text is the final answer, then hands both sides to ``math_verify``.
"""

from __future__ import annotations

import re
import threading

import datasets
import evaluate
from math_verify import parse, verify

_DESCRIPTION = """Accuracy of final math answers. The final answer of each prediction is extracted (last \\boxed{...},
else the text after '####', else 'The answer is ...', else the last number) and judged equivalent to the gold answer
with math_verify (symbolic: fractions, decimals, thousands separators, LaTeX vs plain)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list[str]): model outputs (free text with reasoning is fine).
    references (list[str]): gold answers: raw ("72", "\\frac{1}{2}"), GSM8K style ("... #### 72") or a solution
        containing \\boxed{...}.
    return_details (bool, default False): also return per-sample {"extracted", "gold", "correct"} under "details".
Returns:
    {"accuracy": float} (fraction of predictions equivalent to their gold answer; 0.0 for empty input).
Example:
    >>> m = evaluate.load("evaluation/metrics/math_accuracy")
    >>> m.compute(predictions=["so \\\\boxed{\\\\frac{1}{2}}"], references=["0.5"])
    {'accuracy': 1.0}
"""

_CITATION = """@misc{math-verify, author = {Kydlicek, Hynek and others}, title = {Math-Verify},
  url = {https://github.com/huggingface/Math-Verify}, year = {2025}}"""

_BOXED_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s$]+)")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"(?i)\banswer\s*(?:is|:)\s*:?\s*([^\n]+)")
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"\\d?frac\{[^{}]*\}\{[^{}]*\}|-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed ``\\boxed{...}``/``\\fbox{...}`` (nested braces balanced), or ``\\boxed 5``."""
    for match in reversed(list(_BOXED_OPEN.finditer(text))):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[match.end() : i - 1].strip()
    bare = _BOXED_BARE.findall(text)
    return bare[-1] if bare else None


def _first_sentence(span: str) -> str:
    """Cut 'The answer is 72. Hope it helps' at the sentence end; keeps decimals like 0.5 intact."""
    end = _SENTENCE_END.search(span)
    return (span[: end.start()] if end else span).strip()


def extract_answer(text: str) -> tuple[str | None, str]:
    """The final-answer span of a model output and how it was found (``boxed``/``hashes``/``phrase``/``number``)."""
    boxed = last_boxed(text)
    if boxed:
        return boxed, "boxed"
    hashes = _HASHES.findall(text)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip(), "hashes"
    phrases = [_first_sentence(p) for p in _ANSWER_IS.findall(text)]
    if phrases and phrases[-1]:
        return phrases[-1], "phrase"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].rstrip(",").strip(), "number"
    return None, "none"


def _timeout() -> int | None:
    """math_verify times out with SIGALRM, which only works on the main thread; elsewhere run without a timeout."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def parse_answer(span: str, latex_first: bool) -> list:
    """Parse an answer span with math_verify; LaTeX spans are parsed inside ``\\boxed{}``, free text as is."""
    stripped = span.strip().strip("$").rstrip(".").strip()
    if not stripped:
        return []
    attempts = [f"\\boxed{{{stripped}}}", span] if latex_first else [span, f"${stripped}$"]
    for attempt in attempts:
        parsed = parse(attempt, parsing_timeout=_timeout())
        if parsed:
            return parsed
    return []


def gold_answer(reference: str) -> tuple[str, bool]:
    """The gold span (from ``\\boxed``, ``####`` or the raw string) and whether it is LaTeX-like (parse as boxed)."""
    boxed = last_boxed(reference)
    if boxed:
        return boxed, True
    hashes = _HASHES.findall(reference)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip(), False
    return reference.strip(), True


def is_correct(prediction: str, reference: str) -> tuple[bool, str | None]:
    """Whether ``prediction``'s final answer is equivalent to ``reference``; also returns the extracted span."""
    span, how = extract_answer(prediction or "")
    if span is None:
        return False, None
    gold_span, gold_latex = gold_answer(reference or "")
    gold = parse_answer(gold_span, latex_first=gold_latex)
    pred = parse_answer(span, latex_first=how == "boxed")
    if not gold:  # not math at all (e.g. "yes"): only an exact match can be right
        return span.strip() == gold_span.strip(), span
    if not pred:
        return False, span
    return bool(verify(gold, pred, timeout_seconds=_timeout())), span


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MathAccuracy(evaluate.Metric):
    """``evaluate`` wrapper around :func:`is_correct`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            codebase_urls=["https://github.com/huggingface/Math-Verify"],
        )

    def _compute(self, predictions: list[str], references: list[str], return_details: bool = False) -> dict:
        details = []
        for prediction, reference in zip(predictions, references):
            correct, extracted = is_correct(prediction, reference)
            details.append({"extracted": extracted, "gold": gold_answer(reference or "")[0], "correct": correct})
        accuracy = sum(d["correct"] for d in details) / len(details) if details else 0.0
        out: dict = {"accuracy": float(accuracy)}
        if return_details:
            out["details"] = details
        return out
