"""Reward functions of the GRPO recipes, in TRL's reward-function form.

``f(completions, **columns) -> list[float]``: ``completions`` are strings (standard data) or one-message lists
(conversational data); dataset columns such as ``answer`` arrive as keyword lists. :func:`get_reward_funcs` resolves
names from the recipe's ``reward_funcs`` list: these, TRL's own (``trl.rewards``), or a dotted import path.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

_ANSWER = re.compile(r"The answer is (-?\d+)\b")
_NUMBER = re.compile(r"-?\d+")


def _text(completion) -> str:
    """The completion's text, for standard (str) and conversational (list of messages) data."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion)


def answer_reward(completions, answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion's answer equals ``answer``: the N of its first ``The answer is N``, else its last
    number."""
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        text = _text(completion)
        match = _ANSWER.search(text)
        numbers = [match.group(1)] if match else _NUMBER.findall(text)
        rewards.append(float(bool(numbers) and int(numbers[-1]) == int(gold)))
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
