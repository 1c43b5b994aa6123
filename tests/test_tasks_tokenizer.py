"""The task tokenizer: structure tokens are single ids, digits are single ids, decode is exact."""
import pytest
from transformers import AutoTokenizer

from thinkscale.tasks import STEP_DELIMITER, THINK_END, THINK_START
from thinkscale.tasks.arithmetic import ArithmeticConfig, generate
from thinkscale.tasks.tokenizer import EOS_TOKEN, PAD_TOKEN, structure_token_ids, train_tokenizer


@pytest.fixture(scope="module")
def problems():
    return generate(ArithmeticConfig(), 500, seed=0)


@pytest.fixture(scope="module")
def tokenizer(problems):
    return train_tokenizer(p.prompt + p.completion for p in problems)


def test_structure_tokens_are_single_ids(tokenizer):
    ids = structure_token_ids(tokenizer)
    assert len(set(ids.values())) == 3
    text = f"{THINK_START}\n1 + 2 = 3{STEP_DELIMITER}{THINK_END}"
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert encoded.count(ids[STEP_DELIMITER]) == 1
    assert encoded[0] == ids[THINK_START] and ids[THINK_END] in encoded


def test_digits_are_individual_tokens(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("12345 + 678 = 13023", add_special_tokens=False))
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == list("12345678" + "13023")


def test_decode_round_trips_exactly(tokenizer, problems):
    for p in problems[:50]:
        text = p.prompt + p.completion
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        # The structure tokens are not special: skipping special tokens drops EOS/pad only.
        assert tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id], skip_special_tokens=True) == text
    odd = "héllo  wörld\t日本 .\n\n\n<think>x</think>  "
    assert tokenizer.decode(tokenizer.encode(odd, add_special_tokens=False)) == odd


def test_special_tokens_and_no_automatic_additions(tokenizer):
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.encode("1", add_special_tokens=True) == tokenizer.encode("1", add_special_tokens=False)


def test_saves_and_loads_with_auto_tokenizer(tokenizer, problems, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = problems[0].prompt + problems[0].completion
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert structure_token_ids(loaded) == structure_token_ids(tokenizer)
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_training_is_deterministic(problems):
    texts = [p.prompt + p.completion for p in problems[:200]]
    a, b = train_tokenizer(texts), train_tokenizer(texts)
    assert a.get_vocab() == b.get_vocab()


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["1 + 1"], vocab_size=100)
