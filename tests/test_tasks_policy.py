"""The policy built from a config: family, size, reproducible init, save/load round trip."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from thinkscale.tasks.policy import PolicyConfig, build_policy, count_parameters
from thinkscale.tasks.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["What is 1 + 2?\n<think>\n1 + 2 = 3.\n\n</think>\n\\boxed{3}"])


TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.mark.parametrize("family, cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_family_size_and_save_load(family, cls, tokenizer, tmp_path):
    model = build_policy(PolicyConfig(family=family, **TINY), tokenizer, seed=0)
    assert type(model).__name__ == cls
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == cls
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([tokenizer.encode("1 + 2")])
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_llama_parameter_count_matches_hand_formula(tokenizer):
    v, c, f, layers = len(tokenizer), 32, 64, 2
    # embeddings (tied with the LM head) + per layer: q,k,v,o (4c^2) + gate,up,down (3cf) + 2 norms; final norm
    expected = v * c + layers * (4 * c * c + 3 * c * f + 2 * c) + c
    assert count_parameters(build_policy(PolicyConfig(**TINY), tokenizer)) == expected


def test_default_size_is_a_few_million(tokenizer):
    n = count_parameters(build_policy(PolicyConfig(), tokenizer))
    assert 1_000_000 < n < 10_000_000


def test_seed_makes_init_reproducible_and_leaves_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_policy(PolicyConfig(**TINY), tokenizer, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_policy(PolicyConfig(**TINY), tokenizer, seed=5)
    c = build_policy(PolicyConfig(**TINY), tokenizer, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(family="gpt2"), "family"),
        (dict(hidden_size=30, num_heads=4), "divisible"),
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(num_layers=0), "num_layers"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PolicyConfig(**kwargs)
