"""Multiple-choice accuracy from per-choice log-likelihoods (the MMLU/HellaSwag way of scoring a base model).

Scoring choices by the model's log-likelihood needs no answer parsing, so a model that cannot follow an answer
format is still measured on what it knows. Length normalisation (divide by the choice's length) removes the bias
towards short choices when the choices are long free text rather than single letters.
"""

from __future__ import annotations

import math

import datasets
import evaluate

_DESCRIPTION = """Accuracy of picking the gold choice as the argmax of per-choice log-likelihoods (ties -> first
choice). Optionally length-normalised: argmax of loglik / length, with lengths supplied per choice."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list[list[float]]): for each question, the log-likelihood of every choice (any number of choices).
    references (list[int]): index of the gold choice.
    lengths (list[list[int|float]], optional): per-choice lengths (e.g. characters or tokens of the continuation);
        when given, choices are ranked by loglik / length ("acc_norm").
    return_details (bool, default False): also return per-sample {"predicted", "correct"} under "details".
Returns:
    {"accuracy": float}. A question with no choices, only non-finite scores, or a gold index out of range counts
    as wrong.
Example:
    >>> m = evaluate.load("evaluation/metrics/multiple_choice")
    >>> m.compute(predictions=[[-3.0, -1.0], [-0.5, -2.0]], references=[1, 1])
    {'accuracy': 0.5}
"""


def predicted_index(logliks: list[float], lengths: list[float] | None = None) -> int | None:
    """Argmax of (optionally length-normalised) log-likelihoods; NaN counts as -inf; ``None`` if nothing is finite."""
    if lengths is not None and len(lengths) != len(logliks):
        raise ValueError(f"lengths has {len(lengths)} entries but there are {len(logliks)} choices")
    best, best_score = None, -math.inf
    for i, ll in enumerate(logliks):
        score = float(ll) if ll is not None else math.nan
        if lengths is not None:
            score = score / max(float(lengths[i]), 1.0)
        if not math.isnan(score) and score > best_score:
            best, best_score = i, score
    return best


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MultipleChoice(evaluate.Metric):
    """``evaluate`` wrapper around :func:`predicted_index`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: list[list[float]], references: list[int],
                 lengths: list[list[float]] | None = None, return_details: bool = False) -> dict:
        if lengths is not None and len(lengths) != len(predictions):
            raise ValueError(f"lengths has {len(lengths)} rows but there are {len(predictions)} predictions")
        details = []
        for i, (logliks, gold) in enumerate(zip(predictions, references)):
            pred = predicted_index(list(logliks), None if lengths is None else list(lengths[i]))
            details.append({"predicted": pred, "correct": pred is not None and pred == gold})
        out: dict = {"accuracy": sum(d["correct"] for d in details) / len(details) if details else 0.0}
        if return_details:
            out["details"] = details
        return out
