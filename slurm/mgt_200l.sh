#!/usr/bin/env bash
#SBATCH --job-name=mgt_200l
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@420
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# USR1 420 s before the limit: mgt-plan puts a 200-layer checkpoint at ~190 GB, ~95 s at 2 GB/s;
# the margin covers the step in flight, the barriers and the requeue.
#
# The 200-layer MGT pretraining job: 2 nodes x 8 GPUs, one task per GPU, an 8-stage
# DeepSpeed pipeline x 2 data-parallel replicas (configs/mgt_200l.yaml).
#
#   mkdir -p logs && sbatch slurm/mgt_200l.sh [section.key=value ...]
#
# Submit from the repository root (the job cds to $SLURM_SUBMIT_DIR). Overrides after the
# script name go to mgt-train, after the preset. Check the shape first: mgt-plan
# configs/mgt_200l.yaml --nodes 2 --gpus-per-node 8 (docs/LAUNCH.md).
#
# Preemption and time limits: 120 s before the limit Slurm sends SIGUSR1 to this script
# (B: = the batch shell only). The trap forwards it through srun to every rank; the
# trainer finishes its step, writes a checkpoint and exits 0; the script then runs
# `scontrol requeue`, and the requeued job resumes from the checkpoint (train.resume=auto,
# same run dir). A SIGTERM (scancel, or preemption with PreemptMode=REQUEUE, where Slurm
# requeues by itself) is forwarded the same way but does not requeue.
#
# Everything site- or machine-specific comes from the environment (sbatch exports it), so
# the same file runs a CPU-sized job (tests/test_slurm.py does exactly that):
#   MGT_PRESET          preset YAML (default configs/mgt_200l.yaml)
#   MGT_OVERRIDES       extra dotted overrides, space-separated (before the script's args)
#   MGT_PYTHON          python with the project installed (default .venv/bin/python, else python3)
#   MGT_BACKEND         nccl | gloo -> parallel.backend (default: the preset's, auto = nccl on CUDA)
#   MGT_RUN_DIR         run dir shared by every restart of the job (default runs/$SLURM_JOB_NAME)
#   MGT_TASKS_PER_NODE  ranks per node (default --ntasks-per-node: one per GPU)
#   MGT_CPUS_PER_TASK   CPUs (and OMP threads) per rank (default --cpus-per-task)
#   MGT_MASTER_PORT     rendezvous port (default 20000 + job id mod 20000, + restart count)
#   MGT_REQUEUE=0       do not requeue after SIGUSR1 (just checkpoint and stop)
#   MGT_REPO            repository root (default $SLURM_SUBMIT_DIR)
#   DS_ACCELERATOR=cpu, SBATCH_TIMELIMIT, SBATCH_OUTPUT, SBATCH_PARTITION ... as usual.
set -uo pipefail

REPO=${MGT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO" || { echo "mgt_200l: cannot cd to $REPO" >&2; exit 2; }
PRESET=${MGT_PRESET:-configs/mgt_200l.yaml}
PY=${MGT_PYTHON:-}
if [ -z "$PY" ]; then
  for cand in "${MGT_VENV:-.venv}/bin/python" python3; do command -v "$cand" >/dev/null && { PY=$cand; break; }; done
fi
JOB_ID=${SLURM_JOB_ID:?run this script with sbatch}
RESTART=${SLURM_RESTART_COUNT:-0}
RUN_DIR=${MGT_RUN_DIR:-runs/${SLURM_JOB_NAME:-mgt_200l}}
JOB_DIR=$RUN_DIR/jobs/$JOB_ID.$RESTART  # this job (and this restart of it): environment record
mkdir -p "$JOB_DIR"

# --- rendezvous: the first node of the allocation hosts the TCP store ----------------------
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MGT_MASTER_PORT:-$((20000 + (JOB_ID + RESTART) % 20000))}
NNODES=${SLURM_JOB_NUM_NODES:-1}
TASKS_PER_NODE=${MGT_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_PER_NODE:-1}}}
TASKS_PER_NODE=${TASKS_PER_NODE%%(*}  # "8(x2)" forms -> 8
CPUS_PER_TASK=${MGT_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-1}}
NTASKS=$((NNODES * TASKS_PER_NODE))
export MASTER_ADDR MASTER_PORT

# --- NCCL (ignored by gloo) ----------------------------------------------------------------
# A rank that dies or hangs makes the others raise after the collective timeout instead of
# waiting forever, so the job ends and can be requeued (old and new name of the variable).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
# InfiniBand between nodes: leave IB on; on a cluster with several HCAs, or to exclude a
# management port, the site sets NCCL_IB_HCA (e.g. mlx5_0,mlx5_1) and NCCL_SOCKET_IFNAME
# (the interface of the bootstrap/TCP fallback, e.g. ib0 or ^lo,docker). IB timeout 2^22 x
# 4.096 us ~ 17 s per retry, 7 retries: rides out a link flap instead of failing the job.
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-7}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # INFO prints the chosen transport (IB/NET/P2P) per ring

# --- process environment -------------------------------------------------------------------
export OMP_NUM_THREADS=$CPUS_PER_TASK
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}  # DeepSpeed JIT ops, built once

OVERRIDES=("train.resume=auto" "train.run_dir=$RUN_DIR")
[ -n "${MGT_BACKEND:-}" ] && OVERRIDES+=("parallel.backend=$MGT_BACKEND")
# shellcheck disable=SC2206  # MGT_OVERRIDES is a space-separated list on purpose
[ -n "${MGT_OVERRIDES:-}" ] && OVERRIDES+=(${MGT_OVERRIDES})
OVERRIDES+=("$@")

{
  echo "job $JOB_ID restart $RESTART on $SLURM_JOB_NODELIST, $(date -u +%FT%TZ)"
  echo "master $MASTER_ADDR:$MASTER_PORT, $NNODES node(s) x $TASKS_PER_NODE task(s), $CPUS_PER_TASK CPU(s) each"
  echo "commit $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "python $PY"
  echo "preset $PRESET"
  printf 'override %s\n' "${OVERRIDES[@]}"
  env | grep -E '^(NCCL_|TORCH_NCCL|DS_ACCELERATOR|CUDA_VISIBLE|OMP_NUM)' | sort
} | tee "$JOB_DIR/launch.txt"

# --- signals: forward to the ranks, let them checkpoint, then requeue -----------------------
SRUN_PID=""
REQUEUE=0
forward() {  # signal name, requeue afterwards?
  echo "mgt_200l: got SIG$1 at $(date -u +%T); forwarding to the ranks (they checkpoint and exit)"
  [ "$2" = 1 ] && REQUEUE=1
  [ -n "$SRUN_PID" ] && kill -s "$1" "$SRUN_PID" 2>/dev/null  # srun forwards it to every task
}
trap 'forward USR1 1' USR1
trap 'forward TERM 0' TERM

# One task per GPU: each task learns its place from Slurm and execs the trainer, so the
# signal reaches python itself.
srun --ntasks="$NTASKS" --ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" \
  --kill-on-bad-exit=1 --label \
  bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
                  LOCAL_WORLD_SIZE=$(( SLURM_NTASKS / SLURM_NNODES )) NODE_RANK=$SLURM_NODEID
           echo "rank $RANK of $WORLD_SIZE (local $LOCAL_RANK) on ${SLURMD_NODENAME:-$(hostname)}"
           exec "$0" -m megatron_mgt.train "$@"' "$PY" "$PRESET" "${OVERRIDES[@]}" &
SRUN_PID=$!

# `wait` returns early when a trapped signal arrives: keep waiting until srun is gone.
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
wait "$SRUN_PID"
RC=$?
echo "mgt_200l: ranks exited with status $RC at $(date -u +%T)"

if [ "$REQUEUE" = 1 ] && [ "$RC" = 0 ] && [ "${MGT_REQUEUE:-1}" = 1 ]; then
  echo "mgt_200l: requeueing job $JOB_ID (restart $((RESTART + 1))); it resumes from $RUN_DIR/checkpoints"
  scontrol requeue "$JOB_ID"
fi
exit "$RC"
