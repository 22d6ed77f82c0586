"""Reward functions of the GRPO recipes, in TRL's reward-function form.

``f(completions, **columns) -> list[float]``: ``completions`` are strings (standard data) or one-message lists
(conversational data); dataset columns such as ``answer`` arrive as keyword lists. :func:`get_reward_funcs` resolves
names from the recipe's ``reward_funcs`` list: these, TRL's own (``trl.rewards``), or a dotted import path.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from fractions import Fraction

# A number as math answers write it: an integer, a decimal, thousands separated by commas ("1,000"), a fraction "3/4".
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
_ANSWER = re.compile(rf"The answer is ({_NUM})(?![\d.,]?\d)")
_NUMBER = re.compile(_NUM)
_STATED = re.compile(r"The answer is ([^\n]*)")


def _text(completion) -> str:
    """The completion's text, for standard (str) and conversational (list of messages) data."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion)


def _number(text: str) -> Fraction | None:
    """``text`` as an exact number ("42", "-3", "42.50", "1,000", "3/4"), else ``None``."""
    try:
        return Fraction(text.strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def answer_reward(completions, answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion's answer equals ``answer``.

    A numeric gold answer ("42", "-3", "42.5", "3/4") is compared as an exact number with the N of the completion's
    first ``The answer is N``, else with its last number: "42.50" scores for "42.5", "42.5" does not score for "42".
    Any other gold answer ("x = 3", "\\frac{1}{2}") is compared as text with what follows ``The answer is`` (up to the
    end of the line, without a final period).
    """
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        text, gold = _text(completion), str(gold)
        value = _number(gold)
        if value is None:
            stated = _STATED.search(text)
            rewards.append(float(stated is not None and stated.group(1).strip().removesuffix(".").strip()
                                 == gold.strip()))
            continue
        match = _ANSWER.search(text)
        numbers = [match.group(1)] if match else _NUMBER.findall(text)
        rewards.append(float(bool(numbers) and _number(numbers[-1]) == value))
    return rewards


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion states its result as ``The answer is N`` (the format of the recipes' math data)."""
    return [float(_ANSWER.search(_text(c)) is not None) for c in completions]


def digit_reward(completions, **kwargs) -> list[float]:
    """Share of the completion's non-space characters that are digits: a dense format reward that a randomly
    initialised model can climb (the offline demo's tiny model never writes ``The answer is N.`` by chance)."""
    rewards = []
    for completion in completions:
        chars = [c for c in _text(completion) if not c.isspace()]
        rewards.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return rewards


REWARDS: dict[str, Callable] = {"answer_reward": answer_reward, "format_reward": format_reward,
                                "digit_reward": digit_reward}


def get_reward_funcs(names: list[str]) -> list[Callable]:
    """Resolve reward names: the ones above, TRL's ``trl.rewards`` functions, or ``package.module.function``."""
    import trl.rewards

    funcs = []
    for name in names:
        if name in REWARDS:
            funcs.append(REWARDS[name])
        elif hasattr(trl.rewards, name) and not name.startswith("get_"):
            funcs.append(getattr(trl.rewards, name))
        elif "." in name:
            module, _, attr = name.rpartition(".")
            try:
                funcs.append(getattr(importlib.import_module(module), attr))
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"Cannot import reward function {name!r}: {exc}") from exc
        else:
            trl_names = sorted(n for n in getattr(trl.rewards, "__all__", []) if not n.startswith("get_"))
            raise ValueError(f"Unknown reward function {name!r}. Choose from {sorted(REWARDS)}, TRL's {trl_names}, "
                             f"or give an import path such as 'my_package.rewards.my_reward'.")
    if not funcs:
        raise ValueError("No reward function: set reward_funcs (e.g. [answer_reward, format_reward]).")
    return funcs
