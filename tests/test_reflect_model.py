"""ReflectiveModel: the hook reads hidden_states[-2], one forward gives logits + step logits, the
backbone gradient scale, persistence, prompts and errors."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from reflect_util import bpe_tokenizer, tiny_policy
from thinkscale.reflect import ReflectiveModel, SPRMHead
from thinkscale.reflect.model import HEAD_NAME, ReflectConfig

KINDS = ["llama", "qwen2", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_hook_reads_second_to_last_layer(kind):
    policy = tiny_policy(kind, layers=3)
    rm = ReflectiveModel.from_pretrained(policy).eval()
    ids = torch.randint(5, 300, (2, 9))
    ref = policy(ids, output_hidden_states=True)
    out = rm(ids, return_features=True)
    assert torch.equal(out.features, ref.hidden_states[-2])
    assert torch.equal(out.logits, ref.logits)
    assert torch.allclose(out.step_logits, rm.head(ref.hidden_states[-2]))
    assert out.step_logits.shape == (2, 9)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_with_kv_cache_matches_full_forward(kind):
    rm = ReflectiveModel.from_pretrained(tiny_policy(kind)).eval()
    ids = torch.randint(5, 300, (2, 8))
    full = rm(ids)
    first = rm(ids[:, :6], use_cache=True)
    # the old keyword still works, as the GRPO trainer may pass it
    second = rm(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    assert torch.allclose(second.logits, full.logits[:, 6:], atol=1e-5)
    assert torch.allclose(second.step_logits, full.step_logits[:, 6:], atol=1e-5)


@pytest.mark.parametrize("scale", [1e-4, 0.0])
def test_backbone_gradient_scale(scale):
    grads = {}
    for s in (1.0, scale):
        rm = ReflectiveModel.from_pretrained(tiny_policy("llama", seed=3), backbone_grad_scale=s)
        torch.manual_seed(0)
        rm.head = SPRMHead(32).eval()  # same head weights for both runs, no dropout
        rm(torch.arange(5, 15)[None]).step_logits.sum().backward()
        grads[s] = rm.policy.get_input_embeddings().weight.grad
        head_grad = rm.head.net[0].weight.grad
        assert head_grad is not None and head_grad.abs().sum() > 0
    if scale == 0.0:
        assert grads[0.0] is None
    else:
        assert torch.allclose(grads[scale], grads[1.0] * scale, atol=1e-12, rtol=1e-4)


def test_model_without_layer_stack_is_rejected():
    class NoStack(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="decoder layer stack"):
        ReflectiveModel(NoStack())
    with pytest.raises(ValueError, match="at least 2"):
        ReflectiveModel(tiny_policy("llama", layers=1))


def test_save_load_round_trip(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="thinkscale.reflect.model"):
        rm = ReflectiveModel.from_pretrained(tiny_policy("qwen2"), step_delimiter="\n", think_tags=None,
                                             prompt_template="Q: {question}\nA:", backbone_grad_scale=0.01)
    assert not rm.head_is_trained and "fresh head" in caplog.text
    with torch.no_grad():
        rm.head.net[0].bias.fill_(0.25)  # make the head distinguishable from a fresh one
    rm.save_pretrained(tmp_path)
    loaded = ReflectiveModel.from_pretrained(str(tmp_path))
    assert not loaded.head_is_trained  # its record says it never trained, whatever files exist
    assert loaded.config == rm.config
    assert loaded.config.think_tags is None and loaded.config.prompt_template == "Q: {question}\nA:"
    for (name, a), (_, b) in zip(rm.head.state_dict().items(), loaded.head.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(5, 300, (1, 7))
    rm.eval(), loaded.eval()
    assert torch.allclose(rm(ids).logits, loaded(ids).logits)
    assert torch.allclose(rm(ids).step_logits, loaded(ids).step_logits)
    # explicit arguments override the saved config; a head path may be a directory or the file; a head
    # recorded as fitted to other weights is refused unless forced
    with pytest.raises(ValueError, match="was fitted to the policy .* not to this one"):
        ReflectiveModel.from_pretrained(tiny_policy("qwen2", seed=5), head=tmp_path / HEAD_NAME)
    other = ReflectiveModel.from_pretrained(tiny_policy("qwen2", seed=5), head=tmp_path / HEAD_NAME,
                                            think_tags=("<a>", "</a>"), force_head=True)
    assert not other.head_is_trained and other.config.think_tags == ("<a>", "</a>")
    assert other.config.prompt_template == "Q: {question}\nA:"  # the head folder's config came along


def test_directory_without_head_gets_a_fresh_one(tmp_path):
    tiny_policy("gpt2").save_pretrained(tmp_path)
    rm = ReflectiveModel.from_pretrained(str(tmp_path))
    assert not rm.head_is_trained and rm.head.hidden_size == 32 and rm.config == ReflectConfig()


def test_head_path_missing_and_mismatched(tmp_path):
    with pytest.raises(FileNotFoundError, match="SPRM head file not found"):
        ReflectiveModel.from_pretrained(tiny_policy("llama"), head=tmp_path / "nope.safetensors")
    ReflectiveModel.from_pretrained(tiny_policy("llama", hidden=64), head=None).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden size 64"):
        ReflectiveModel.from_pretrained(tiny_policy("llama", hidden=32), head=tmp_path)


def test_bad_config_values():
    with pytest.raises(ValueError, match="{question}"):
        ReflectConfig(prompt_template="no placeholder")
    with pytest.raises(ValueError, match="backbone_grad_scale"):
        ReflectConfig(backbone_grad_scale=2.0)
    with pytest.raises(TypeError, match="only apply when policy is a path"):
        ReflectiveModel.from_pretrained(tiny_policy("llama"), torch_dtype=torch.float16)


def test_format_prompt_template_chat_and_plain():
    tok = bpe_tokenizer()
    plain = ReflectiveModel.from_pretrained(tiny_policy("llama"))
    assert plain.format_prompt("What is 2+2?", tok) == "What is 2+2?\n"
    templated = ReflectiveModel.from_pretrained(tiny_policy("llama"), prompt_template="Q: {question} \\boxed{{}}")
    assert templated.format_prompt("1+1?", tok) == "Q: 1+1? \\boxed{{}}"
    chat_tok = bpe_tokenizer().__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")
    chat_tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert plain.format_prompt("hi", chat_tok) == "<user>hi<assistant>"


def test_step_tokens_think_tags(caplog):
    tok = bpe_tokenizer()
    rm = ReflectiveModel.from_pretrained(tiny_policy("llama"))
    st = rm.step_tokens(tok)
    assert (st.think_start_id, st.think_end_id) == (tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>"))
    odd = ReflectiveModel.from_pretrained(tiny_policy("llama"), think_tags=("<reason>", "</reason>"))
    with caplog.at_level(logging.WARNING, logger="thinkscale.reflect.model"):
        st = odd.step_tokens(tok)
    assert st.think_start_id is None and "not single tokens" in caplog.text
    ids = torch.tensor(tok.encode("<think>A.\n\nB.\n\n</think>C.\n\nD"))
    marked = rm.step_mask(tok, ids).nonzero().flatten().tolist()
    assert [tok.decode(ids[i + 1 : i + 4]) for i in marked] == [".\n\n", ".\n\n"]  # C's step is outside


def test_serve_renders_the_instruction_line_after_the_last_user_message():
    """A chat model whose head was fitted with --instruction sees the same line behind the question
    when the question arrives as a chat message (serve's chat-template path), and none when it has none."""
    from thinkscale.serve.app import Served

    tok = bpe_tokenizer().__class__(tokenizer_object=bpe_tokenizer().backend_tokenizer, eos_token="<eos>",
                                    pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    line = "Give the final answer as \\boxed{...}."
    rm = ReflectiveModel.from_pretrained(tiny_policy("llama"), instruction=line)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}]
    served = Served(rm, tok, "tiny")
    assert served.render_chat(messages) == f"<system>be brief<user>1+1?\n{line}<assistant>"
    assert rm.format_prompt("1+1?", tok) == f"<user>1+1?\n{line}<assistant>"  # as eval and fit-head saw it
    assert messages[-1]["content"] == "1+1?"  # the client's messages are not changed
    bare = Served(ReflectiveModel.from_pretrained(tiny_policy("llama")), tok, "tiny")
    assert bare.render_chat(messages) == "<system>be brief<user>1+1?<assistant>"
