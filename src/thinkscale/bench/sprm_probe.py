"""Does the information exist? Linear probes on the policy's hidden states against the true step labels.

    thinkscale bench probe --model runs/demo/grpo --candidates runs/demo/eval/grpo-test/candidates.jsonl

Reads graded candidates that carry per-step truth (`extra["step_truth"]`, written by `thinkscale eval
--task NAME` and by the demo), runs one forward pass per candidate with every hidden state kept, and
takes, for each scored step, the output of each decoder layer at four positions:

    scored     the position that predicts the delimiter (what the SPRM head reads)
    delimiter  the delimiter token itself
    equals     the last "=" of the step (the scored position when the step has none)
    mean       the mean over the step's tokens

A logistic probe (standardized inputs, L2, L-BFGS) is fitted on the steps of half the questions and
its ROC AUC measured on the other half (split by question, so no question is on both sides): the
ceiling that a linear head on those features reaches with *true* labels. The SPRM head is trained from
outcomes only, so it should not be expected above the best cell. Writes probe.json and probe.md.

Memory: each step keeps (positions x layers x hidden size) features in 16 bits, copied out of the batch's
hidden states so those are freed; `--layers` keeps fewer (SmolLM2's 30 layers x 576: 138 kB a step, so
3200 candidates of ~5 steps take about 2 GB).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

POSITIONS = ("scored", "delimiter", "equals", "mean")
L2 = 1e-3
FEATURE_DTYPE = torch.float16  # kept features (float32 once a value exceeds its range); probes fit in fp32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="the model that sampled the candidates: a model folder, smollm2 or a fit-head folder")
    parser.add_argument("--candidates", required=True, metavar="FILE",
                        help="candidates.jsonl with step truth (from `thinkscale eval --task NAME` or the demo)")
    parser.add_argument("--out", metavar="DIR", help="where probe.json/probe.md go (default: beside --candidates)")
    parser.add_argument("--max-candidates", type=int, default=4000, help="candidates read, at most")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass")
    parser.add_argument("--layers", type=parse_layers, metavar="N,N,...",
                        help="decoder layers to probe, counted from 1 (default: all; fewer keep less in memory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe fits")


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers like 19,23,29, got {text!r}") from None
    if not layers or layers[0] < 1:
        raise argparse.ArgumentTypeError(f"expected layer numbers >= 1, got {text!r}")
    return layers


def question_side(question: str) -> bool:
    """True for the probe's training half (a stable hash of the question text)."""
    return hashlib.sha256(question.encode("utf-8")).digest()[0] % 2 == 0


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = L2, iterations: int = 100) -> tuple[torch.Tensor, ...]:
    """Logistic regression on standardized x: returns (mean, std, weight, bias)."""
    mean, std = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mean, std, w.detach(), b.detach()


def probe_auc(train_x, train_y, test_x, test_y) -> float | None:
    from thinkscale.reflect.scorers import roc_auc

    if train_y.min() == train_y.max():
        return None
    mean, std, w, b = fit_probe(train_x, train_y)
    scores = ((test_x - mean) / std) @ w + b
    return roc_auc(scores.tolist(), [bool(v) for v in test_y.tolist()])


@torch.no_grad()
def step_features(rm, tokenizer, records: list[tuple[str, object]], batch_size: int,
                  layers: tuple[int, ...] | None = None, progress: bool = True):
    """Per labelled step: {position: (steps, layers, c) features}, its truth and its question's side.
    `layers`: decoder layers counted from 1 (default: all)."""
    from thinkscale.reflect.confidence import step_spans
    from thinkscale.reflect.generate import encode_prompt

    equals_ids = {i for t, i in tokenizer.get_vocab().items() if "=" in tokenizer.convert_tokens_to_string([t])}
    feats = {p: [] for p in POSITIONS}
    labels, sides = [], []
    dtype = FEATURE_DTYPE
    for lo in tqdm(range(0, len(records), batch_size), desc="probe features", unit="batch", disable=not progress):
        batch = records[lo:lo + batch_size]
        seqs = [encode_prompt(tokenizer, rm.format_prompt(q, tokenizer)) + c.token_ids for q, c in batch]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s)
            attn[b, :len(s)] = 1
        out = rm.policy(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False)
        outputs = out.hidden_states[1:]  # each decoder layer's output
        hidden = torch.stack([outputs[i - 1] for i in layers] if layers else list(outputs), dim=1)  # (B, L, T, c)
        rows = {p: [] for p in POSITIONS}
        for b, (question, c) in enumerate(batch):
            P = len(seqs[b]) - len(c.token_ids)
            for (start, end), truth in zip(step_spans(c.step_ends), c.extra["step_truth"]):
                eq = [g for g in range(start, end) if c.token_ids[g] in equals_ids]
                at = {"scored": P + end - 1, "delimiter": P + end, "equals": P + (eq[-1] if eq else end - 1)}
                for name, pos in at.items():
                    rows[name].append(hidden[b, :, pos])
                rows["mean"].append(hidden[b, :, P + start:P + end + 1].mean(dim=1))
                labels.append(float(truth))
                sides.append(question_side(question))
        if rows["scored"]:
            stacked = {p: torch.stack(rows[p]) for p in POSITIONS}  # copies: the batch's hidden states are freed
            if dtype == FEATURE_DTYPE and any(v.abs().max() > torch.finfo(dtype).max for v in stacked.values()):
                dtype = torch.float32  # a massive activation past float16's range: keep everything in fp32
                logger.info("hidden states beyond float16's range: keeping the probe's features in float32")
                feats = {p: [v.float() for v in kept] for p, kept in feats.items()}
            for p in POSITIONS:
                feats[p].append(stacked[p].to(dtype))
    return {p: torch.cat(v) for p, v in feats.items()}, torch.tensor(labels), torch.tensor(sides)


def run(args: argparse.Namespace) -> int:
    from thinkscale.reflect.evaluate import load_records
    from thinkscale.reflect.loading import load_model

    path = Path(args.candidates)
    if not path.is_file():
        print(f"thinkscale bench probe: error: no candidates file {path}", file=sys.stderr)
        return 2
    questions = {r["index"]: r["question"] for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    records = [(questions[i], c) for i, cands in sorted(load_records(path).items()) for c in cands
               if c.extra.get("step_truth")][: args.max_candidates]
    if not records:
        print(f"thinkscale bench probe: error: no candidate in {path} has step truth; evaluate with "
              "`thinkscale eval --task NAME` (or use the demo's eval folders)", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    rm, tokenizer = load_model(args.model)  # a folder, smollm2 or a fit-head folder: the prompt format the eval used
    rm.eval()
    total = rm.policy.config.num_hidden_layers
    if args.layers and args.layers[-1] > total:
        print(f"thinkscale bench probe: error: --layers {args.layers[-1]}: the model has {total} decoder layers",
              file=sys.stderr)
        return 2
    layers = args.layers or tuple(range(1, total + 1))
    feats, labels, sides = step_features(rm, tokenizer, records, args.batch_size, layers)
    table = {p: [probe_auc(feats[p][sides, i].float(), labels[sides], feats[p][~sides, i].float(), labels[~sides])
                 for i in range(len(layers))] for p in tqdm(POSITIONS, desc="probe fits", unit="position")}
    result = {"model": args.model, "candidates": str(path), "steps": len(labels),
              "train_steps": int(sides.sum()), "positive_share": float(labels.mean()),
              "max_candidates": args.max_candidates, "feature_layer": rm.config.feature_layer % total + 1,
              "layers": list(layers),
              "auc": table}
    out = Path(args.out) if args.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md = markdown(result)
    (out / "probe.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


def markdown(result: dict) -> str:
    layers = result.get("layers") or list(range(1, len(result["auc"]["scored"]) + 1))
    lines = ["# Linear probe of the true step labels", "",
             f"{result['steps']} labelled steps ({result['train_steps']} on training questions, "
             f"{100 * result['positive_share']:.1f}% on track); held-out ROC AUC by decoder layer and position. "
             f"The SPRM head reads layer {result['feature_layer']} at the scored position.", "",
             "| position | " + " | ".join(f"layer {i}" for i in layers) + " |",
             "|---|" + "---:|" * len(layers)]
    for position, row in result["auc"].items():
        lines.append(f"| {position} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
