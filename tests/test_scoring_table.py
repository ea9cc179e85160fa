r"""A table of realistic completions scored by the gsm8k, math and multiple_choice kinds.

The completions imitate what Llama / Qwen / SmolLM models write on GSM8K, MATH and MMLU-style questions:
chain-of-thought, then a final answer in one of the usual formats, right or wrong. Each row is
``(kind, completion, reference, expected_score)``; the comment says which rule of
:mod:`evomerge.evaluators.scoring` decides it.

Deliberately unsupported (the rows pin the documented behaviour): a hallucinated follow-up question whose
"Answer:" comes last wins over the real answer; mixed numbers (``1 1/2``) read as their whole part;
"It is B, not C." reads C; lower-case letters are not multiple-choice answers.
"""

from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.evaluators import extract_answer, score
from evomerge.evaluators.scoring import KINDS, check_reference

GSM_REFERENCE_72 = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)
GSM_REFERENCE_18 = (
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n"
    "#### 18"
)
MATH_REFERENCE_3_4 = (
    "Both coins show heads with probability $\\frac{1}{2} \\cdot \\frac{1}{2} = \\frac{1}{4}$, so the "
    "probability of at least one tail is $1 - \\frac{1}{4} = \\boxed{\\frac{3}{4}}$."
)

GSM8K_ROWS: list[tuple[str, str, str, float]] = [
    # The usual GSM8K format: worked solution, "#### 72".
    (
        "gsm8k",
        "In May Natalia sold 48 / 2 = 24 clips.\nAltogether she sold 48 + 24 = 72 clips.\n#### 72",
        GSM_REFERENCE_72,
        1.0,
    ),
    # A hallucinated follow-up after "####": the number after the last "####" wins over the last number.
    (
        "gsm8k",
        "She sells 16 - 3 - 4 = 9 eggs and makes 9 * 2 = 18 dollars.\n#### 18\n\nQuestion: Tom has 5 apples",
        GSM_REFERENCE_18,
        1.0,
    ),
    # "####" present, later lines only check a step: the last number (30) is not the answer.
    ("gsm8k", "Step 1: 20 + 30 = 50\n#### 50\nCheck: 50 - 20 = 30", "50", 1.0),
    # Llama-style "The answer is N." with the reference's "#### N".
    ("gsm8k", "She makes 9 * 2 = $18 every day.\nThe answer is 18.", GSM_REFERENCE_18, 1.0),
    # Money with cents and a trailing period.
    ("gsm8k", "Each pen costs $1.25, so 4 pens cost $5.00.\nThe answer is $5.00.", "#### 5", 1.0),
    # No phrase, no "####": the last number, "5.00 dollars".
    ("gsm8k", "He pays 2.50 + 2.50 = 5.00 dollars", "#### 5", 1.0),
    # Units after the last number.
    ("gsm8k", "Each basket has 4 apples, so 3 baskets hold 12 apples.", "#### 12", 1.0),
    ("gsm8k", "The car drives 60 km/h for 0.25 hours, so it covers 15 km", "15", 1.0),
    # Unicode minus.
    ("gsm8k", "It starts at 4 degrees and drops 12 degrees, so it ends at \u22128 degrees.", "#### -8", 1.0),
    # A sign before the dollar sign.
    ("gsm8k", "He spent $20 and earned $15, so his profit is -$5.\nThe answer is -$5.", "#### -5", 1.0),
    # Sign near miss: 5 is not -5.
    ("gsm8k", "The difference is 5.\nThe answer is 5.", "#### -5", 0.0),
    # Thousands separators on both sides, money.
    ("gsm8k", "3 months cost 3 * $1,250 = $3,750.\nThe answer is $3,750.", "#### 3,750", 1.0),
    # Digit-swap near miss.
    ("gsm8k", "Adding the two amounts gives 1,234.\nThe answer is 1234.", "#### 1243", 0.0),
    # Qwen / Llama-3 boxed format after "The final answer is:".
    ("gsm8k", "So the total is 1,234 pages.\n\nThe final answer is: $\\boxed{1,234}$", "#### 1234", 1.0),
    # Only a box (with an escaped dollar), the sentence goes on with another number.
    ("gsm8k", "Therefore she earns $\\boxed{\\$18}$ per day, 3 times more.", GSM_REFERENCE_18, 1.0),
    # Percent: 50% == 50.
    ("gsm8k", "Half of the class passed, which is 50%.\nThe answer is 50%.", "#### 50", 1.0),
    # A fraction as the whole answer.
    ("gsm8k", "She ate 3 of the 4 slices.\nAnswer: 3/4", "0.75", 1.0),
    ("gsm8k", "She ate 3 of the 5 slices.\nAnswer: 3/5", "0.75", 0.0),
    # The answer phrase followed by an equation: the number after its "=".
    ("gsm8k", "The answer is 12 + 6 = 18.", "18", 1.0),
    # The answer phrase wins over a later number.
    ("gsm8k", "The answer is 42. (This took 3 steps.)", "3", 0.0),
    # A wrong final answer.
    ("gsm8k", "She has 16 - 3 - 3 = 10 eggs left.\nThe answer is 10.", GSM_REFERENCE_18, 0.0),
    # Minerva format.
    ("gsm8k", "Final Answer: The final answer is 18. I hope it is correct.", "18", 1.0),
    # Decimals.
    ("gsm8k", "7 stickers at $0.25 each cost 7 * 0.25 = 1.75.\n#### 1.75", "#### 1.75", 1.0),
    # Big numbers compare within a relative 1e-9 (the absolute difference here is 1e-5).
    ("gsm8k", "#### 98765432109876.00001", "98765432109876", 1.0),
    # Unsupported: the follow-up question's "Answer:" is the last answer phrase, so 3 is read.
    (
        "gsm8k",
        "The answer is 18.\n\nQuestion: Tom has 5 apples and eats 2.\nAnswer: Tom has 5 - 2 = 3 apples left.",
        "18",
        0.0,
    ),
    # Unsupported: a mixed number reads as its whole part (1), not 1.5.
    ("gsm8k", "Each cake needs 1 1/2 cups.\nThe answer is 1 1/2 cups.", "1.5", 0.0),
    # No answer at all.
    ("gsm8k", "I'm sorry, but I cannot solve this problem.", "#### 3", 0.0),
]

MATH_ROWS: list[tuple[str, str, str, float]] = [
    # Boxed fraction against a decimal bare reference: numeric equality.
    (
        "math",
        "The probability is $\\frac{3}{4}$.\nTherefore, the final answer is $\\boxed{\\frac{3}{4}}$.",
        "0.75",
        1.0,
    ),
    # Decimal completion against a MATH solution's last box.
    ("math", "So the probability is $0.75$, i.e. $\\boxed{0.75}$.", MATH_REFERENCE_3_4, 1.0),
    # Near miss: 3/5 is not 3/4.
    ("math", "Hence the probability is $\\boxed{\\frac{3}{5}}$.", MATH_REFERENCE_3_4, 0.0),
    # An equation in the box: the leading "x =" is dropped.
    (
        "math",
        "Solving $2x + 3 = 7$ gives $\\boxed{x = 2}$.",
        "We subtract 3 and divide: $x = \\boxed{2}$.",
        1.0,
    ),
    # \dfrac against \frac12.
    ("math", "The ratio is $\\boxed{\\dfrac{1}{2}}$.", "So the ratio is $\\boxed{\\frac12}$.", 1.0),
    # 0.5 against \frac12.
    ("math", "The answer is $0.5$.", "\\frac12", 1.0),
    # Degrees on either side.
    ("math", "Each angle measures $\\boxed{30^\\circ}$.", "Each angle is $\\boxed{30}$ degrees.", 1.0),
    ("math", "Thus $\\angle ABC = \\boxed{30^{\\circ}}$.", "30^\\circ", 1.0),
    # A \text{} unit.
    ("math", "The side length is $\\boxed{12 \\text{ cm}}$.", "$\\boxed{12}$", 1.0),
    # Intervals: same brackets match, a different closing bracket does not.
    ("math", "The solution set is $\\boxed{(-\\infty, 3]}$.", "$x \\in \\boxed{(-\\infty,3]}$", 1.0),
    ("math", "The solution set is $\\boxed{(-\\infty, 3)}$.", "(-\\infty, 3]", 0.0),
    # Tuples compare element-wise in order; \left( \right) are dropped.
    ("math", "The answer is $(1, 2)$.", "The point is $\\boxed{(1,2)}$.", 1.0),
    ("math", "The intersection is $\\boxed{\\left( 1, 2 \\right)}$.", "(1,2)", 1.0),
    ("math", "The point is $\\boxed{(2, 1)}$.", "(1,2)", 0.0),
    # Unbracketed solution lists match in any order.
    ("math", "The roots are $\\boxed{-3, 2}$.", "The solutions are $\\boxed{2, -3}$.", 1.0),
    # Sympy equivalence of simple expressions.
    ("math", "So $\\sin 45^\\circ = \\boxed{\\sqrt{2}/2}$.", "$\\boxed{\\frac{\\sqrt{2}}{2}}$", 1.0),
    ("math", "The circumference is $\\boxed{2\\pi}$.", "\\pi \\cdot 2", 1.0),
    ("math", "Rationalizing, $\\boxed{\\frac{1}{\\sqrt{2}}}$.", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("math", "Expanding, we get $\\boxed{x^2 + 2x + 1}$.", "(x+1)^2", 1.0),
    ("math", "Expanding, we get $\\boxed{x^2 + x + 1}$.", "(x+1)^2", 0.0),
    # Thousands separators and percent signs.
    ("math", "There are $\\boxed{1,000}$ such numbers.", "1000", 1.0),
    ("math", "The discount is $\\boxed{50\\%}$.", "50", 1.0),
    ("math", "The discount is $\\boxed{50\\%}$.", "0.5", 0.0),
    # Money.
    ("math", "The total cost is $\\boxed{\\$5.00}$.", "5", 1.0),
    # A whole \text{} answer keeps its content.
    ("math", "The winner is $\\boxed{\\text{Devon}}$.", "\\text{Devon}", 1.0),
    # The last of several boxes counts.
    ("math", "First, $\\boxed{4}$ pairs... Recounting, the answer is $\\boxed{6}$.", "\\boxed{6}", 1.0),
    ("math", "First, $\\boxed{4}$ pairs... Recounting, the answer is $\\boxed{6}$.", "\\boxed{4}", 0.0),
    # No box, no phrase: the last line's last math-looking token.
    ("math", "The base is 6 and the height is 8.\nSo the area is 24", "The area is $\\boxed{24}$.", 1.0),
    # Rounded decimal against an exact fraction.
    ("math", "The probability is about $\\boxed{0.333}$.", "\\frac13", 0.0),
    # Truncated generation: the box never closes.
    ("math", "Therefore the answer is \\boxed{\\frac{3}{4", "\\frac{3}{4}", 0.0),
    # No answer at all.
    ("math", "To solve this, we first note that", "\\boxed{5}", 0.0),
    # Stacked exponents are refused by the sympy converter: not equal, and fast.
    ("math", "$\\boxed{2^{9}^{9}}$", "1", 0.0),
    ("math", "$\\boxed{(x+y+z)^{100}}$", "x", 0.0),
]

MULTIPLE_CHOICE_ROWS: list[tuple[str, str, str, float]] = [
    # "The answer is (B)." after chain-of-thought.
    ("multiple_choice", "Paris is the capital of France. The answer is (B).", "B", 1.0),
    ("multiple_choice", "Answer: B", "B", 1.0),
    # The letter opening the completion, in its usual forms.
    ("multiple_choice", " B) Paris", "B", 1.0),
    ("multiple_choice", "(C) Berlin", "B", 0.0),
    ("multiple_choice", "**B**", "B", 1.0),
    (
        "multiple_choice",
        "B. Paris\n\nExplanation: the capital of England, A. London, is not asked for.",
        "B",
        1.0,
    ),
    ("multiple_choice", "D", "B", 0.0),
    # Options discussed, then the correct one.
    (
        "multiple_choice",
        "Let's think step by step. Option A is wrong because mitochondria do not store DNA only. "
        "Option C confuses the nucleus with the ribosome. Therefore, the correct answer is D.",
        "D",
        1.0,
    ),
    # Markdown after "Answer:".
    ("multiple_choice", "Both A and C are too small.\n**Answer:** C", "C", 1.0),
    # Boxed letter.
    ("multiple_choice", "So the correct answer is $\\boxed{C}$.", "C", 1.0),
    # "not C but B": no letter follows "answer is", so the last standalone letter (B) is read.
    ("multiple_choice", "The answer is not C but B", "B", 1.0),
    # Unsupported negation: "It is B, not C." reads C, the last standalone letter.
    ("multiple_choice", "It is B, not C.", "B", 0.0),
    # "I" as a pronoun is not an answer; no letter at all scores 0.
    ("multiple_choice", "I think the best choice here is the second one.", "B", 0.0),
    # Lower-case letters are not read.
    ("multiple_choice", "answer: (c)", "C", 0.0),
    # A lower-case, parenthesized reference is accepted.
    ("multiple_choice", "The final answer is E", "(e)", 1.0),
    # Ten options (MMLU-Pro).
    ("multiple_choice", "Comparing all ten options, the answer is (J).", "J", 1.0),
    ("multiple_choice", "Comparing all ten options, the answer is (I).", "J", 0.0),
]

ROWS = GSM8K_ROWS + MATH_ROWS + MULTIPLE_CHOICE_ROWS


def _row_id(row: tuple[str, str, str, float]) -> str:
    kind, completion, _, expected = row
    return f"{kind}-{int(expected)}-{completion[:30]!r}"


@pytest.mark.parametrize(
    ("kind", "completion", "reference", "expected"), ROWS, ids=[_row_id(r) for r in ROWS]
)
def test_score_table(kind: str, completion: str, reference: str, expected: float) -> None:
    assert score(kind, completion, reference) == expected


def test_table_shape() -> None:
    kinds = [row[0] for row in ROWS]
    assert kinds.count("gsm8k") >= 15 and kinds.count("math") >= 15 and kinds.count("multiple_choice") >= 8
    assert sum(1 for row in ROWS if row[3] == 0.0) >= len(ROWS) // 4
    assert {"gsm8k", "math", "multiple_choice", "exact_match", "numeric"} <= set(KINDS)


@pytest.mark.parametrize(
    ("kind", "completion", "expected"),
    [
        ("gsm8k", "The answer is $5.00.", "5"),
        ("gsm8k", "Answer: 3/4", "0.75"),
        ("gsm8k", "Answer: 1/3", "1/3"),
        ("gsm8k", "The answer is \\frac{3}{4}.", "0.75"),
        ("gsm8k", "#### 1,234", "1234"),
        ("gsm8k", "no digits here", None),
        ("math", "So $\\boxed{x = 2}$.", "2"),
        ("math", "\\boxed{\\dfrac12}", "\\frac{1}{2}"),
        ("math", "\\boxed{12 \\text{ cm}^2}", "12"),
        ("math", "\\boxed{\\left( 1, 2 \\right)}", "(1,2)"),
        ("math", "The answer is $\\pi x$.", "\\pi x"),
        ("math", "We get\n\\[\nx = \\frac{3}{5}\n\\]", "\\frac{3}{5}"),
        ("math", "no math here", None),
        ("multiple_choice", "**Answer:** (D) 42", "D"),
        ("multiple_choice", "A cat is not a dog.", None),
        ("multiple_choice", "I'm not sure.", None),
    ],
)
def test_extract_answer_new_kinds(kind: str, completion: str, expected: str | None) -> None:
    assert extract_answer(kind, completion) == expected


@pytest.mark.parametrize(
    ("kind", "reference", "expected"),
    [
        ("gsm8k", GSM_REFERENCE_72, "72"),
        ("gsm8k", "#### 1,234", "1234"),
        ("gsm8k", " -5 ", "-5"),
        ("gsm8k", "$18", "18"),
        ("math", MATH_REFERENCE_3_4, "\\frac{3}{4}"),
        ("math", "\\fbox{5}", "5"),
        ("math", "So $x = \\boxed 5$.", "5"),
        ("math", "(-\\infty, 3]", "(-\\infty,3]"),
        ("math", "\\text{(C)}", "(C)"),
        ("multiple_choice", "B", "B"),
        ("multiple_choice", "(c)", "C"),
        ("multiple_choice", "D.", "D"),
    ],
)
def test_check_reference_reads(kind: str, reference: str, expected: str) -> None:
    assert check_reference(kind, reference) == expected


BAD_REFERENCES: list[tuple[str, str, str]] = [
    ("gsm8k", "no number here", "is not a bare number"),
    ("gsm8k", "The answer is 18", "no '#### <number>' line"),
    ("gsm8k", "She sells 9 eggs.\n#### none", "nothing after the last '####'"),
    ("gsm8k", "", "is not a bare number"),
    ("math", "We compute the area carefully and get the result.", "not a bare answer"),
    ("math", "Step one finds the area.\nStep two doubles it: 24", "not a bare answer"),
    ("math", "So the answer is $\\boxed{\\frac{3}{4}$.", "no complete, non-empty"),
    ("math", "$\\boxed{}$", "no complete, non-empty"),
    ("math", "  ", "not a bare answer"),
    ("multiple_choice", "K", "not a single letter A-J"),
    ("multiple_choice", "1", "not a single letter A-J"),
    ("multiple_choice", "AB", "not a single letter A-J"),
    ("multiple_choice", "The answer is B", "not a single letter A-J"),
    ("multiple_choice", "", "not a single letter A-J"),
]


@pytest.mark.parametrize(("kind", "reference", "reason"), BAD_REFERENCES)
def test_bad_reference_raises_value_error(kind: str, reference: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_reference(kind, reference)


@pytest.mark.parametrize(("kind", "reference", "reason"), BAD_REFERENCES)
def test_bad_reference_score_is_one_line_config_error(kind: str, reference: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        score(kind, "The answer is 5. \\boxed{5} (B)", reference)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"scoring kind {kind!r}: ")
    assert reason in message
