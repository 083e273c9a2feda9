"""Every GPU preset is ready to launch: the DeepSpeed presets build a DeepSpeed config that
DeepSpeed's own parser accepts at the data-parallel size their cluster implies, the Slurm
scripts' presets load, and a bf16 DeepSpeed step runs (on CPU: DeepSpeed's CPU accelerator
runs bf16), with gradients accumulated in fp32."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from megatron_mgt.config import ConfigError, load_config
from megatron_mgt.engine.ds_common import deepspeed_config
from megatron_mgt.job_array import load_array

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GPUS = 8  # a preset no Slurm script names (nor any preset it inherits from) runs on one 8-GPU node


def _is_array(path: Path) -> bool:
    return "presets" in (yaml.safe_load(path.read_text()) or {})


PRESETS = sorted(p for d in ("configs", "configs/engines", "configs/wt103") for p in (REPO / d).glob("*.yaml") if not _is_array(p))


def slurm_jobs() -> dict[Path, int]:
    """Preset -> GPUs of the Slurm script that launches it by default (#SBATCH --nodes x
    --gpus-per-node); an array file's presets count for the array's script."""
    jobs: dict[Path, int] = {}
    for script in sorted((REPO / "slurm").glob("*.sh")):
        text = script.read_text()
        nodes, gpus = (re.search(rf"^#SBATCH --{key}=(\d+)$", text, re.M) for key in ("nodes", "gpus-per-node"))
        for default in re.findall(r":-(configs/[\w/.-]+\.yaml)\}", text):
            path = (REPO / default).resolve()
            presets = {run.preset.resolve() for run in load_array(path)} if _is_array(path) else {path}
            for preset in presets:
                jobs[preset] = int(nodes.group(1)) * int(gpus.group(1))
    return jobs


def world_size(preset: Path, jobs: dict[Path, int]) -> int:
    """GPUs of the first preset in the inherit chain that a Slurm script launches."""
    path = preset.resolve()
    while path not in jobs:
        parent = (yaml.safe_load(path.read_text()) or {}).get("inherit")
        if not parent:
            return DEFAULT_GPUS
        path = (path.parent / parent).resolve()
    return jobs[path]


def test_slurm_presets_load():
    jobs = slurm_jobs()
    names = {p.relative_to(REPO).as_posix() for p in jobs}
    assert {"configs/mgt_200l.yaml", "configs/mgt_200l_debug.yaml", "configs/wt103/gpu_L200.yaml"} <= names
    assert jobs[REPO / "configs" / "mgt_200l.yaml"] == 16 and jobs[(REPO / "configs" / "wt103" / "gpu_L12.yaml").resolve()] == 8
    for preset in jobs:
        load_config(preset)  # array runs are validated with their overrides by load_array


def _validate_with_deepspeed(config: dict, dp: int) -> None:
    """DeepSpeed's own config parser (batch arithmetic, ZeRO and bf16 sections, data types) at
    data-parallel size `dp`, without a process group (its rank lookup patched to 0)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import config as ds_config

    class Grid:
        def get_data_parallel_world_size(self):
            return dp

    with mock.patch.object(ds_config.dist, "get_rank", return_value=0):
        parsed = ds_config.DeepSpeedConfig(config, mpu=Grid())
    assert parsed.world_size == dp and parsed.train_batch_size == config["train_batch_size"]
    assert parsed.grad_accum_dtype == "fp32" and parsed.bfloat16_config.enabled


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_deepspeed_presets_build_a_valid_config(preset):
    cfg = load_config(preset)
    p = cfg.parallel
    if not p.engine.startswith("deepspeed"):
        pytest.skip(f"engine {p.engine}")
    world = world_size(preset, slurm_jobs())
    stages = p.pipeline_stages if p.engine == "deepspeed_pipe" else 1
    assert world % stages == 0, f"{preset}: {stages} pipeline stages do not divide {world} GPUs"
    dp = world // stages
    config = deepspeed_config(cfg, dp, bf16=True)
    tc = cfg.train
    assert config["train_batch_size"] == tc.micro_batch_size * tc.grad_accum_steps * dp
    assert config["zero_optimization"]["stage"] == p.zero_stage and config["data_types"]["grad_accum_dtype"] == "fp32"
    _validate_with_deepspeed(config, dp)


def test_grad_accum_dtype_is_owned_by_the_project(tmp_path):
    base = ["parallel.engine=deepspeed_zero", "parallel.zero_stage=2"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data_types": {"grad_accum_dtype": "bf16"}}))
    with pytest.raises(ConfigError, match=r"'data_types.grad_accum_dtype' is set by the project"):
        deepspeed_config(load_config(None, [*base, f"parallel.deepspeed_config={bad}"]), 1, True)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"data_types": {"buffer_dtype": "fp32"}}))
    config = deepspeed_config(load_config(None, [*base, f"parallel.deepspeed_config={other}"]), 1, True)
    assert config["data_types"] == {"buffer_dtype": "fp32", "grad_accum_dtype": "fp32"}


BF16_STEPS = """
import json, sys, torch
from megatron_mgt.config import load_config
from megatron_mgt.engine import build_engine
from megatron_mgt.engine.dist import resolve_device
cfg = load_config(None, sys.argv[1:])
engine = build_engine(cfg, resolve_device("cpu"))
gen = torch.Generator().manual_seed(0)
losses = []
for _ in range(2):
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.grad_accum_steps, cfg.train.micro_batch_size, cfg.data.seq_len + 1), generator=gen)
    losses.append(engine.train_step([(t[:, :-1], t[:, 1:]) for t in tokens]).loss)
optimizer = engine.engine.optimizer
print(json.dumps({"losses": losses, "optimizer": type(optimizer).__name__, "param_dtype": str(next(engine.engine.module.parameters()).dtype),
                  "grad_accum": str(getattr(optimizer, "grad_acc_dtype", getattr(optimizer, "gradient_accumulation_dtype", None)))}))
engine.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine",
    [
        ["parallel.engine=deepspeed_pipe", "parallel.deepspeed_config=configs/deepspeed/pipe_zero1.json", "model.mgt.alpha_mode=fixed"],
        ["parallel.engine=deepspeed_zero", "parallel.zero_stage=2", "parallel.deepspeed_config=configs/deepspeed/zero2.json"],
    ],
    ids=["pipe_zero1_alpha_fixed", "zero2"],
)
def test_bf16_deepspeed_steps_accumulate_in_fp32(engine):
    """One process, bf16 weights (DeepSpeed casts parameters, keeps fp32 buffers: the fixed
    alpha of mgt), 2 steps of 2 micro-batches; the optimizer sums gradients in fp32."""
    tiny = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=128", "data.seq_len=16", "model.max_seq_len=16"]
    args = [*tiny, "model.residual=mgt", "train.precision=bf16", "train.micro_batch_size=2", "train.grad_accum_steps=2", *engine]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-c", BF16_STEPS, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["param_dtype"] == "torch.bfloat16" and out["grad_accum"] == "torch.float32", out
    assert out["optimizer"] == ("BF16_Optimizer" if "deepspeed_pipe" in engine[0] else "DeepSpeedZeroOptimizer"), out
    assert all(5.0 > loss > 4.0 for loss in out["losses"]), out  # about ln 128 = 4.85
