"""The MetaStone-S1 release format (an HF folder + score_module.pt): loading, refusal of anything but a plain
state dict, and step scores equal to an independent implementation of the release scorer (fused and
rescored), including the cases where thinkscale's own step rules differ; then serving it."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from reflect_util import bpe_tokenizer, favor_tokens, tiny_policy
from thinkscale.cli import main
from thinkscale.reflect import ReflectiveModel, SPRMHead, sample, score_sequences
from thinkscale.reflect.release import RELEASE_HEAD_NAME, load_release_head, save_release_head

DELIMITER, THINK, END = ".\n\n", "<think>", "</think>"
PROMPT = "Q: what is two plus two?\n"  # no delimiter in the prompt (see test_prompt_steps_are_not_scored)
HIDDEN = 32


def release_tokenizer(folder):
    """The tests' BPE with '.\\n\\n' (and '.\\n\\n\\n', which contains it) and the think tags as single tokens."""
    bpe_tokenizer(plain_think_tags=True).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([DELIMITER, ".\n\n\n"])
    return tok


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    """A tiny Qwen2 saved as the release saves its models: HF folder + score_module.pt (random, spread head)."""
    folder = tmp_path_factory.mktemp("release")
    tok = release_tokenizer(folder)
    policy = favor_tokens(tiny_policy("qwen2", vocab_size=len(tok), hidden=HIDDEN), tok,
                          texts=(DELIMITER, ".\n\n\n", " we", " is", THINK, END), eos_scale=2.0, scale=80.0)
    policy.save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.manual_seed(1)
    head = SPRMHead(HIDDEN)
    with torch.no_grad():
        head.net[0].weight.mul_(300.0)  # step probabilities spread over (0, 1), not all near 0.5
        head.net[3].weight.mul_(10.0)
    save_release_head(head, folder / RELEASE_HEAD_NAME)
    return folder


def release_scorer(folder, ids: list[int]) -> tuple[list[float], float]:
    """The release scorer as spec/reflect.md describes it, written out position by position: the whole
    text through the LLM with all hidden states, hidden_states[-2]; the first token of each run of
    '.\\n\\n' tokens, not the one right after <think>; shifted left by one; strictly between the single
    <think> and </think> (0 / the end when missing or repeated); geometric mean of the sigmoids clamped
    at 1e-10; 0 without a step."""
    tok = AutoTokenizer.from_pretrained(folder)
    llm = AutoModelForCausalLM.from_pretrained(folder).eval()
    c = llm.config.hidden_size
    module = nn.Sequential(nn.Linear(c, 2 * c), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2 * c, 1)).eval()
    module.load_state_dict(torch.load(folder / RELEASE_HEAD_NAME, weights_only=True))
    with torch.no_grad():
        hidden = llm(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2][0]
    delimiter = set(tok.encode(DELIMITER, add_special_tokens=False))
    think, end = tok.encode(THINK, add_special_tokens=False)[0], tok.encode(END, add_special_tokens=False)[0]
    n = len(ids)
    first = [ids[i] in delimiter and not (i > 0 and ids[i - 1] in delimiter) and not (i > 0 and ids[i - 1] == think)
             for i in range(n)]
    marked = [first[i + 1] if i + 1 < n else False for i in range(n)]
    starts, ends = [i for i in range(n) if ids[i] == think], [i for i in range(n) if ids[i] == end]
    lo = starts[0] if len(starts) == 1 else 0
    hi = ends[0] if len(ends) == 1 else n
    positions = [i for i in range(n) if marked[i] and lo < i < hi]
    if not positions:
        return [], 0.0
    with torch.no_grad():
        probs = torch.sigmoid(module(hidden[positions]).squeeze(-1)).tolist()
    return probs, math.exp(sum(math.log(max(p, 1e-10)) for p in probs) / len(probs))


def test_loads_with_release_rules_and_refuses_what_is_not_a_plain_state_dict(release_dir, tmp_path):
    rm = ReflectiveModel.from_pretrained(str(release_dir))
    assert rm.head_is_trained and rm.head_provenance["origin"] == "release"
    assert rm.config.step_rules == "release" and rm.config.step_delimiter == DELIMITER
    state = torch.load(release_dir / RELEASE_HEAD_NAME, weights_only=True)
    assert sorted(state) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    assert torch.equal(rm.head.net[0].weight, state["0.weight"]) and torch.equal(rm.head.net[3].bias, state["3.bias"])

    bad = tmp_path / "score_module.pt"
    torch.save(nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.ReLU(), nn.Linear(2 * HIDDEN, 1)), bad)  # a module
    with pytest.raises(ValueError, match=r"score_module.pt: not a plain state dict .*weights_only") as error:
        load_release_head(bad, HIDDEN)
    assert "\n" not in str(error.value)
    torch.save({"0.weight": torch.zeros(2 * HIDDEN, HIDDEN)}, bad)
    with pytest.raises(ValueError, match="expected the keys 0.weight, 0.bias, 3.weight, 3.bias"):
        load_release_head(bad, HIDDEN)
    torch.save({k: v[..., :4] if k == "0.weight" else v for k, v in state.items()}, bad)
    with pytest.raises(ValueError, match=r"0.weight has shape \(64, 4\), expected \(64, 32\)"):
        load_release_head(bad, HIDDEN)


def test_a_pickled_module_is_one_line_from_the_cli(release_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in release_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    torch.save(nn.Linear(2, 2), folder / RELEASE_HEAD_NAME)
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "hi", "answer": "4"}) + "\n")
    code = main(["eval", "--model", str(folder), "--data", str(data), "--k", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("thinkscale")]  # (HF progress bars aside)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("thinkscale eval: error: ") and lines[0].endswith(
        "score_module.pt: not a plain state dict of tensors, refused by torch.load(weights_only=True) "
        "(Unsupported global: GLOBAL torch.nn.modules.linear.Linear)")


def test_step_scores_equal_the_release_scorer(release_dir):
    tok = AutoTokenizer.from_pretrained(release_dir)
    assert [len(tok.encode(t, add_special_tokens=False)) for t in (DELIMITER, THINK, END)] == [1, 1, 1]
    assert tok.encode("a.\n\n\nb", add_special_tokens=False)[1] == tok.convert_tokens_to_ids(".\n\n\n")
    rm = ReflectiveModel.from_pretrained(str(release_dir)).eval()
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    cands = sample(rm, tok, [prompt_ids], k=12, temperature=1.0, top_p=1.0, max_new_tokens=28, seed=3)[0]
    # hand-made completions for the cases where thinkscale's own rules differ from the release's
    pieces = {name: tok.encode(text, add_special_tokens=False) for name, text in {
        "two_starts": "we is.\n\n<think> is.\n\n<think> we.\n\n</think> is.\n\n",
        "two_ends": "<think> we.\n\n is</think> we.\n\n</think> is.\n\n we",
        "no_tags": " we.\n\n.\n\n is.\n\n\n we.\n\n",
        "after_think": "<think>.\n\n we.\n\n</think>",
        "no_step": " we is",
    }.items()}
    completions = [c.token_ids for c in cands] + list(pieces.values())
    reference = [release_scorer(release_dir, prompt_ids + c) for c in completions]
    rescored = score_sequences(rm, tok, [prompt_ids] * len(completions), completions)
    fused = [(c.step_scores, c.score) for c in cands]
    diffs = []
    for (ref_steps, ref_score), (steps, score) in zip(reference, rescored):
        assert len(steps) == len(ref_steps)
        diffs += [abs(a - b) for a, b in zip(steps, ref_steps)] + [abs(score - ref_score)]
    for (ref_steps, ref_score), (steps, score) in zip(reference, fused):
        assert len(steps) == len(ref_steps)
        diffs += [abs(a - b) for a, b in zip(steps, ref_steps)] + [abs(score - ref_score)]
    print(f"\nrelease scorer vs thinkscale: max |diff| {max(diffs):.2e} over {len(diffs)} values")
    assert max(diffs) <= 1e-6
    assert sum(len(s) for s, _ in reference[:len(cands)]) >= 12  # the sampled candidates have steps to score
    assert reference[-1] == ([], 0.0) and rescored[-1] == ([], 0.0)

    # the differing cases: thinkscale's own rules count other steps there
    own = ReflectiveModel(rm.policy, rm.head, rm.config.__class__(**{**rm.config.__dict__, "step_rules": "thinkscale"}))
    counts = {name: (len(release_scorer(release_dir, prompt_ids + ids)[0]),
                     len(score_sequences(own, tok, [prompt_ids], [ids])[0][0])) for name, ids in pieces.items()}
    assert counts["two_starts"] == (3, 2)  # the release counts the step before the first <think>
    assert counts["two_ends"] == (3, 2)  # ... and the one after the last </think>
    assert counts["no_tags"] == (2, 3)  # '.\n\n\n' contains the delimiter text: a step end for thinkscale only
    assert counts["after_think"] == (1, 1) and counts["no_step"] == (0, 0)


def test_serve_loads_it_and_answers_with_fused_release_scores(release_dir):
    from fastapi.testclient import TestClient

    from thinkscale.serve.app import ServeOptions, Served, create_app

    served = Served.load(release_dir)
    assert served.rm.config.step_rules == "release" and served.rm.head_is_trained
    with TestClient(create_app(served, ServeOptions(max_tokens=20))) as client:
        body = {"model": served.name, "messages": [{"role": "user", "content": PROMPT.rstrip("\n")}],
                "reasoning_effort": "low", "seed": 5}
        answer = client.post("/v1/chat/completions", json=body).json()
    chosen = answer["choices"][0]["selected"]
    tok = served.tokenizer
    offline = sample(served.rm, tok, [served.rm.format_prompt(PROMPT.rstrip("\n"), tok)], k=2, max_new_tokens=20,
                     seed=5)[0]
    best = max(offline, key=lambda c: c.score)
    assert chosen["k"] == 2 and chosen["score"] == pytest.approx(best.score, abs=1e-6)
    assert chosen["step_scores"] == pytest.approx(best.step_scores, abs=1e-6)
