"""`thinkscale fit-head`: fit an SPRM head to any model from the outcomes of its own rollouts.

    thinkscale fit-head --model smollm2 --task arithmetic --out runs/fit-smollm2
    thinkscale fit-head --model my-model --data train.jsonl --task arithmetic --out runs/fit --inputs features+confidence
    thinkscale eval --model runs/fit-smollm2 --data test.jsonl          # the head with the policy it was fitted to
    thinkscale serve --model runs/fit-smollm2

The policy stays frozen. `--samples` rollouts of each of `--questions` training questions are sampled
(a task's train split, or a JSONL file), graded by the task, and cached in OUT/rollouts/ batch by batch,
so an interrupted run continues where it stopped. A fresh head is then fitted with the SPR loss on the
cached step features (`reflect.head_fit`: epochs, early stopping on held-out training questions) and
saved in OUT with its record (sprm_head.json: the policy's fingerprint, task, statistics): OUT is then
a `--model` for eval and serve, and `ReflectiveModel.from_pretrained(OUT)` loads the pair.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from thinkscale.commands.argtypes import ensure_writable_dir, positive_float, positive_int
from thinkscale.commands.model_args import add_model_arguments, add_sampling_arguments, device, instruction, step_delimiter

logger = logging.getLogger(__name__)

ROLLOUT_DIR = "rollouts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from thinkscale.reflect.head import HEAD_INPUTS
    from thinkscale.reflect.head_fit import HeadFitOptions

    d = HeadFitOptions()
    add_model_arguments(parser, required=True, head=False,
                        model_help="the policy to fit a head to: a Hugging Face causal-LM folder, 'smollm2' "
                                   "(SmolLM2-135M-Instruct, a 4-bit Q4_1 round trip of the released weights), or a "
                                   "fit-head folder (its policy); the policy stays frozen")
    parser.add_argument("--task", metavar="NAME",
                        help="the task whose training questions are sampled and whose grader decides each "
                             "rollout's outcome (thinkscale.tasks.registry, e.g. arithmetic, countdown)")
    parser.add_argument("--data", metavar="FILE",
                        help='JSONL of training questions ({"question", "answer"} per line) instead of the task\'s '
                             "train split; graded by --task's grader, or as math answers without --task")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the head (sprm_head.safetensors, sprm_head.json, reflect_config.json) and "
                             f"the rollout cache ({ROLLOUT_DIR}/); rerunning into it reuses the cached rollouts")
    parser.add_argument("--questions", type=positive_int, default=300,
                        help="training questions sampled (the first of the split or file; default 300)")
    parser.add_argument("--samples", type=positive_int, default=d.samples, help=f"rollouts per question (default {d.samples})")
    parser.add_argument("--inputs", choices=list(HEAD_INPUTS), default="features",
                        help="what the head reads at each step: the policy's hidden state (the spec's head, "
                             "default), + the step's 4 free confidences, or those alone")
    parser.add_argument("--feature-layer", type=positive_int, default=None, metavar="N",
                        help="the decoder layer the head reads, counted from 1 as `thinkscale bench probe` prints "
                             "them (default: the second-to-last, the spec's; saved with the head)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256,
                        help="longest rollout; a longer one is cut, and a cut wrong one is not trained on (default 256)")
    add_sampling_arguments(parser, what="rollout sampling", temperature=d.temperature, top_p=d.top_p)
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="rows decoded together, a multiple of --samples works best; each batch is one cached "
                             "shard (default 64)")
    parser.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"most passes over the steps (default {d.epochs})")
    parser.add_argument("--patience", type=positive_int, default=d.patience,
                        help=f"stop after this many epochs without better held-out pair accuracy (default {d.patience})")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction,
                        help="share of the training questions held out to pick the epoch and the score aggregation "
                             f"(default {d.val_fraction})")
    parser.add_argument("--lr", type=positive_float, default=d.lr, help=f"head learning rate, AdamW (default {d.lr})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the questions drawn, the rollouts and the head's initialization (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"delete the rollouts cached in OUT/{ROLLOUT_DIR} and sample afresh")


def options_from_args(args: argparse.Namespace):
    from thinkscale.reflect.generate import check_sampling
    from thinkscale.reflect.head_fit import HeadFitOptions

    check_sampling(args.temperature, args.top_p, args.max_new_tokens)
    if args.samples < 2:
        raise ValueError("--samples must be >= 2 (the fit ranks rollouts of one question against each other)")
    return HeadFitOptions(inputs=args.inputs, questions=args.questions, samples=args.samples,
                          temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, patience=args.patience,
                          val_fraction=args.val_fraction, seed=args.seed)


def training_questions(task: str | None, data: str | None, n: int, seed: int) -> list:
    """The first `n` questions of the JSONL file `data`, else of the task's train split (drawn with `seed`)."""
    if data is not None:
        from thinkscale.tasks.jsonl import read_examples

        return read_examples(data)[:n]
    from thinkscale.tasks.registry import get_task

    from thinkscale.tasks.jsonl import example_from_record

    chosen = get_task(task)
    splits = chosen.make_splits(chosen.demo_config, seed, n, 0, 0, hard_config=chosen.demo_hard_config)
    # as records, so every question reads like one from a file (a gym question carries its scorer's metadata)
    return [example_from_record(problem.to_record()) for problem in splits["train"]]


def run(args: argparse.Namespace) -> int:
    import shutil

    from thinkscale.reflect.head_fit import collect_rollouts, fit_head
    from thinkscale.reflect.loading import SMOLLM2, check_model_arg, describe_model, load_model
    from thinkscale.tasks.registry import get_task
    from thinkscale.train.evaluation import outcome_grader

    # bad input fails here, in one line, before the model loads
    if args.task is None and args.data is None:
        raise ValueError("give --task NAME (its training questions and grader) or --data FILE")
    if args.task is not None:
        get_task(args.task)  # an unknown name lists the valid ones
    options = options_from_args(args)
    delimiter, line = step_delimiter(args), instruction(args)
    source = check_model_arg(args.model)
    out = Path(args.out)
    if (out / "config.json").is_file():
        raise ValueError(f"--out {out} holds a model; fit-head writes a head folder beside its policy: choose another")
    ensure_writable_dir(out)
    examples = training_questions(args.task, args.data, options.questions, args.seed)
    if not examples:
        raise ValueError(f"{args.data}: no questions")
    if args.task is not None:  # data the task cannot grade (a gym record without metadata) fails before sampling
        get_task(args.task).check(examples, args.data or args.task)
    if args.overwrite and (out / ROLLOUT_DIR).exists():
        shutil.rmtree(out / ROLLOUT_DIR)

    layer = None if args.feature_layer is None else args.feature_layer - 1  # an index into the layer stack
    rm, tokenizer = load_model(args.model, step_delimiter=delimiter, device=device(args), instruction=line,
                               feature_layer=layer)
    task_label = args.task if args.data is None else f"{args.task or 'math'} ({args.data})"
    logger.info("fitting an SPRM head to %s: %d questions x %d rollouts of %s, up to %d tokens each",
                describe_model(args.model), len(examples), options.samples, task_label, options.max_new_tokens)
    start = time.perf_counter()
    rollouts = collect_rollouts(rm, tokenizer, examples, options, outcome_grader(rm, args.task),
                                cache_dir=out / ROLLOUT_DIR, cache_note={"task": task_label})
    sampled = time.perf_counter()
    head, stats = fit_head(rollouts, rm.head.hidden_size, options)
    fitted = time.perf_counter()

    rm.head = head.to(next(rm.policy.parameters()).device)
    rm.config.head_inputs, rm.config.score_aggregation = head.inputs, stats["aggregation"]
    rm.head_is_trained = True
    summary = {k: v for k, v in stats.items() if k != "val_history"}
    summary.update({"questions": len(examples), "samples": options.samples, "rollouts": len(rollouts),
                    "correct_fraction": sum(r.correct for r in rollouts) / len(rollouts),
                    "mean_tokens": sum(r.tokens for r in rollouts) / len(rollouts),
                    "sample_time_s": round(sampled - start, 1), "fit_time_s": round(fitted - sampled, 1),
                    "options": asdict(options), "model": describe_model(args.model)})
    rm.head_provenance = {"origin": "fit-head", "task": task_label, "fit": summary}
    # a policy folder is named relative to the head folder, so the pair can move together
    reference = source.reference if source.reference == SMOLLM2 else os.path.relpath(source.reference, out)
    rm.save_head(out, policy_reference=reference)
    accuracy = "n/a" if stats["val_pair_accuracy"] is None else f"{stats['val_pair_accuracy']:.3f}"
    print(f"fitted a {head.inputs} head on {len(rollouts)} rollouts of {len(examples)} questions "
          f"({summary['correct_fraction']:.1%} correct, {summary['mean_tokens']:.0f} tokens on average) of "
          f"{describe_model(args.model)}: held-out pair accuracy {accuracy} ({stats['aggregation']} aggregation, "
          f"epoch {stats['best_epoch']} of {stats['epochs_run']}); sampling {sampled - start:.0f} s, fit "
          f"{fitted - sampled:.0f} s")
    print(f"saved to {out}: use it as --model {out} (thinkscale eval / serve)")
    return 0
