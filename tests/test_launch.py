"""launch/torchrun.sh and launch/deepspeed.sh: 2 processes on this machine (gloo, CPU)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def run_wrapper(script: str, args: list[str], overrides: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        NPROC="2",
        MGT_PYTHON=sys.executable,
        MGT_BACKEND="gloo",
        DS_ACCELERATOR="cpu",
        WANDB_MODE="disabled",
        MGT_OVERRIDES=" ".join(overrides),
    )
    # Own session: on a timeout the whole process group (launcher and workers) is killed.
    proc = subprocess.Popen(
        ["bash", script, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{script} timed out:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train_steps(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "engine"),
    [
        ("launch/torchrun.sh", ["parallel.engine=fsdp", "parallel.pipeline_stages=1", "parallel.activation_checkpoint_interval=1"]),
        ("launch/deepspeed.sh", ["parallel.engine=deepspeed_pipe", "parallel.pipeline_stages=2"]),
    ],
    ids=["torchrun-fsdp", "deepspeed-pipe"],
)
def test_wrapper_runs_two_processes(zipf_shards, tmp_path, script, engine):
    run = tmp_path / "run"
    tiny = tiny_overrides(
        *zipf_shards,
        run,
        **{"model.n_layers": 4, "train.max_steps": 4, "train.grad_accum_steps": 2, "train.device": "cpu", "log.geometry_every": 0},
    )
    # The 200-layer preset, cut down by overrides; the engine is chosen on the command line.
    result = run_wrapper(script, ["configs/mgt_200l.yaml", *engine, "model.max_seq_len=32", "train.precision=fp32"], tiny)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "finished at step 4" in result.stdout
    steps = train_steps(run)
    assert [s for s, _ in steps] == [1, 2, 3, 4] and all(math.isfinite(loss) for _, loss in steps)
    config = (run / "config.yaml").read_text()
    assert f"engine: {engine[0].split('=')[1]}" in config and "backend: gloo" in config
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_wrappers_print_usage_without_a_preset():
    for script in ("launch/torchrun.sh", "launch/deepspeed.sh"):
        out = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and "overrides" in out.stdout
