"""Model card: TRL's generated card, extended with the HD-PiSSA section and ``model-index`` evaluation results.

TRL writes the card (its template, tags, framework versions); this module loads it with ``huggingface_hub``'s
``ModelCard``, adds the method, its settings, the data mixture, a training-loss plot, how to load the model, and the
scores as ``EvalResult`` entries (so the Hub renders them as ``model-index``), and saves it back.
"""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import EvalResult, ModelCard

SECTION_START = "<!-- hdpissa:start -->"
SECTION_END = "<!-- hdpissa:end -->"


def plot_training_loss(log_history: list[dict], path: str) -> str | None:
    """Write the training-loss curve as a PNG; returns the file name, or None without data or matplotlib."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)


def _public_name(dataset: str) -> str:
    """A dataset name fit for a public card: Hub ids as they are, local files relative to the working directory
    (never an absolute path of the machine that trained)."""
    if os.path.isabs(dataset):
        rel = os.path.relpath(dataset)
        dataset = rel if not rel.startswith("..") else os.path.basename(dataset)
    return dataset.replace(os.sep, "/")


def eval_results_for_card(report: dict | None, model_name: str) -> list[EvalResult]:
    """``EvalResult`` entries from an evaluation report (``{"results": {task: {metric, value, dataset, ...}}}``)."""
    out = []
    for task, res in ((report or {}).get("results") or {}).items():
        dataset = _public_name(str(res.get("dataset") or task))
        out.append(EvalResult(
            task_type="text-generation", task_name=task, dataset_type=dataset[-96:],
            dataset_name=task, dataset_split=res.get("split"), metric_type=str(res.get("metric", "accuracy")),
            metric_value=float(res["value"]), metric_name=str(res.get("metric", "accuracy")),
        ))
    return out


def _settings_table(info: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in info.items() if v is not None)
    return "| setting | value |\n|---|---|\n" + rows


def update_model_card(card_path: str, info: dict[str, Any], report: dict | None = None,
                      loss_plot: str | None = None, before: dict | None = None, model_name: str = "model") -> None:
    """Add (or replace) the HD-PiSSA section and ``model-index`` results in the card at ``card_path``."""
    card = ModelCard.load(card_path) if os.path.exists(card_path) else ModelCard("---\n---\n")
    tags = list(card.data.tags or [])
    for tag in ("hd-pissa", "peft-free-merged", "trl"):
        if tag not in tags:
            tags.append(tag)
    card.data.tags = tags
    if info.get("datasets"):
        card.data.datasets = [d for d in info["datasets"] if "/" in d and not os.path.exists(d)] or None
    results = eval_results_for_card(report, model_name)
    if results:
        card.data.eval_results = results
        card.data.model_name = model_name
    method = info.get("method", "hdpissa")
    lines = [SECTION_START, "", "## Training method", ""]
    if method == "hdpissa":
        lines += [
            "Fine-tuned with **HD-PiSSA** (High-rank Distributed PiSSA, arXiv 2505.18777): each of the K devices trains",
            "its own slice of the weight's top K·r singular directions; after every optimizer step the per-device",
            "updates are gathered and folded into the full weight, so one step updates W in up to 2·K·r directions.",
            "`lora_alpha` follows PEFT's PiSSA convention (initial factors sqrt(S/s)·Vh and U·sqrt(S/s), s = lora_alpha / r):",
            "with one device a step equals a PEFT PiSSA step, and a step moves W in proportion to sqrt(s).",
            "This repository holds the **merged plain model**: it loads with `transformers` alone.",
        ]
    else:
        lines += [f"Fine-tuned with **{method}** (baseline run of the hdpissa_trl recipes); merged plain model."]
    lines += ["", _settings_table({k: v for k, v in info.items() if k != "datasets"}), ""]
    if info.get("datasets"):
        lines += ["### Data", ""] + [f"- `{_public_name(d)}`" for d in info["datasets"]] + [""]
    if loss_plot:
        lines += ["### Training loss", "", f"![training loss]({loss_plot})", ""]
    if results:
        lines += ["## Evaluation", "", "| task | metric | before | after | n |", "|---|---|---|---|---|"]
        before_res = (before or {}).get("results") or {}
        for task, res in report["results"].items():
            b = before_res.get(task, {}).get("value")
            lines.append(f"| {task} | {res.get('metric')} | {'' if b is None else f'{b:.4f}'} | "
                         f"{res['value']:.4f} | {res.get('n', '')} |")
        lines.append("")
    lines += [
        "## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'model = AutoModelForCausalLM.from_pretrained("<this repo or directory>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this repo or directory>")', "```", "", SECTION_END,
    ]
    section = "\n".join(lines)
    text = card.text
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        text = head + section + rest.split(SECTION_END, 1)[1]
    else:
        marker = "## Training procedure"
        text = text.replace(marker, section + "\n\n" + marker, 1) if marker in text else text + "\n" + section + "\n"
    # TRL's template links the base model and the Hub id; for local runs those are None.
    base = info.get("base model")
    text = text.replace("[None](https://huggingface.co/None)", f"`{_public_name(str(base))}`" if base else "a model")
    text = text.replace('model="None"', f'model="{model_name}"')
    card.text = text
    card.save(card_path)
