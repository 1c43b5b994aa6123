"""`thinkscale eval`: sample k answers per question with a reflective model, grade them, and report
accuracy of every selection strategy (SPRM best-of-k, majority, weighted vote, pass@k) against k.

    thinkscale eval --model runs/grpo/final --data test.jsonl --mode high
    thinkscale eval --model DIR --data test.jsonl --k 1,2,4,8 --out runs/eval/mine   # rerun resumes
    thinkscale eval --model DIR --data test.jsonl --k 8,32 --search prune:signal=confidence --search beam:width=4
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from thinkscale.reflect.select import EFFORT_K
from thinkscale.commands.argtypes import ensure_writable_dir, positive_int
from thinkscale.commands.model_args import add_model_arguments, add_sampling_arguments, load_model_from_args

logger = logging.getLogger(__name__)


def _k_list(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated positive integers, e.g. 1,2,4,8")
    return tuple(sorted({positive_int(p) for p in parts}))


def ks_for_effort(k_max: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to k_max, and k_max itself: the curve a reasoning-effort mode sits on."""
    ks, k = [], 1
    while k < k_max:
        ks.append(k)
        k *= 2
    return tuple(ks + [k_max])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from thinkscale.tasks.registry import help_text

    add_model_arguments(parser, required=True)
    parser.add_argument("--data", required=True, metavar="FILE",
                        help='JSONL file with one {"question": ..., "answer": ...} object per line')
    effort = parser.add_mutually_exclusive_group()
    effort.add_argument("--mode", choices=list(EFFORT_K),
                        help="reasoning effort: samples per question k = "
                             + ", ".join(f"{m} {k}" for m, k in EFFORT_K.items())
                             + "; reports k = 1, 2, 4, ... up to it (default: medium)")
    effort.add_argument("--k", type=_k_list, metavar="LIST",
                        help="comma-separated group sizes to report, e.g. 1,2,4,8 (the largest is the number "
                             "of samples per question); instead of --mode")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default: runs/eval/<model>-<data>-k<max k>); rerunning into the "
                             "same folder skips the questions already done")
    add_sampling_arguments(parser, repetition_penalty=True)
    parser.add_argument("--max-new-tokens", type=positive_int, default=2048,
                        help="longest completion in tokens; longer ones are cut and usually wrong (default 2048)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="sequences decoded together (default: one question's k samples at a time)")
    parser.add_argument("--seed", type=int, default=0,
                        help="base random seed; question i's samples use seed + i (default 0)")
    parser.add_argument("--think-end", metavar="TAG",
                        help="answers count only after this tag (default: the model's think-end tag, if it has "
                             "one); 'none' searches the whole completion")
    parser.add_argument("--task", default=None, metavar="TASK",
                        help="the data is this task's: grade and vote its way and label every step with its step "
                             "checker where it has one (step AUC, first-error, probe; reasoning-gym tasks have "
                             "none: n/a); default: math answers, no step labels. Tasks: " + help_text())
    parser.add_argument("--grade-timeout", type=float, default=5.0,
                        help="seconds allowed for one answer comparison by math-verify (default 5)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--search", action="append", metavar="METHOD[:OPTIONS]",
                        help="instead of best-of-k sampling, run this test-time search at each k of --k (or the "
                             "--mode's k) and report accuracy against generated tokens; repeat for several. "
                             "best_of_n (k independent samples), prune (options signal=sprm|confidence, warmup=N "
                             "rows decoded in full, keep=percent kept (90), window=tokens per confidence group "
                             "(16)), beam and dvts (width=continuations per surviving row (4)); best_of_n is "
                             "always included as the baseline")
    parser.add_argument("--selectors", default="sprm,majority,deepconf",
                        help="with --search: selection strategies to report (default sprm,majority,deepconf)")
    parser.add_argument("--budget", type=positive_int, default=None, metavar="TOKENS",
                        help="with --search: at most this many generated tokens per question (all its rows together)")


def default_out_dir(model: str, data: str, k_max: int) -> Path:
    return Path("runs") / "eval" / f"{Path(model).resolve().name}-{Path(data).stem}-k{k_max}"


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from thinkscale.reflect.evaluate import EvalConfig, evaluate, make_model_sampler
    from thinkscale.reflect.loading import check_model_arg
    from thinkscale.reflect.report import markdown_table
    from thinkscale.tasks.jsonl import read_examples

    if args.search is not None:
        return run_search(args)
    # Bad input fails here, in one line, before the model loads: data, options, model folder, --out.
    ks = args.k if args.k is not None else ks_for_effort(EFFORT_K[args.mode or "medium"])
    examples = read_examples(args.data)
    config = EvalConfig(ks=ks, temperature=args.temperature, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, seed=args.seed, grade_timeout_s=args.grade_timeout,
                        task=args.task)
    _check_task_data(args.task, examples, args.data)
    check_model_arg(args.model)
    out_dir = Path(args.out) if args.out is not None else default_out_dir(args.model, args.data, max(ks))
    ensure_writable_dir(out_dir)

    rm, tokenizer = _load_model(args)
    think_end = _think_end(rm) if args.think_end is None else (None if args.think_end == "none" else args.think_end)
    config = replace(config, think_end=think_end)
    logger.info("evaluating %d questions, k = %s, into %s", len(examples), list(ks), out_dir)
    report = evaluate(examples, make_model_sampler(rm, tokenizer, config), config, out_dir,
                      format_prompt=lambda question: rm.format_prompt(question, tokenizer),
                      plots=not args.no_plots)
    print(markdown_table(report))
    print(f"wrote {out_dir}")
    return 0


def _load_model(args: argparse.Namespace):
    rm, tokenizer = load_model_from_args(args)
    if not rm.head_is_trained:
        logger.warning("the SPRM head is untrained: sprm@k and weighted@k only show chance")
    return rm, tokenizer


def run_search(args: argparse.Namespace) -> int:
    """`--search`: accuracy against generated tokens for each method and k (reflect.search_eval)."""
    from thinkscale.reflect.evaluate import EvalConfig
    from thinkscale.reflect.loading import check_model_arg
    from thinkscale.reflect.search_eval import SearchStudy, evaluate_search, markdown_search
    from thinkscale.reflect.select import parse_strategy
    from thinkscale.tasks.jsonl import read_examples

    # bad methods, options, data, model folder or --out fail here, in one line, before the model loads
    ks = args.k if args.k is not None else (EFFORT_K[args.mode or "medium"],)
    methods = tuple(dict.fromkeys(["best_of_n", *args.search]))
    selectors = tuple(s.strip() for s in args.selectors.split(",") if s.strip())
    for s in selectors:
        parse_strategy(s)
    study = SearchStudy(methods, ks, selectors, args.budget)
    study.configs()
    examples = read_examples(args.data)
    _check_task_data(args.task, examples, args.data)
    check_model_arg(args.model)
    out_dir = Path(args.out) if args.out is not None else (
        Path("runs") / "eval" / f"{Path(args.model).resolve().name}-{Path(args.data).stem}-search")
    ensure_writable_dir(out_dir)
    rm, tokenizer = _load_model(args)
    think_end = _think_end(rm) if args.think_end is None else (None if args.think_end == "none" else args.think_end)
    config = EvalConfig(ks=ks, temperature=args.temperature, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                        seed=args.seed, think_end=think_end, grade_timeout_s=args.grade_timeout, task=args.task)
    logger.info("search study on %d questions: %s at k = %s, into %s", len(examples), ", ".join(methods),
                list(ks), out_dir)
    report = evaluate_search(examples, rm, tokenizer, study, config, out_dir,
                             format_prompt=lambda question: rm.format_prompt(question, tokenizer),
                             plots=not args.no_plots)
    print(markdown_search(report))
    print(f"wrote {out_dir}")
    return 0


def _check_task_data(task: str | None, examples, source: str) -> None:
    """An unknown task, or data the task cannot grade (a gym record without metadata), fails in one line."""
    if task is not None:
        from thinkscale.tasks.registry import get_task

        get_task(task).check(examples, source)


def _think_end(rm) -> str | None:
    tags = getattr(rm, "think_tags", None)
    if tags is None:
        tags = rm.config.think_tags
    return None if tags is None else tags[1]
