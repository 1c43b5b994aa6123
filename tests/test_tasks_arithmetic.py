"""The built-in arithmetic task, checked against Python's own parser as the reference evaluator."""
import ast

import pytest

from thinkscale.tasks import PROMPT_TEMPLATE, format_completion, format_prompt
from thinkscale.tasks.arithmetic import (
    ArithmeticConfig,
    Problem,
    generate,
    in_eval_pool,
    make_splits,
    render,
)

_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def reference_steps(question: str) -> tuple[list[str], int]:
    """Steps in evaluation order (left operand first) computed by walking Python's parse tree."""
    assert question.startswith("What is ") and question.endswith("?")
    tree = ast.parse(question[len("What is "):-1], mode="eval").body
    steps = []

    def walk(node):
        if isinstance(node, ast.Constant):
            return node.value
        a, b = walk(node.left), walk(node.right)
        op = _AST_OPS[type(node.op)]
        if op == "/":
            assert b != 0 and a % b == 0, "division must be exact"
            value = a // b
        else:
            value = {"+": a + b, "-": a - b, "*": a * b}[op]
        steps.append(f"{a} {op} {b} = {value}")
        return value

    return steps, walk(tree)


def test_format_of_the_example_problem():
    problem = Problem("What is (23 + 58) * 3 - 17?", "226", ("23 + 58 = 81", "81 * 3 = 243", "243 - 17 = 226"))
    assert PROMPT_TEMPLATE == "{question}\n<think>\n"
    assert problem.prompt == "What is (23 + 58) * 3 - 17?\n<think>\n"
    assert problem.completion == "23 + 58 = 81.\n\n81 * 3 = 243.\n\n243 - 17 = 226.\n\n</think>\n\\boxed{226}"
    assert problem.to_record() == {
        "question": problem.question, "answer": "226", "solution": problem.completion,
    }
    assert format_prompt("Q?") == "Q?\n<think>\n"


def test_format_completion_rejects_a_delimiter_inside_a_step():
    with pytest.raises(ValueError, match="delimiter"):
        format_completion(["1 + 1 = 2.\n\n"], "2")


@pytest.mark.parametrize(
    "expr, text",
    [
        (("-", ("*", ("+", 23, 58), 3), 17), "(23 + 58) * 3 - 17"),
        (("+", 2, ("*", 3, 4)), "2 + 3 * 4"),
        (("+", ("*", 3, 4), 2), "3 * 4 + 2"),
        (("-", 5, ("-", 3, 1)), "5 - (3 - 1)"),
        (("+", 5, ("+", 3, 1)), "5 + (3 + 1)"),  # same value, different tree and step order
        (("/", ("*", 6, 4), ("*", 2, 3)), "6 * 4 / (2 * 3)"),
    ],
)
def test_render_uses_fewest_parentheses_that_keep_the_tree(expr, text):
    assert render(expr) == text


@pytest.mark.parametrize(
    "config",
    [
        ArithmeticConfig(),
        ArithmeticConfig(shape="tree", operators=("+", "-", "*", "/"), allow_negative=True),
        ArithmeticConfig(min_ops=1, max_ops=2, min_digits=2, max_digits=3, max_value=5000),
    ],
)
def test_generated_problems_are_exact_and_solved_in_evaluation_order(config):
    problems = generate(config, 300, seed=3)
    lowest = -config.max_value if config.allow_negative else 0
    for p in problems:
        steps, value = reference_steps(p.question)
        assert list(p.steps) == steps
        assert p.answer == str(value)
        assert config.min_ops <= len(steps) <= config.max_ops
        for step in steps:
            assert lowest <= int(step.rsplit("= ", 1)[1]) <= config.max_value
        operands = [n.value for n in ast.walk(ast.parse(p.question[8:-1], mode="eval")) if isinstance(n, ast.Constant)]
        assert all(10 ** (config.min_digits - 1) <= v < 10**config.max_digits for v in operands)
    assert len({p.question for p in problems}) == len(problems)


def test_division_appears_and_is_exact():
    config = ArithmeticConfig(operators=("/", "+"), shape="tree")
    problems = generate(config, 200, seed=0)
    assert sum("/" in p.question for p in problems) > 50
    for p in problems:
        reference_steps(p.question)  # asserts exactness


def test_generation_is_deterministic_per_seed():
    config = ArithmeticConfig()
    assert generate(config, 50, seed=7) == generate(config, 50, seed=7)
    assert generate(config, 50, seed=7) != generate(config, 50, seed=8)
    # A longer list extends a shorter one: sizes do not change which problems come first.
    assert generate(config, 80, seed=7)[:50] == generate(config, 50, seed=7)


def test_default_problems_are_small_and_use_all_step_counts():
    problems = generate(ArithmeticConfig(), 600, seed=0)
    counts = {n: sum(len(p.steps) == n for p in problems) for n in (2, 3, 4)}
    assert sum(counts.values()) == 600
    assert min(counts.values()) > 120  # roughly uniform in the number of operations
    assert max(len(p.prompt + p.completion) for p in problems) < 160


def test_splits_are_disjoint_and_hard_is_harder():
    config = ArithmeticConfig()
    splits = make_splits(config, seed=1, n_train=2000, n_test=100, n_hard=100)
    questions = {name: {p.question for p in ps} for name, ps in splits.items()}
    assert [len(questions[s]) for s in ("train", "test", "hard")] == [2000, 100, 100]
    assert not questions["train"] & questions["test"]
    assert not questions["train"] & questions["hard"]
    assert not questions["test"] & questions["hard"]
    assert all(not in_eval_pool(q) for q in questions["train"])
    assert all(in_eval_pool(q) for q in questions["test"] | questions["hard"])
    assert min(len(p.steps) for p in splits["hard"]) > config.max_ops
    assert splits == make_splits(config, seed=1, n_train=2000, n_test=100, n_hard=100)


def test_too_small_problem_space_raises():
    config = ArithmeticConfig(min_ops=1, max_ops=1, operators=("+",), max_digits=1, max_value=9)
    with pytest.raises(ValueError, match="too small"):
        generate(config, 100, seed=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_ops=0), "min_ops"),
        (dict(min_ops=3, max_ops=2), "min_ops"),
        (dict(min_digits=2, max_digits=1), "min_digits"),
        (dict(operators=("+", "^")), "unknown operators"),
        (dict(operators=()), "non-empty"),
        (dict(shape="spiral"), "shape"),
        (dict(max_value=5), "max_value"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ArithmeticConfig(**kwargs)


def test_solution_steps_parse_back_every_generated_question():
    from thinkscale.tasks.arithmetic import solution_steps

    for shape in ("chain", "tree"):
        config = ArithmeticConfig(shape=shape, operators=("+", "-", "*", "/"), max_value=999)
        for p in generate(config, 200, seed=4):
            assert solution_steps(p.question) == list(p.steps), p.question


def test_step_truth_by_hand():
    from thinkscale.tasks import completion_steps
    from thinkscale.tasks.arithmetic import step_truth

    q = "What is 7 - 3 + 6 - 5?"  # 7 - 3 = 4, 4 + 6 = 10, 10 - 5 = 5
    assert step_truth(q, ["7 - 3 = 4", "4 + 6 = 10", "10 - 5 = 5"]) == [True, True, True]
    # an arithmetic slip at step 2 makes it and everything after it false, even a "right" last step
    assert step_truth(q, ["7 - 3 = 4", "4 + 6 = 11", "11 - 5 = 6"]) == [True, False, False]
    # a right equation out of order is off track; extra steps beyond the solution are false
    assert step_truth(q, ["3 + 6 = 9", "7 - 9 = -2"]) == [False, False]
    assert step_truth(q, ["7 - 3 = 4", "4 + 6 = 10", "10 - 5 = 5", "5 + 0 = 5"]) == [True, True, True, False]
    assert step_truth(q, [" 7  - 3 = 4"]) == [True]  # spacing does not matter
    # precedence and parentheses follow the question
    assert step_truth("What is 2 + 3 * (4 - 1)?", ["4 - 1 = 3", "3 * 3 = 9", "2 + 9 = 11"]) == [True] * 3
    # the text splitter: steps end with the delimiter, only inside the think part
    text = "7 - 3 = 4.\n\n4 + 6 = 1"  # cut mid-step: one finished step
    assert completion_steps(text) == ["7 - 3 = 4"]
    assert completion_steps("7 - 3 = 4.\n\n</think>\n\\boxed{4}.\n\n") == ["7 - 3 = 4"]
    with pytest.raises(ValueError, match="not an arithmetic question"):
        step_truth("Compute 2 + 2", [])
