"""Shared helpers for the reflect tests: a tiny trained BPE tokenizer and tiny models from a config."""
from __future__ import annotations

import functools

import torch

CORPUS = [
    "First we add the numbers. Then we check the sum.\n\nThe answer is 12.",
    "<think>Let us think step by step.\n\nTwo plus two is four.\n\nSo it is 4.</think> The answer is 4.",
    "Compute 3 times 5 (carefully).\n\nThat is 15!\n\nDone.",
    "We know x = 2 and y = 3.\n\n\nHence x + y = 5.",
] * 20


@functools.lru_cache(maxsize=None)
def bpe_tokenizer(plain_think_tags: bool = False):
    """A byte-level BPE trained in well under a second; '.' and '\\n\\n' stay separate tokens.

    The think tags are special tokens, or with `plain_think_tags` ordinary added tokens (decoding then
    keeps them, as a served model's reasoning split needs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>"] + ([] if plain_think_tags else ["<think>", "</think>"])
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    if plain_think_tags:
        fast.add_tokens(["<think>", "</think>"])
    return fast


def tiny_policy(kind: str = "llama", vocab_size: int = 320, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A randomly initialised causal LM of the given family, small enough for CPU tests."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
        model = Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, tie_word_embeddings=False, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


def favor_tokens(model, tokenizer, texts=(".", "\n", " we", " is"), eos_scale: float = 0.0, scale: float = 300.0):
    """Make a random model emit mostly the given token texts, so that sampled text has steps.

    Output rows of all other tokens are zeroed (logit 0); the favored rows are scaled up. EOS gets
    `eos_scale` (0: logit 0, rarely sampled)."""
    ids = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(t))[0] for t in texts]
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        keep = weight[ids].clone()
        eos_row = weight[tokenizer.eos_token_id].clone()
        weight.zero_()
        weight[ids] = keep * scale
        weight[tokenizer.eos_token_id] = eos_row * eos_scale
    return model


def fit_format(model, tokenizer, problems, steps: int = 40, seed: int = 0):
    """A few supervised steps so that a tiny policy writes the built-in tasks' format (steps, think-end, box)."""
    from thinkscale.tasks import format_prompt

    texts = [format_prompt(p.question) + p.completion for p in problems]
    ids = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = [ids[i] for i in torch.randint(len(ids), (16,), generator=g).tolist()]
        width = max(map(len, rows))
        x = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def stepping_model(kind: str = "llama", eos_scale: float = 10.0):
    """(ReflectiveModel in eval mode, tokenizer): a tiny policy favouring ".", "\\n" (the step delimiter),
    " we", " is" and, by `eos_scale`, EOS; no think tags. The model of the engine, answer and scheduler tests."""
    from thinkscale.reflect import ReflectiveModel

    tok = bpe_tokenizer()
    policy = favor_tokens(tiny_policy(kind, vocab_size=len(tok)), tok, eos_scale=eos_scale, scale=80.0)
    return ReflectiveModel.from_pretrained(policy, step_delimiter="\n", think_tags=None).eval(), tok
