"""Every CLI error is one clear line naming the file, line and problem, with a non-zero exit and no
traceback unless -v (issue 14). Bad inputs walked through every command: the CLI run as a user runs it
(a subprocess) for one case of each kind, and the whole matrix of bad data files in-process through
`thinkscale.cli.main`, which is the same code after the interpreter starts."""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from reflect_util import bpe_tokenizer, tiny_policy
from thinkscale.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
GOOD = {"question": "What is 1 + 1?", "answer": 2, "solution": "1 + 1 = 2."}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad inputs of every kind, and a good model folder to pair them with."""
    from thinkscale.reflect import ReflectiveModel, SPRMHead
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad")

    def write(name, content):
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    good_line = json.dumps(GOOD) + "\n"
    paths = {
        "malformed": write("malformed.jsonl", good_line + '{"question": "What is 2 + 2?", answer: 4}\n'),
        "empty": write("empty.jsonl", "\n\n"),
        "binary": write("binary.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))),
        "latin1": write("latin1.jsonl", good_line.encode() + '{"question": "Combien font 2 + 2, café?", '
                        '"answer": 4}\n'.encode("latin-1")),
        "huge_line": write("huge_line.jsonl", good_line + "x" * 3_000_000 + "\n"),
        "huge_value": write("huge_value.jsonl", json.dumps({"question": "q", "answer": ["7" * 100_000]}) + "\n"),
        "missing_field": write("missing_field.jsonl", good_line + '{"question": "What is 3 + 3?"}\n'),
        "wrong_type": write("wrong_type.jsonl", good_line * 2 + '{"question": 5, "answer": 1}\n'),
        "not_a_list": write("not_a_list.jsonl", "[1, 2]\n"),
        "no_solution": write("no_solution.jsonl", good_line + '{"question": "What is 3 + 3?", "answer": 6}\n'),
        "good": write("good.jsonl", good_line * 3),
        "file": write("plain.txt", "not a folder"),
    }
    model = root / "model"
    ReflectiveModel(tiny_policy(hidden=32)).save_pretrained(model, tokenizer=bpe_tokenizer())
    no_tokenizer = root / "no_tokenizer"
    ReflectiveModel(tiny_policy(hidden=32)).save_pretrained(no_tokenizer)
    (root / "no_model").mkdir()
    (root / "no_model" / "notes.txt").write_text("weights went elsewhere")
    wrong_head = root / "head64.safetensors"
    save_file(SPRMHead(64).state_dict(), wrong_head)
    paths.update(model=model, no_tokenizer=no_tokenizer, no_model=root / "no_model", wrong_head=wrong_head,
                 not_a_head=write("not_a_head.safetensors", "not safetensors at all"), root=root)
    return paths


# (bad data file, the message that must name its line and problem)
BAD_DATA = [
    ("malformed", "malformed.jsonl:2: malformed JSON (Expecting property name enclosed in double quotes at column 32)"),
    ("empty", "empty.jsonl: no examples (the file is empty)"),
    ("binary", "binary.jsonl:1: not UTF-8 text (byte 0x89 at byte 1 of the line)"),
    ("latin1", "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at byte 38 of the line)"),
    ("huge_line", "huge_line.jsonl:2: malformed JSON (Expecting value at column 1)"),
    ("huge_value", "huge_value.jsonl:1: field 'answer' must be a non-empty string or a number, got ['777"),
    ("missing_field", "missing_field.jsonl:2: missing field 'answer'"),
    ("wrong_type", "wrong_type.jsonl:3: field 'question' must be a non-empty string, got 5"),
    ("not_a_list", "not_a_list.jsonl:1: expected a JSON object"),
    ("nowhere", "error: No such file or directory: "),  # not "[Errno 2] ..."
]


def commands_reading(data: str, files) -> dict[str, list[str]]:
    out = str(files["root"] / "out")
    return {
        "sft": ["sft", "--data", data, "--out", out],
        "grpo": ["grpo", "--model", str(files["model"]), "--data", data, "--out", out],
        "eval": ["eval", "--model", str(files["model"]), "--data", data, "--out", out],
        "data": ["data", "--exclude", data, "--out", out],
    }


def assert_one_clear_line(stderr: str, expected: str) -> None:
    """The error is the last line, alone (progress bars of work done before it aside)."""
    lines = stderr.strip().splitlines()
    assert expected in lines[-1] and "Traceback" not in stderr, stderr[-2000:]
    assert all(re.search(r"\d+%\|", line) for line in lines[:-1]), stderr[-2000:]
    assert len(lines[-1]) < 400  # a huge line is named, not quoted


@pytest.mark.parametrize("kind,expected", BAD_DATA, ids=[k for k, _ in BAD_DATA])
def test_every_command_names_the_file_line_and_problem_of_bad_data(files, kind, expected, capsys):
    data = str(files.get(kind, files["root"] / "nowhere.jsonl"))
    for name, args in commands_reading(data, files).items():
        assert main(args) == 2, name
        assert_one_clear_line(capsys.readouterr().err, expected)


def test_bad_models_heads_options_and_outputs(files, capsys):
    good, out, blocked = str(files["good"]), str(files["root"] / "out"), str(files["file"] / "sub")
    cases = [  # (args, the one line on stderr)
        (["sft", "--data", str(files["no_solution"]), "--out", out], "needs a 'solution' for every example; 1 lack one"),
        (["sft", "--data", good, "--model", str(files["no_model"]), "--out", out], "no model in"),
        (["eval", "--model", str(files["no_tokenizer"]), "--data", good, "--out", out], "no tokenizer in"),
        (["eval", "--model", str(files["model"]), "--data", good, "--head", str(files["not_a_head"]), "--out", out],
         "not_a_head.safetensors is not a safetensors file"),
        (["eval", "--model", str(files["model"]), "--data", good, "--top-p", "2", "--out", out], "top_p"),
        (["grpo", "--model", str(files["file"]), "--data", good, "--out", out],
         f"{files['file']} is a file, not a model directory"),
        (["grpo", "--model", str(files["root"] / "gone"), "--data", good, "--out", out], "gone does not exist"),
        (["eval", "--model", str(files["model"]), "--data", good, "--head", str(files["wrong_head"]), "--out", out],
         "head in " + str(files["wrong_head"]) + " has hidden size 64, the policy has 32"),
        (["data", "--out", blocked], f"--out {blocked}: cannot write there (Not a directory)"),
        (["demo", "--out", blocked], f"--out {blocked}: cannot write there"),
        (["sft", "--data", good, "--out", blocked], f"--out {blocked}: cannot write there"),
        (["eval", "--model", str(files["model"]), "--data", good, "--out", blocked], "cannot write there"),
    ]
    for args, expected in cases:
        assert main(args) == 2, args
        assert_one_clear_line(capsys.readouterr().err, expected)


def thinkscale(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "thinkscale", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_the_cli_as_a_user_runs_it(files):
    """The issue's bad paths (a malformed line with workers, a folder without a model; a non-UTF-8 file is in
    the matrix above) and an error raised in a worker, through `python -m thinkscale`."""
    out = files["root"] / "out"
    cases = [  # (args, exit status, the one line on stderr)
        (["sft", "--data", files["malformed"], "--out", out, "--nproc", "2"], 2,
         "thinkscale sft: error: " + str(files["malformed"]) + ":2: malformed JSON"),
        (["eval", "--model", files["no_model"], "--data", files["good"]], 2,
         f"thinkscale eval: error: no model in {files['no_model']} (expected config.json and model.safetensors"),
        # an error raised in a worker process: one line too, naming the rank
        (["sft", "--data", files["good"], "--out", out, "--nproc", "2", "--batch-size", "8", "--hidden-size", "32",
          "--layers", "1", "--heads", "2"], 1,
         "failed: ValueError: each rank has 1 examples, fewer than batch_size=8"),  # both ranks fail: either first
    ]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: thinkscale(*case[0]), cases))
    for (args, status, expected), result in zip(cases, results):
        assert result.returncode == status, (args, result.stderr[-2000:])
        assert_one_clear_line(result.stderr, expected)
    assert results[-1].stderr.startswith("thinkscale sft: worker rank ")


def test_verbose_adds_the_traceback(files, capsys):
    assert main(["-v", "sft", "--data", str(files["malformed"]), "--out", str(files["root"] / "out")]) == 2
    err = capsys.readouterr().err
    assert "malformed JSON" in err.splitlines()[0] and "Traceback" in err and "in iter_jsonl" in err
