#!/usr/bin/env bash
# First checks on a single-GPU machine, from the working tree as it is (no install):
# attention kernels against fp32 math, bf16 throughput / MFU of preln and mgt, activation
# memory per block against mgt-plan, a 200-layer MGT trained with activation checkpointing,
# single vs FSDP engine at world size 1, the telemetry spectrum (svd vs gram), bench_fused's eager/fused/compiled table (bench/gpu_check.py).
# Under 9 minutes on one GPU.
#   bash bench/gpu_check.sh [--out DIR] [--dry-run] [--only env,attention,...]
# Output: DIR (default $OUT, else gpu_check_out)/gpu_check.json and gpu_check.md.
# Env: MGT_PYTHON (default python3): a python with torch (CUDA build), numpy, pyyaml, tqdm;
# deepspeed, wandb, datasets and flash-attn are optional (reported, not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${MGT_PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the model must import with nothing beyond torch, numpy, pyyaml, tqdm
"$PY" - <<'PYEOF'
import sys
import megatron_mgt.model  # noqa: F401
extra = sorted({n.split(".")[0] for n in sys.modules} - set(sys.stdlib_module_names) - {"megatron_mgt", "torch", "numpy", "yaml", "tqdm"})
print("gpu_check: torch", __import__("torch").__version__, "| megatron_mgt.model also loaded:", ", ".join(m for m in extra if not m.startswith("_")) or "nothing else")
PYEOF
exec timeout --signal=TERM 530 "$PY" bench/gpu_check.py "$@"
