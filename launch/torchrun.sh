#!/usr/bin/env bash
# One node, N processes under torchrun: a preset and dotted overrides go to mgt-train.
#   bash launch/torchrun.sh configs/mgt_200l.yaml parallel.engine=deepspeed_pipe parallel.pipeline_stages=8
#   NPROC=2 MGT_BACKEND=gloo bash launch/torchrun.sh configs/quickstart.yaml parallel.engine=fsdp
# Env: NPROC (default: number of visible GPUs, else 1), MGT_PYTHON (default: the project
# venv's python, $MGT_VENV or .venv, else python3), MGT_BACKEND (nccl|gloo: becomes
# parallel.backend), MGT_OVERRIDES (more overrides, space-separated).
# torchrun --standalone picks a free rendezvous port itself (never --master_port 0: it hangs).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,9p' "$0"; exit 2; }
PRESET=$1; shift
PY=${MGT_PYTHON:-}
if [ -z "$PY" ]; then
  cand="${MGT_VENV:-.venv}/bin/python"; [ -x "$cand" ] && PY=$cand
  PY=${PY:-python3}
fi
gpu_count() {  # GPUs listed by nvidia-smi; 0 without a driver
  local n=0
  command -v nvidia-smi >/dev/null 2>&1 && n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  echo "${n:-0}"
}
NPROC=${NPROC:-$(gpu_count)}
[ "$NPROC" -ge 1 ] 2>/dev/null || NPROC=1
EXTRA=()
[ -n "${MGT_BACKEND:-}" ] && EXTRA+=("parallel.backend=$MGT_BACKEND")
# shellcheck disable=SC2206  # word-splitting of MGT_OVERRIDES is intended
[ -n "${MGT_OVERRIDES:-}" ] && EXTRA+=(${MGT_OVERRIDES})
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "torchrun: $NPROC process(es), $PY, preset $PRESET" >&2
exec "$PY" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NPROC" \
  -m megatron_mgt.train "$PRESET" "$@" ${EXTRA[@]+"${EXTRA[@]}"}
