"""bench/gpu_check.sh --dry-run: the single-GPU check's code path on CPU at tiny sizes, and
the attention-kernel choice it reports (flash-attn only where it can run, else SDPA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_mgt.model.attention import flash_refusal, flash_usable, kernel_description

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "attention", "throughput", "activation_memory", "deep", "engines", "telemetry", "fused"]


def test_dry_run_writes_json_and_markdown(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MGT_PYTHON=sys.executable, OUT=str(tmp_path / "out"), PYTHONPATH="")
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] and list(report["sections"]) == SECTIONS
    assert all(s["status"] == "ok" for s in report["sections"].values()), report
    sec = {name: s["result"] for name, s in report["sections"].items()}
    assert set(sec["env"]["optional_packages"]) == {"deepspeed", "wandb", "datasets", "flash_attn"}
    assert sec["env"]["attention_kernel"].startswith("SDPA")  # CPU, fp32
    assert sec["attention"]["kernels"]["sdpa_default"]["max_abs_err"] < 1e-5
    for variant in ("preln", "mgt"):
        assert sec["throughput"]["variants"][variant]["tokens_per_s"] > 0 and sec["throughput"]["variants"][variant]["mfu"] > 0
    plan = {v: r["plan_mb_per_block"] for v, r in sec["activation_memory"]["variants"].items()}
    assert plan["preln"] < plan["mgt+recompute"] < plan["mgt+fused"] < plan["mgt"]  # the planner sees each fused mode
    fused = sec["fused"]
    assert set(fused["results"]) == {"preln", "mgt", "mgt+recompute"}
    assert fused["ratios"]["mgt+recompute/preln"]["saved_bytes_per_token_per_layer"] < fused["ratios"]["mgt/preln"]["saved_bytes_per_token_per_layer"]
    assert sec["deep"]["finite"] and sec["deep"]["loss_last"] < sec["deep"]["loss_first"]
    assert sec["engines"]["backend"] == "gloo" and sec["engines"]["runs"]["fp32"]["max_abs_diff"] <= 1e-4
    spectra = sec["telemetry"]["spectra"]
    assert set(spectra) == {"svd", "gram"} and all(r["seconds_per_layer"] > 0 for r in spectra.values())
    assert sec["telemetry"]["erank_abs_diff"] < 1e-6
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    for heading in (
        "# GPU check",
        "## Attention against fp32 math",
        "## Throughput",
        "## Activation memory per block",
        "## Deep model",
        "## Single vs FSDP",
        "## Telemetry spectrum per layer",
        "## MGT at the cost of its FLOPs",
    ):
        assert heading in md
    assert report["seconds"] < 150


def test_flash_is_refused_with_a_reason_and_sdpa_runs_instead():
    bf16 = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    assert "dtype" in flash_refusal(bf16.float(), "auto")
    assert "head_dim 512" in flash_refusal(torch.zeros(1, 8, 2, 512, dtype=torch.bfloat16), "auto")
    assert "head_dim 60" in flash_refusal(torch.zeros(1, 8, 2, 60, dtype=torch.bfloat16), "auto")
    assert flash_refusal(bf16, "sdpa") == "model.attention_kernel=sdpa"
    assert not flash_usable(bf16, "auto")  # CPU (and flash-attn absent here)
    description = kernel_description(512, "auto", torch.device("cpu"), torch.bfloat16, n_heads=2)
    assert description.startswith("SDPA ") and "head_dim 512" in description
