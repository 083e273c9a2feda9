#!/usr/bin/env bash
# One node, N processes under the DeepSpeed launcher: a preset and dotted overrides go to
# mgt-train (the engine is chosen by the preset or by parallel.engine=...).
#   bash launch/deepspeed.sh configs/mgt_200l.yaml parallel.engine=deepspeed_pipe parallel.pipeline_stages=8
#   NPROC=2 MGT_BACKEND=gloo DS_ACCELERATOR=cpu bash launch/deepspeed.sh configs/quickstart.yaml ...
# Env: NPROC (default: number of visible GPUs, else 1), MGT_PYTHON, MGT_BACKEND (nccl|gloo),
# MGT_OVERRIDES (more overrides), MASTER_PORT (default: a free port found now).
# The launcher passes --local_rank=N to its workers; mgt-train does not take it, so the
# workers read LOCAL_RANK from the environment instead (--no_local_rank).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,10p' "$0"; exit 2; }
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
PORT=${MASTER_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
EXTRA=()
[ -n "${MGT_BACKEND:-}" ] && EXTRA+=("parallel.backend=$MGT_BACKEND")
# shellcheck disable=SC2206
[ -n "${MGT_OVERRIDES:-}" ] && EXTRA+=(${MGT_OVERRIDES})
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "deepspeed: $NPROC process(es), port $PORT, $PY, preset $PRESET" >&2
# --num_gpus is the launcher's process count per node (on CPU with DS_ACCELERATOR=cpu, too).
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" \
  --no_local_rank --module megatron_mgt.train "$PRESET" "$@" ${EXTRA[@]+"${EXTRA[@]}"}
