"""examples/finetune_smollm2.py as a user runs it, on a tiny Llama folder in place of SmolLM2 (the real
model is the benchmark's: `thinkscale bench relax --workloads smollm2`, docs/benchmarks.md)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_harness import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune_smollm2.py"
STEP_LINE = re.compile(r"^\[finetune\] step (\d+)/3 loss (\d+\.\d+)", re.M)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["What is 12 + 7? 12 + 7 = 19 \\boxed{19}"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(args: list[str], torchrun: bool) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                 "127.0.0.1", "--master_port", str(free_port())] if torchrun else [sys.executable])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + [str(EXAMPLE), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.mark.parametrize("how", [["--algorithm", "bytegrad"], ["--ddp-hook", "bytegrad"]], ids=["relax", "ddp-hook"])
def test_two_ranks(tiny_model, tmp_path, how):
    done = run(["--model", str(tiny_model), "--steps", "3", "--log-every", "1", "--train-examples", "40",
                "--eval-examples", "8", "--accumulate", "2", "--save", str(tmp_path / "tuned"), *how], torchrun=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert [int(step) for step, _ in STEP_LINE.findall(done.stdout)] == [1, 2, 3]  # rank 0 only
    assert "held-out loss" in done.stdout and (tmp_path / "tuned" / "config.json").exists()


def test_one_process_and_bad_arguments(tiny_model):
    done = run(["--model", str(tiny_model), "--steps", "3", "--log-every", "3", "--train-examples", "20",
                "--eval-examples", "4"], torchrun=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 rank(s)" in done.stdout and len(STEP_LINE.findall(done.stdout)) == 1
    bad = run(["--model", str(tiny_model), "--algorithm", "nope"], torchrun=False)
    assert bad.returncode == 2 and "unknown --algorithm 'nope'; valid: " in bad.stderr
    missing = run(["--model", "/nonexistent/folder"], torchrun=False)
    assert missing.returncode == 2 and "/nonexistent/folder" in missing.stderr and "Traceback" not in missing.stderr
