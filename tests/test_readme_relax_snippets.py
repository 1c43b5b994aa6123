"""The README's "Use it from torch DDP" and "Use it from Lightning" snippets run as written, on 2 processes."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from distributed_harness import free_port

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(heading: str) -> str:
    """The first python block after `heading` in the README."""
    text = README.read_text()
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_ddp_snippet(tmp_path):
    script = tmp_path / "ddp_bytegrad.py"
    script.write_text(snippet("### Use it from torch DDP"))
    done = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), str(script)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"rank \d: loss (\d+\.\d+)", done.stdout)]
    assert len(losses) == 2 and all(loss < 32 for loss in losses)  # the target's variance is 32 at the start
    for rank in range(2):
        saved = torch.load(tmp_path / f"checkpoint.rank{rank}.pt")
        assert saved["hook"]["rank"] == rank and saved["hook"]["options"]["error_feedback"] is True
    models = [torch.load(tmp_path / f"checkpoint.rank{r}.pt")["model"] for r in range(2)]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])  # one model on both ranks


def test_lightning_snippet(tmp_path):
    script = tmp_path / "lightning_bytegrad.py"
    script.write_text(snippet("### Use it from Lightning"))
    done = run([sys.executable, str(script)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = list((tmp_path / "lightning_runs").rglob("*.ckpt"))
    assert len(checkpoints) == 1  # Lightning's default: the last epoch's
    state = torch.load(checkpoints[0], weights_only=False)
    assert state["global_step"] == 2 * 1024 // 32 // 2 and len(state["relax"]["per_rank"]) == 2
