"""The decode engine's speed, part of `thinkscale bench reflect` (`--parts engine`).

Two measurements on one model, each in interleaved rounds (the order rotates, so slow drifts of a shared
machine hit every contender alike); ratios are taken per round, then medianed:

1. **Equal work** against the model's own speed. B rows (each of `--batch-sizes`), N new tokens each,
   EOS ignored, prefill included in both:
   - `bare`: the policy's forward loop on its KV cache with greedy argmax and nothing else: no hook, no
     sampling, no per-row bookkeeping. The floor any engine pays.
   - `engine`: `decode_rows` as `sample` runs it: temperature and top-p sampling from per-row streams,
     features kept where a step can end, the free confidences of every token.
   Target of issue 24: engine >= 0.8 x bare tokens/s at batch 64.
2. **Natural EOS** against the engine's former costs. k samples of each prompt, same seeds, rows end at
   EOS or N tokens:
   - `sort_copy`: `nucleus_slice=0` (every sampled row's whole vocabulary sorted at every token) and
     `compact_every=1` (one KV-cache copy per ended row): the two largest costs of the engine before
     issue 24 put back. Not the whole former engine: its log-prob matrix for the confidences, per-token
     features and per-row Python bookkeeping are gone from both, so the speed-up understates. It draws
     the same tokens as `engine` (both walk the nucleus in descending probability), so the two do equal
     work; the old engine's sampler walked it in id order (other tokens for a seed, same distribution).
   - `engine`: the defaults.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

ENGINE_TARGET_RATIO = 0.8


def median_ratio(values: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of values[i] / base[i] (both measured in round i)."""
    if len(values) != len(base) or not values:
        raise ValueError(f"need equally many (>= 1) values and baselines, got {len(values)} and {len(base)}")
    return statistics.median(v / b for v, b in zip(values, base))


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    shift = round_index % len(names)
    return list(names[shift:]) + list(names[:shift])


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def bare_loop(rm, prompts: list[list[int]], new_tokens: int, pad_id: int) -> int:
    """The policy's own greedy decode loop on its KV cache; returns the tokens generated."""
    import torch

    from thinkscale.reflect.engine import left_padded

    device = next(rm.policy.parameters()).device
    ids, attn = left_padded(prompts, pad_id, device)
    positions = (attn.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        out = rm(ids, attention_mask=attn, position_ids=positions, use_cache=True, compute_step_logits=False)
        next_pos = attn.sum(dim=1, keepdim=True)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        ones = torch.ones(len(prompts), 1, dtype=attn.dtype, device=device)
        for _ in range(new_tokens - 1):
            attn = torch.cat([attn, ones], dim=1)
            out = rm(token, attention_mask=attn, position_ids=next_pos, cache=out.cache, use_cache=True,
                     compute_step_logits=False)
            next_pos = next_pos + 1
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    return len(prompts) * new_tokens


def measure(rm, tokenizer, prompt_ids: list[list[int]], *, batch_sizes: Sequence[int], new_tokens: int, k: int,
            natural_prompts: int, temperature: float, top_p: float, seed: int, repeats: int, device: str,
            log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Both measurements (see the module doc) on `rm`; prompt_ids must hold max(batch_sizes) prompts."""
    import torch

    from thinkscale.reflect.engine import RowSpec, decode_rows, row_seed
    from thinkscale.reflect.generate import eos_token_ids, pad_token_id

    if len(prompt_ids) < max(batch_sizes) or len(prompt_ids) < natural_prompts:
        raise ValueError(f"need {max(max(batch_sizes), natural_prompts)} prompts, got {len(prompt_ids)}")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    eos = eos_token_ids(rm, tokenizer)
    pad = pad_token_id(tokenizer, eos)
    openers = rm.step_feature_tokens(tokenizer)

    def engine(specs, ended: set[int], **settings) -> int:
        rows = decode_rows(rm, specs, ended, pad, feature_tokens=openers, **settings)
        return sum(len(r.tokens) for r in rows)

    equal_work = []
    for b in batch_sizes:
        prompts = prompt_ids[:b]
        specs = [RowSpec(p, new_tokens, temperature, top_p, row_seed(seed, i, 0)) for i, p in enumerate(prompts)]
        contenders = {"bare": lambda: bare_loop(rm, prompts, new_tokens, pad),
                      "engine": lambda: engine(specs, set())}  # no EOS: every row runs new_tokens
        times = _rounds(contenders, repeats, sync, f"batch {b}", log)
        tokens = b * new_tokens
        equal_work.append({
            "batch": b, "tokens": tokens,
            **{f"{name}_s": times[name] for name in contenders},
            **{f"{name}_tokens_per_s": tokens / statistics.median(times[name]) for name in contenders},
            "ratio": median_ratio(times["bare"], times["engine"]),  # engine tokens/s over bare tokens/s
        })

    natural_specs = [RowSpec(p, new_tokens, temperature, top_p, row_seed(seed, i, j))
                     for i, p in enumerate(prompt_ids[:natural_prompts]) for j in range(k)]
    generated: dict[str, int] = {}

    def natural(name: str, **settings) -> Callable[[], int]:
        def run() -> int:
            generated[name] = engine(natural_specs, eos, **settings)
            return generated[name]
        return run

    contenders = {"sort_copy": natural("sort_copy", nucleus_slice=0, compact_every=1), "engine": natural("engine")}
    times = _rounds(contenders, repeats, sync, f"natural EOS, {len(natural_specs)} rows", log)
    return {
        "new_tokens": new_tokens, "temperature": temperature, "top_p": top_p, "repeats": repeats,
        "equal_work": equal_work,
        "natural_eos": {
            "rows": len(natural_specs), "k": k, "prompts": natural_prompts, "generated": generated,
            **{f"{name}_s": times[name] for name in contenders},
            **{f"{name}_tokens_per_s": generated[name] / statistics.median(times[name]) for name in contenders},
            "speedup": median_ratio(times["sort_copy"], times["engine"]),  # sort_copy time over engine time
        },
    }


def _rounds(contenders: dict[str, Callable[[], int]], repeats: int, sync, what: str,
            log: Callable[[str], None]) -> dict[str, list[float]]:
    """One untimed warm-up call each, then `repeats` rotated rounds; seconds per contender per round."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(repeats):
        for name in rotated(list(contenders), r):
            seconds, _ = _timed(contenders[name], sync)
            times[name].append(seconds)
        log(f"{what}: round {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))
    return times


def format_section(name: str, record: dict[str, Any]) -> list[str]:
    """Markdown lines for one model's engine measurements."""
    lines = [
        f"### {name}: decode engine",
        "",
        f"Equal work: every row generates {record['new_tokens']} tokens (EOS ignored), prefill included; "
        f"engine = sampling (temperature {record['temperature']}, top-p {record['top_p']}) + features at "
        f"possible step ends + free confidences; bare = the policy's own greedy forward loop. Median of "
        f"{record['repeats']} interleaved rounds; the ratio is per round, then medianed.",
        "",
        "| batch | bare tokens/s | engine tokens/s | engine / bare |",
        "|---:|---:|---:|---:|",
    ]
    for row in record["equal_work"]:
        lines.append(f"| {row['batch']} | {row['bare_tokens_per_s']:.1f} | {row['engine_tokens_per_s']:.1f} | "
                     f"{row['ratio']:.2f} |")
    n = record["natural_eos"]
    target = next((r for r in record["equal_work"] if r["batch"] == 64), None)
    if target is not None:
        verdict = "met" if target["ratio"] >= ENGINE_TARGET_RATIO else "not met"
        lines += ["", f"Target engine >= {ENGINE_TARGET_RATIO} x bare at batch 64: {target['ratio']:.2f} ({verdict})."]
    lines += [
        "",
        f"Natural EOS: {n['rows']} rows ({n['prompts']} prompts x k = {n['k']}), up to {record['new_tokens']} tokens; "
        f"sort_copy = the engine with its two largest costs before issue 24 put back (whole-vocabulary sort per "
        f"token, one cache copy per ended row). Generated tokens: engine {n['generated']['engine']}, "
        f"sort_copy {n['generated']['sort_copy']}.",
        "",
        "| contender | median s | tokens/s |",
        "|---|---:|---:|",
        f"| sort_copy | {statistics.median(n['sort_copy_s']):.2f} | {n['sort_copy_tokens_per_s']:.1f} |",
        f"| engine | {statistics.median(n['engine_s']):.2f} | {n['engine_tokens_per_s']:.1f} |",
        "",
        f"Engine speed-up over sort_copy: {n['speedup']:.2f}x.",
        "",
    ]
    return lines
