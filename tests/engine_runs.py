"""Real multi-process training runs for the engine and conversion tests, launched with
torchrun (2 processes, gloo, 1 thread each) and cached per session, so tests/test_engines.py
and tests/test_convert.py share them."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_mgt.metrics import read_metrics
from tests.conftest import tiny_overrides, write_zipf_shard

REPO = Path(__file__).resolve().parents[1]
STEPS, SPLIT = 6, 3  # the split runs exit after SPLIT steps and resume to STEPS
GLOBAL_MICRO = 4  # sequences per micro-batch over all data-parallel ranks
TIMEOUT = 300

# engine -> overrides; data-parallel engines take GLOBAL_MICRO / 2 sequences per rank
ENGINES = {
    "single": {"train.micro_batch_size": GLOBAL_MICRO},
    "pipe": {
        "train.micro_batch_size": GLOBAL_MICRO,
        "parallel.engine": "deepspeed_pipe",
        "parallel.pipeline_stages": 2,
        "parallel.deepspeed_config": "configs/deepspeed/pipe_zero1.json",
    },
    # one stage, two data-parallel replicas: they split the stage's telemetry layers and its checkpoint writes
    "pipe_dp2": {
        "train.micro_batch_size": GLOBAL_MICRO // 2,
        "parallel.engine": "deepspeed_pipe",
        "parallel.pipeline_stages": 1,
        "parallel.deepspeed_config": "configs/deepspeed/pipe_zero1.json",
    },
    "fsdp": {"train.micro_batch_size": GLOBAL_MICRO // 2, "parallel.engine": "fsdp"},
    "zero2": {
        "train.micro_batch_size": GLOBAL_MICRO // 2,
        "parallel.engine": "deepspeed_zero",
        "parallel.zero_stage": 2,
        "parallel.deepspeed_config": "configs/deepspeed/zero2.json",
    },
    "zero3": {
        "train.micro_batch_size": GLOBAL_MICRO // 2,
        "parallel.engine": "deepspeed_zero",
        "parallel.zero_stage": 3,
        "parallel.deepspeed_config": "configs/deepspeed/zero3.json",
    },
    # an untied head (a pipeline layer of its own) and recomputation of every layer in backward
    "single_untied": {"train.micro_batch_size": GLOBAL_MICRO, "model.tie_embeddings": False},
    "pipe_ckpt": {
        "train.micro_batch_size": GLOBAL_MICRO,
        "parallel.engine": "deepspeed_pipe",
        "parallel.pipeline_stages": 2,
        "parallel.deepspeed_config": "configs/deepspeed/pipe_zero1.json",
        "model.tie_embeddings": False,
        "parallel.activation_checkpoint_interval": 1,
    },
}
# ZeRO-3's and FSDP's layer-by-layer init on the other paths of the replay: an untied head, no
# final norm (nn.Identity), a fixed alpha (a buffer, not a parameter)
VARIANT_MODEL = {"model.tie_embeddings": False, "model.final_norm": False, "model.mgt.alpha_mode": "fixed", "train.lr": 0.01}  # lr: moves the loss in 6 steps
ENGINES["single_variant"] = {**ENGINES["single"], **VARIANT_MODEL}
ENGINES["zero3_variant"] = {**ENGINES["zero3"], **VARIANT_MODEL}
ENGINES["fsdp_variant"] = {**ENGINES["fsdp"], **VARIANT_MODEL}
# activation checkpointing of every block (engine/single.checkpoint_blocks) outside the pipeline
for _engine in ("single", "fsdp", "zero3"):
    ENGINES[f"{_engine}_ac"] = {**ENGINES[_engine], "parallel.activation_checkpoint_interval": 1}
# FSDP2 reduce-scattering after every micro-batch (sharded gradient accumulation)
ENGINES["fsdp_rs_micro"] = {**ENGINES["fsdp"], "parallel.fsdp_reduce_every_micro_batch": True}
# model.compile under the data-parallel engines (blocks compiled before fully_shard / deepspeed.initialize)
ENGINES["fsdp_compiled"] = {**ENGINES["fsdp"], "model.compile": True}
ENGINES["zero2_compiled"] = {**ENGINES["zero2"], "model.compile": True}
# engine -> the one-process (eager) run it must match
REFERENCE = {"pipe": "single", "pipe_dp2": "single", "fsdp_rs_micro": "single", "fsdp": "single", "zero2": "single", "zero3": "single", "zero3_variant": "single_variant", "single_ac": "single", "fsdp_ac": "single", "zero3_ac": "single", "fsdp_variant": "single_variant", "pipe_ckpt": "single_untied",
             "fsdp_compiled": "single", "zero2_compiled": "single"}
COMMON = {
    "train.max_steps": STEPS,
    "train.grad_accum_steps": 2,
    "train.save_every": 0,
    "train.eval_every": SPLIT,
    "train.threads": 1,
    "log.geometry_every": SPLIT,  # geometry telemetry at steps 0, 3, 6
}


@functools.cache
def root() -> Path:
    path = Path(tempfile.mkdtemp(prefix="mgt_engines_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    write_zipf_shard(path / "train", n_docs=64, doc_len=300, vocab=256, seed=0)
    write_zipf_shard(path / "valid", n_docs=8, doc_len=300, vocab=256, seed=1)
    return path


def overrides(engine: str, run_dir: Path, **extra) -> list[str]:
    r = root()
    return tiny_overrides(str(r / "train"), str(r / "valid"), run_dir, **{**COMMON, **ENGINES[engine], **extra})


def launch(engine: str, args: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """One training run: in-process interpreter for `single`, torchrun with 2 processes
    otherwise. The launcher gets its own session and the whole group is killed on timeout
    (killing torchrun alone leaves its workers running)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    if engine.startswith("single"):
        cmd = [sys.executable, "-m", "megatron_mgt.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "megatron_mgt.train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{engine} run timed out after {timeout}s:\n{err[-3000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{engine} run failed ({proc.returncode}):\n{out[-2000:]}\n{err[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@functools.cache
def straight(engine: str) -> Path:
    """STEPS steps in one go; returns the run dir."""
    run_dir = root() / f"{engine}_straight"
    launch(engine, overrides(engine, run_dir))
    return run_dir


@functools.cache
def split(engine: str) -> Path:
    """SPLIT steps, exit with a checkpoint, resume to STEPS."""
    run_dir = root() / f"{engine}_split"
    launch(engine, overrides(engine, run_dir, **{"train.exit_at_step": SPLIT}))
    launch(engine, overrides(engine, run_dir))
    return run_dir


def train_records(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl", "train")


def valid_records(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl", "valid")


def geometry_records(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl", "geometry")
