"""A small byte-level BPE tokenizer trained on the task text, saved in Hugging Face format.

Choices made for a model that learns arithmetic from scratch:
- every digit is its own token (a number's digits never merge), so "243" is "2" "4" "3";
- the step delimiter ".\\n\\n" and the think tags are single tokens. They are *added* tokens that are
  not special: `decode` keeps them (with `skip_special_tokens=True` too), so decoded text is the
  model's full reasoning and the reflect step mask can look for one id per delimiter;
- byte-level pre-tokenization: any text encodes (no unknown token) and decode round-trips exactly;
- `<pad>` and `<eos>` are special tokens; `encode` adds nothing (callers append EOS themselves).
"""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast

from . import STEP_DELIMITER, THINK_END, THINK_START

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
STRUCTURE_TOKENS = (STEP_DELIMITER, THINK_START, THINK_END)
DEFAULT_VOCAB_SIZE = 320  # 256 bytes + specials + ~60 merges: enough for the task's few words


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a BPE on `texts` (prompts and completions) and wrap it for transformers.

    Takes well under a second for tens of thousands of short texts. The result saves with
    `save_pretrained(dir)` and loads with `AutoTokenizer.from_pretrained(dir)`.
    """
    n_reserved = 256 + 2 + len(STRUCTURE_TOKENS)
    if vocab_size < n_reserved:
        raise ValueError(f"vocab_size must be at least {n_reserved} (256 bytes + special and structure tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Added after training (the trainer rebuilds the vocabulary). normalized=False: match the raw text;
    # special=False: keep them in decoded text.
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in STRUCTURE_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def structure_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the delimiter and think tags; ValueError if any of them is not exactly one token."""
    ids = {}
    for text in STRUCTURE_TOKENS:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"{text!r} must encode to a single token, got ids {encoded}")
        ids[text] = encoded[0]
    return ids
