"""What does SPRM scoring cost on top of generation? One run, three ways, same tokens:

1. generation alone         - the decode loop with scoring off (no hook, no head)
2. generation + fused score - the same loop keeping the hooked features; head at scored positions
3. generation + rescoring   - generation alone, then a separate full forward over prompt + completion
                              (batched, and one sequence at a time as the released scorer does)

The same seed gives the same tokens in every mode (scoring never touches sampling), so the runs do
the same work apart from scoring. Prints times and ratios; target: fused overhead <= 3%.
Usage: python bench/reflect_overhead.py [--device cpu|cuda] [--new-tokens 256] [--k 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from thinkscale.reflect import ReflectiveModel, sample, score_sequences
from thinkscale.reflect.generate import decode
from thinkscale.reflect.scoring import scores_from_features

TEXT = ["First we add the numbers. Then we check the sum.\n\nThe answer is 12.",
        "Let us think step by step.\n\nTwo plus two is four.\n\nSo it is 4.",
        "Compute 3 times 5 carefully.\n\nThat is 15.\n\nDone."] * 30


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    # no EOS: every candidate runs the full max_new_tokens, so each mode decodes the same length
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def build_model(kind: str, vocab: int, device: str) -> ReflectiveModel:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = cfg_cls(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=2048, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    policy = model_cls(cfg).to(device).eval()
    # " " is frequent in sampled text: many scored steps, the costly case for fused scoring
    return ReflectiveModel.from_pretrained(policy, step_delimiter=" ", think_tags=None)


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds, result); CPU time is steadier on a shared machine."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=["llama", "qwen2"], default="llama")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens generated per candidate")
    ap.add_argument("--k", type=int, default=8, help="candidates for the one prompt (one batch)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per mode (min is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscribing a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("thinkscale.reflect.generate").setLevel(logging.ERROR)  # "no EOS" is intended here

    tok = build_tokenizer()
    rm = build_model(args.model, len(tok), args.device)
    prompt = "Question: what is 2 + 3? Let us think step by step.\n\n"
    kw = dict(k=args.k, temperature=1.0, top_p=0.95, max_new_tokens=args.new_tokens, seed=0)
    prompt_ids = tok.encode(prompt)

    def generate_only():
        return sample(rm, tok, [prompt], score=False, **kw)[0]

    def fused():
        return sample(rm, tok, [prompt], score=True, **kw)[0]

    def rescored(batch_size):
        cands = sample(rm, tok, [prompt], score=False, **kw)[0]
        return score_sequences(rm, tok, [prompt_ids] * len(cands), [c.token_ids for c in cands], batch_size=batch_size)

    modes = {"generation alone": generate_only, "generation + fused scoring": fused,
             "generation + rescoring (batched)": lambda: rescored(args.k),
             "generation + rescoring (one at a time)": lambda: rescored(1)}
    for fn in modes.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}
    results = {}
    for _ in range(args.repeats):  # interleaved, so load drifts hit every mode alike
        for name, fn in modes.items():
            t, c, results[name] = timed(fn)
            times[name].append(t)
            cpu[name].append(c)

    plain, scored = results["generation alone"], results["generation + fused scoring"]
    assert [c.token_ids for c in plain] == [c.token_ids for c in scored], "scoring changed the sampled tokens"
    steps = sum(len(c.step_scores) for c in scored)
    tokens = sum(c.num_generated_tokens for c in scored)
    base, cpu_base = min(times["generation alone"]), min(cpu["generation alone"])
    print(f"device {args.device}, threads {torch.get_num_threads()}, {args.model} hidden 256 x 4 layers, "
          f"k={args.k}, {args.new_tokens} new tokens each ({tokens} tokens, {steps} scored steps)")
    for name, ts in times.items():
        best, cbest = min(ts), min(cpu[name])
        print(f"  {name:40s} wall min {best:7.3f}s (median {statistics.median(ts):7.3f}s) "
              f"overhead {100 * (best - base) / base:+6.2f}% | cpu min {cbest:7.3f}s "
              f"overhead {100 * (cbest - cpu_base) / cpu_base:+6.2f}%")
    # the fused path's own work after decoding (step masks + head at scored positions), timed alone
    rows = decode(rm, [prompt_ids] * args.k, args.new_tokens, set(), 0, temperature=1.0, top_p=0.95,
                  generator=torch.Generator(device=args.device).manual_seed(0), keep_features=True)
    post, _, _ = timed(lambda: [scores_from_features(rm, tok, prompt_ids, r.tokens, r.features) for r in rows])
    print(f"  fused post-processing alone (step mask + head): {1000 * post:.1f} ms = "
          f"{100 * post / base:.2f}% of generation")
    max_diff = 0.0
    for c, (ref_steps, _) in zip(scored, results["generation + rescoring (batched)"]):
        max_diff = max([max_diff] + [abs(a - b) for a, b in zip(c.step_scores, ref_steps)])
    print(f"  fused vs rescored step scores: max |diff| = {max_diff:.2e}")


if __name__ == "__main__":
    main()
