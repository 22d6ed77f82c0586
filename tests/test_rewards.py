"""The GRPO recipes' reward functions and the name resolution of ``reward_funcs``."""

from __future__ import annotations

import pytest

from hdpissa_trl.rewards import answer_reward, digit_reward, format_reward, get_reward_funcs


def test_answer_reward_reads_the_final_number_in_both_data_formats():
    completions = ["12 + 30 = 42. The answer is 42.", "The answer is 41.", "it is 40 or maybe 42", "no idea",
                   [{"role": "assistant", "content": "7 * 6 = 42.\nThe answer is 42."}]]
    assert answer_reward(completions, answer=["42"] * 5) == [1.0, 0.0, 1.0, 0.0, 1.0]
    # A stated "The answer is N" wins over any later number; without one, the last number counts.
    assert answer_reward(["The answer is 42. Then 7.", "6 or 7"], answer=["42", "7"]) == [1.0, 1.0]
    assert answer_reward(["x = -3. The answer is -3.", "The answer is 421."], answer=["-3", "42"]) == [1.0, 0.0]


def test_answer_reward_compares_exact_numbers_and_non_numeric_answers_as_text():
    """A decimal is not read as its integer part, a non-integer gold answer does not crash (int("42.5") did), and
    equal numbers written differently score."""
    completions = ["The answer is 42.5.", "The answer is 42.", "so 42.50", "The answer is 1,000.", "The answer is 3/4.",
                   "The answer is -0.5"]
    gold = ["42.5", "42.5", "42.5", "1000", "3/4", "-1/2"]
    assert answer_reward(completions, answer=gold) == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert answer_reward(["The answer is 42.5.", "The answer is 42.5."], answer=["42", 42]) == [0.0, 0.0]
    # A gold answer that is no number is compared as text with what follows "The answer is".
    assert answer_reward(["The answer is x = 3.", "The answer is x = 4.", "x = 3"], answer=["x = 3"] * 3) == [
        1.0, 0.0, 0.0]


def test_format_and_digit_rewards():
    assert format_reward(["1 + 1 = 2. The answer is 2.", "The answer is 2, since", "The answer is two.", "2"]) == [
        1.0, 1.0, 0.0, 0.0]
    assert digit_reward(["1234", "ab12", " ", [{"role": "assistant", "content": "9 9"}]]) == [1.0, 0.5, 0.0, 1.0]


def test_reward_names_resolve_to_ours_trls_and_import_paths():
    import trl.rewards

    funcs = get_reward_funcs(["answer_reward", "think_format_reward", "hdpissa_trl.rewards.digit_reward"])
    assert funcs == [answer_reward, trl.rewards.think_format_reward, digit_reward]
    with pytest.raises(ValueError, match="Unknown reward function 'nope'.*answer_reward"):
        get_reward_funcs(["nope"])
    with pytest.raises(ValueError, match="Cannot import reward function 'no_such_pkg.f'"):
        get_reward_funcs(["no_such_pkg.f"])
    with pytest.raises(ValueError, match="No reward function"):
        get_reward_funcs([])
