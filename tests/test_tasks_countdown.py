"""The countdown task: rules, parser, grading, solver, step truth and seeded disjoint splits.

Hand-checked values throughout; the generated problems are checked against the task's own
parser and solver, which the hand examples pin down first.
"""
import time
from collections import Counter
from fractions import Fraction

import pytest

from thinkscale.tasks.grading import extract_answer
from thinkscale.tasks import STEP_DELIMITER, THINK_END
from thinkscale.tasks import countdown
from thinkscale.tasks.arithmetic import in_eval_pool
from thinkscale.tasks.countdown import (
    CountdownConfig,
    Problem,
    evaluate_expression,
    format_question,
    generate,
    grade,
    is_solution,
    make_splits,
    normalize_answer,
    parse_question,
    render,
    solutions,
    solvable,
    step_truth,
)
from thinkscale.tasks.tokenizer import structure_token_ids, train_tokenizer

Q72 = "Make 72 from 3, 5, 8, 8 with + - * /, using each number once."
Q12_NO_DIVISION = "Make 12 from 2, 3, 8 with + - *, using each number once."


# ---------------------------------------------------------------- format

def test_format_of_the_example_problem():
    problem = Problem(Q72, "8 * (8 - 5) * 3", ("8 - 5 = 3", "8 * 3 = 24", "24 * 3 = 72"))
    assert problem.prompt == Q72 + "\n<think>\n"
    assert problem.completion == "8 - 5 = 3.\n\n8 * 3 = 24.\n\n24 * 3 = 72.\n\n</think>\n\\boxed{8 * (8 - 5) * 3}"
    assert extract_answer(problem.completion, think_end=THINK_END) == "8 * (8 - 5) * 3"
    assert format_question([8, 3, 8, 5], 72) == Q72  # numbers sorted: one puzzle, one question
    assert format_question([8, 2, 3], 12, ("*", "-", "+", "-")) == Q12_NO_DIVISION


def test_parse_question_round_trips_and_rejects_other_text():
    assert parse_question(Q72) == ((3, 5, 8, 8), 72)
    assert parse_question(Q12_NO_DIVISION) == ((2, 3, 8), 12)
    for bad in [
        "What is 2 + 3 * 4?",  # an arithmetic question
        "Make 72 from 8 with + - * /, using each number once.",  # a single number
        "Make 72 from 3, 5, 8, 8 with + ^, using each number once.",  # unknown operator
        "Make 72 from 3, 5, 8, 8 with + +, using each number once.",  # repeated operator
        "Make 72 from 3, 05, 8 with + - * /, using each number once.",  # leading zero
        Q72 + " ",
        "",
        None,
    ]:
        with pytest.raises(ValueError, match="not a countdown question"):
            parse_question(bad)


@pytest.mark.parametrize(
    "expr, text",
    [
        (("*", ("*", 8, ("-", 8, 5)), 3), "8 * (8 - 5) * 3"),
        (("+", 17, ("-", 6, 3)), "17 + (6 - 3)"),
        (("-", ("+", 6, 3), 2), "6 + 3 - 2"),
        (("+", 5, ("+", 3, 1)), "5 + (3 + 1)"),  # same value, another tree
        (("/", ("*", 6, 4), ("*", 2, 3)), "6 * 4 / (2 * 3)"),
        (("*", ("+", 1, 2), 3), "(1 + 2) * 3"),
    ],
)
def test_render_uses_fewest_parentheses_that_keep_the_tree(expr, text):
    assert render(expr) == text
    assert countdown.parse_expression(text) == expr


# ---------------------------------------------------------------- parser

@pytest.mark.parametrize(
    "text, value, literals",
    [
        ("2 + 3 * 4", 14, (2, 3, 4)),
        ("(2 + 3) * 4", 20, (2, 3, 4)),
        ("10 - 3 - 2", 5, (2, 3, 10)),  # left-associative
        ("10 - (3 - 2)", 9, (2, 3, 10)),
        ("8 / 4 / 2", 1, (2, 4, 8)),
        ("8 / (4 / 2)", 4, (2, 4, 8)),
        ("8 / 3", Fraction(8, 3), (3, 8)),  # exact, not floor division
        ("8 / (3 - 8 / 3)", 24, (3, 3, 8, 8)),
        ("  ((7)) ", 7, (7,)),
        ("12*3-0", 36, (0, 3, 12)),
        ("(" * 99 + "1" + ")" * 99, 1, (1,)),  # 199 characters: just within the bound
    ],
)
def test_evaluate_expression(text, value, literals):
    assert evaluate_expression(text) == (value, literals)
    assert isinstance(evaluate_expression(text)[0], Fraction)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "ended"),
        ("1 +", "ended"),
        ("(1 + 2", "closing parenthesis"),
        ("1 + 2)", "after a complete expression"),
        ("1 2", "after a complete expression"),
        ("2 ** 3", "expected a number"),
        ("-3 + 5", "expected a number"),  # no unary minus
        ("()", "expected a number"),
        ("4 / (2 - 2)", "division by zero"),
        ("1.5 + 2", "unexpected character '.'"),
        ("x + 1", "unexpected character 'x'"),
        ("__import__('os')", "unexpected character"),
        ("٣ + 1", "unexpected character"),  # a non-ASCII digit is not a number here
        ("01 + 2", "leading zero"),
        ("1 + " * 50 + "1", "longer than 200"),
        (None, "must be a string"),
    ],
)
def test_evaluate_expression_rejects_malformed_text(text, message):
    with pytest.raises(ValueError, match=message):
        evaluate_expression(text)


# ---------------------------------------------------------------- grading

@pytest.mark.parametrize(
    "answer",
    [
        "8 * (8 - 5) * 3",  # the reference
        "(8 - 5) * 8 * 3",
        "3*8*(8-5)",
        "(3 * 8) * (8 - 5)",
        "8 * 8 + 5 + 3",  # another route altogether
        "8 * (5 + 3) + 8",
    ],
)
def test_is_solution_accepts_any_correct_expression(answer):
    assert is_solution(Q72, answer)


@pytest.mark.parametrize(
    "answer",
    [
        "8 * 8 + 5 - 3",  # 66: wrong value
        "8 * 8 + 8",  # 72, but reuses 8 and leaves out 3 and 5
        "8 * 9",  # 72, numbers missing
        "8 * 8 + 5 + 3 + 0",  # 72, an extra number
        "8 * 8 + 5 + 2 + 1",  # 72, a number split in two
        "3 * 3 * 8 + 5 - 5",  # 72 from the right set of numbers, but not the right multiset
        "72",
        "8 * 8 + 5 + 3)",
        "8 * 8 + 5 + 3 = 72",
        "",
        None,
    ],
)
def test_is_solution_rejects_wrong_or_malformed_answers(answer):
    assert not is_solution(Q72, answer)


def test_is_solution_checks_the_final_expression_and_the_questions_operators():
    # The famous 24 from 3, 3, 8, 8 needs a fraction on the way: a correct answer, though no step
    # sequence under the integer rules reaches it.
    question = "Make 24 from 3, 3, 8, 8 with + - * /, using each number once."
    assert is_solution(question, "8 / (3 - 8 / 3)")
    assert not solvable([3, 3, 8, 8], 24)
    assert is_solution("Make 12 from 2, 3, 8 with + - * /, using each number once.", "8 / 2 * 3")
    assert not is_solution(Q12_NO_DIVISION, "8 / 2 * 3")  # "/" is not allowed by this question
    assert not is_solution("What is 2 + 3?", "2 + 3")  # not a countdown question: False, no raise


def test_grade_reads_the_boxed_answer_after_the_think_end_tag():
    assert grade("8 * 8 = 64.\n\n</think>\n\\boxed{8 * 8 + 5 + 3}", Q72)
    assert not grade("</think>\n\\boxed{8 * 8 + 5 - 3}", Q72)
    assert not grade("\\boxed{8 * 8 + 5 + 3}", Q72)  # never finished thinking
    assert grade("\\boxed{8 * 8 + 5 + 3}", Q72, think_end=None)
    assert not grade("</think>\n\\boxed{8 * 8 + 5 + 3", Q72)  # box never closed
    assert not grade(None, Q72)


def test_normalize_answer_merges_spellings_of_one_tree_only():
    assert normalize_answer("((8-5)*8)*3") == normalize_answer(" (8 - 5) * 8 * 3 ") == "(8-5)*8*3"
    assert normalize_answer("(8 * 8 + 5 + 3)") == "8*8+5+3"
    assert normalize_answer("8 - (5 - 3)") == "8-(5-3)"  # needed parentheses stay
    # Different correct expressions stay different votes.
    assert normalize_answer("8 * (8 - 5) * 3") != normalize_answer("(8 - 5) * 8 * 3")
    assert normalize_answer("(8 - 5) * (8 * 3)") != normalize_answer("(8 - 5) * 8 * 3")
    assert normalize_answer("8 +  x") == "8+x"  # malformed: whitespace removed only


# ---------------------------------------------------------------- solver

@pytest.mark.parametrize(
    "numbers, target, expected",
    [
        ([5], 5, True),
        ([5], 6, False),
        ([7, 2], 5, True),  # 7 - 2, whichever order the numbers are given in
        ([2, 7], 5, True),
        ([7, 2], 3, False),  # 7 / 2 is not exact
        ([3, 5], -2, False),  # 3 - 5 is negative
        ([8, 2], 4, True),
        ([1, 2, 3], 9, True),  # (1 + 2) * 3
        ([1, 2, 3], 10, False),  # 9 is the most 1, 2, 3 can make
        ([4, 4, 4], 0, True),  # 4 - 4 = 0, 0 * 4 = 0: zero is a legal value
        ([9, 9, 9], 729, False),  # above max_value = 100
        ([3, 3, 8, 8], 24, False),  # only via a fraction
        ([3, 5, 8, 8], 72, True),
        ([3, 5, 16], 72, False),  # the dead end after 8 + 8 = 16 (see the step_truth test)
        ([1, 1, 1, 1, 1], 5, True),
    ],
)
def test_solvable_known_cases(numbers, target, expected):
    assert solvable(numbers, target) is expected
    assert bool(solutions(numbers, target)) is expected


def test_solvable_follows_the_config_rules():
    assert solvable([9, 9, 9], 729, CountdownConfig(max_value=729))
    assert not solvable([6, 2], 3, CountdownConfig(operators=("+", "-", "*")))
    assert solvable([6, 2], 3, CountdownConfig(operators=("/",)))
    with pytest.raises(ValueError, match="at least one number"):
        solvable([], 3)


def test_solvable_is_fast_for_five_numbers():
    countdown._reachable.cache_clear()
    start = time.perf_counter()
    results = [solvable([11, 13, 17, 19, 20], target) for target in range(101)]
    assert time.perf_counter() - start < 2.0
    assert sum(results) > 50


def test_solutions_enumerates_every_tree():
    assert solutions([2, 3], 6) == ["2 * 3", "3 * 2"]
    assert solutions([3, 2], 1) == ["3 - 2"]
    assert solutions([6, 3], 2) == ["6 / 3"]
    assert solutions([1, 2, 3], 9) == ["(1 + 2) * 3", "(2 + 1) * 3", "3 * (1 + 2)", "3 * (2 + 1)"]
    assert solutions([2, 2], 4) == ["2 * 2", "2 + 2"]  # equal numbers do not double the count
    found = solutions([3, 5, 8, 8], 72)
    assert {"8 * (8 - 5) * 3", "8 * 8 + 5 + 3", "(5 + 3) * 8 + 8"} <= set(found)
    assert all(is_solution(Q72, answer) for answer in found)
    assert len({normalize_answer(answer) for answer in found}) == len(found)


def test_solvable_agrees_with_exhaustive_enumeration():
    for numbers in [(1, 2), (3, 5, 8), (2, 2, 7), (4, 6, 9), (1, 13, 20), (2, 3, 5, 7)]:
        for target in range(0, 101, 3):
            assert solvable(numbers, target) is bool(solutions(numbers, target)), (numbers, target)


# ---------------------------------------------------------------- step truth

@pytest.mark.parametrize(
    "steps, expected",
    [
        (["8 - 5 = 3", "8 * 3 = 24", "24 * 3 = 72"], [True, True, True]),  # the reference
        (["8 * 8 = 64", "64 + 5 = 69", "69 + 3 = 72"], [True, True, True]),  # another route
        (["5 + 3 = 8", "8 * 8 = 64", "64 + 8 = 72"], [True, True, True]),  # a result joins two 8s
        (["8 - 5 = 3", "3 * 3 = 9", "9 * 8 = 72"], [True, True, True]),  # two 3s once 8 - 5 is done
        (["8 - 5 = 3", "8 * 3 = 24"], [True, True]),  # unfinished but on track
        ([" 8-5 =3 "], [True]),  # spacing is free
        (["8 - 5 = 4", "8 * 4 = 32", "32 + 8 = 40"], [False, False, False]),  # arithmetic slip
        (["8 - 5 = 3", "8 * 3 = 24", "24 + 3 = 27"], [True, True, False]),  # last step misses
        (["8 - 5 = 4", "8 * 8 = 64", "64 + 8 = 72"], [False, False, False]),  # false stays false
        (["8 * 9 = 72"], [False]),  # 9 is not available
        (["3 * 3 = 9"], [False]),  # only one 3 before any step
        (["8 + 8 = 16", "16 * 5 = 80", "80 - 3 = 77"], [False, False, False]),  # dead end
        (["5 - 8 = -3"], [False]),  # negative
        (["5 - 8 = 3"], [False]),  # operand order matters
        (["8 / 3 = 2"], [False]),  # inexact division
        (["8 - 5 = 3", "8 * 3 = 24", "24 * 3 = 72", "72 + 0 = 72"], [True, True, True, False]),
        (["8 - 5 = 3."], [False]),
        (["eight minus five is three"], [False]),
        (["8 - 5 = 03"], [False]),
        (["8" * 5000 + " - 5 = 3"], [False]),  # far too long: False, not an int() error
        ([None], [False]),
        ([], []),
    ],
)
def test_step_truth_hand_examples(steps, expected):
    assert step_truth(Q72, steps) == expected


def test_step_truth_counts_copies():
    question = "Make 12 from 2, 3, 8 with + - * /, using each number once."
    # One 2 in the question, so 2 * 2 is not a valid step, although 3, 4, 8 could still make 12.
    assert solvable([3, 4, 8], 12)
    assert step_truth(question, ["2 * 2 = 4", "8 - 4 = 4", "4 * 3 = 12"]) == [False, False, False]
    assert step_truth(question, ["8 / 2 = 4", "4 * 3 = 12"]) == [True, True]


def test_step_truth_uses_the_questions_operators_and_the_configs_bound():
    assert step_truth("Make 12 from 2, 3, 8 with + - * /, using each number once.", ["8 / 2 = 4", "4 * 3 = 12"]) == [
        True, True,
    ]
    assert step_truth(Q12_NO_DIVISION, ["8 / 2 = 4", "4 * 3 = 12"]) == [False, False]
    assert step_truth(Q72, ["8 * 8 = 64"], CountdownConfig(max_value=50, max_target=50)) == [False]
    with pytest.raises(ValueError, match="not a countdown question"):
        step_truth("What is 2 + 3?", ["2 + 3 = 5"])


# ---------------------------------------------------------------- generation

def rules_hold(problem: Problem, config: CountdownConfig) -> None:
    numbers, target = parse_question(problem.question)
    assert len(numbers) == config.n_numbers and len(problem.steps) == config.n_numbers - 1
    assert all(config.min_operand <= n <= config.max_operand for n in numbers)
    assert config.min_target <= target <= config.max_target
    assert config.allow_target_in_numbers or target not in numbers
    assert problem.steps[-1].endswith(f"= {target}")
    assert all(0 <= int(step.rsplit("= ", 1)[1]) <= config.max_value for step in problem.steps)
    assert is_solution(problem.question, problem.answer)
    assert evaluate_expression(problem.answer) == (target, tuple(sorted(numbers)))
    assert step_truth(problem.question, problem.steps, config) == [True] * len(problem.steps)
    assert extract_answer(problem.completion, think_end=THINK_END) == problem.answer
    assert grade(problem.completion, problem.question)
    assert problem.completion.count(STEP_DELIMITER) == len(problem.steps)


@pytest.mark.parametrize(
    "config",
    [
        CountdownConfig(),
        CountdownConfig().harder(),
        CountdownConfig(max_operand=9, operators=("+", "-", "*"), min_target=1, max_target=50, max_value=60),
        CountdownConfig(n_numbers=2, allow_target_in_numbers=True, min_target=0),
    ],
)
def test_generated_problems_follow_the_rules(config):
    problems = generate(config, 200, seed=3)
    for problem in problems:
        rules_hold(problem, config)
        assert set(countdown._parse_question(problem.question)[2]) == set(config.operators)
    assert len({p.question for p in problems}) == len(problems)


def test_default_problems_use_every_operator_and_stay_short():
    problems = generate(CountdownConfig(), 1000, seed=0)
    used = Counter(op for p in problems for op in {step.split()[1] for step in p.steps})
    assert all(used[op] > 30 for op in "+-*/"), used
    assert sum({step.split()[1] for step in p.steps} == {"+"} for p in problems) < 400  # not mostly sums
    assert max(len(p.prompt + p.completion) for p in problems) < 140


def test_generation_is_deterministic_per_seed():
    config = CountdownConfig()
    assert generate(config, 50, seed=7) == generate(config, 50, seed=7)
    assert generate(config, 50, seed=7) != generate(config, 50, seed=8)
    assert generate(config, 80, seed=7)[:50] == generate(config, 50, seed=7)
    assert generate(config, 20, seed=7, split="test") != generate(config, 20, seed=7)


def test_splits_are_disjoint_and_hard_has_one_more_number():
    config = CountdownConfig()
    splits = make_splits(config, seed=1, n_train=1000, n_test=200, n_hard=100)
    questions = {name: {p.question for p in ps} for name, ps in splits.items()}
    assert [len(questions[s]) for s in ("train", "test", "hard")] == [1000, 200, 100]
    assert not questions["train"] & questions["test"]
    assert not questions["train"] & questions["hard"]
    assert not questions["test"] & questions["hard"]
    assert all(not in_eval_pool(q) for q in questions["train"])
    assert all(in_eval_pool(q) for q in questions["test"] | questions["hard"])
    assert all(len(parse_question(p.question)[0]) == 4 for p in splits["hard"])
    assert splits == make_splits(config, seed=1, n_train=1000, n_test=200, n_hard=100)
    # hard_config replaces the default harder(); exclude keeps hard apart from test even at equal difficulty
    same = make_splits(config, seed=1, n_train=0, n_test=100, n_hard=100, hard_config=config)
    assert not {p.question for p in same["test"]} & {p.question for p in same["hard"]}


def test_generate_argument_errors():
    with pytest.raises(ValueError, match="unknown split"):
        generate(CountdownConfig(), 1, seed=0, split="dev")
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate(CountdownConfig(), -1, seed=0)


def test_too_small_problem_space_raises():
    config = CountdownConfig(n_numbers=2, max_operand=5, operators=("+",), min_target=1, max_target=10)
    with pytest.raises(ValueError, match="too small"):
        generate(config, 100, seed=0)


def test_unreachable_target_range_raises():
    config = CountdownConfig(max_operand=2, operators=("+",), min_target=90, max_target=100)
    with pytest.raises(ValueError, match="could not draw a target"):
        generate(config, 1, seed=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_numbers=1), "n_numbers"),
        (dict(n_numbers=7), "n_numbers"),
        (dict(min_operand=0), "min_operand"),
        (dict(min_operand=5, max_operand=4), "min_operand"),
        (dict(operators=("+", "^")), "unknown operators"),
        (dict(operators=()), "non-empty"),
        (dict(operators="+-"), "non-empty tuple"),
        (dict(max_value=10), "max_value=10 is below max_operand=20"),
        (dict(min_target=50, max_target=40), "min_target <= max_target"),
        (dict(max_target=200), "max_target <= max_value"),
        (dict(min_target=-1), "0 <= min_target"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CountdownConfig(**kwargs)


def test_harder_adds_one_number_and_keeps_the_rest():
    config = CountdownConfig(max_operand=12)
    assert config.harder() == CountdownConfig(n_numbers=4, max_operand=12)
    with pytest.raises(ValueError, match="n_numbers"):
        CountdownConfig(n_numbers=countdown.MAX_NUMBERS).harder()


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_trained_on_train_texts_round_trips_countdown_completions():
    splits = make_splits(CountdownConfig(), seed=0, n_train=300, n_test=20, n_hard=20)
    tokenizer = train_tokenizer(p.prompt + p.completion for p in splits["train"])
    delimiter_id = structure_token_ids(tokenizer)[STEP_DELIMITER]
    for problem in splits["test"] + splits["hard"]:
        text = problem.prompt + problem.completion
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert ids.count(delimiter_id) == len(problem.steps)
