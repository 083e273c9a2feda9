#!/usr/bin/env bash
#SBATCH --job-name=wt103
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@420
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
# USR1 420 s before the limit: mgt-plan puts a 200-layer checkpoint at ~190 GB, ~95 s at 2 GB/s;
# the margin covers the step in flight, the barriers and the requeue.
#
# WikiText-103 long-horizon stability study: a Slurm job array, one task per
# (variant, depth, seed) of the array file, each on one 8-GPU node (docs/WIKITEXT.md).
#
#   python -m megatron_mgt.job_array configs/wt103/array_gpu.yaml --list     # the runs, by index
#   mkdir -p logs && sbatch --array=0-15%4 slurm/wt103_stability.sh [section.key=value ...]
#
# Task i trains run i of $MGT_ARRAY (default configs/wt103/array_gpu.yaml) into its own run
# directory runs/<name>/<variant>_L<depth>_s<seed> (wandb group <name>) through the launch
# code of slurm/mgt_200l.sh: rendezvous, NCCL settings, srun, signal -> checkpoint ->
# `scontrol requeue` of this task, resume=auto. A task requeued or resubmitted later continues
# its run where the last checkpoint left it; finished runs exit at once.
# Environment: MGT_ARRAY, and every knob of slurm/mgt_200l.sh (MGT_OVERRIDES, MGT_PYTHON, ...).
set -uo pipefail
REPO=${MGT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO" || { echo "wt103_stability: cannot cd to $REPO" >&2; exit 2; }
ARRAY=${MGT_ARRAY:-configs/wt103/array_gpu.yaml}
INDEX=${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=0-N}
PY=${MGT_PYTHON:-}
if [ -z "$PY" ]; then
  for cand in "${MGT_VENV:-.venv}/bin/python" python3; do command -v "$cand" >/dev/null && { PY=$cand; break; }; done
fi
assignments=$("$PY" -m megatron_mgt.job_array "$ARRAY" --index "$INDEX" --shell) || exit 2
eval "$assignments"  # MGT_RUN_NAME, MGT_PRESET, MGT_RUN_DIR, MGT_RUN_OVERRIDES
echo "wt103_stability: array task $INDEX of $ARRAY -> $MGT_RUN_NAME ($MGT_PRESET)"
export MGT_PRESET MGT_RUN_DIR MGT_PYTHON=$PY
export MGT_OVERRIDES="$MGT_RUN_OVERRIDES${MGT_OVERRIDES:+ $MGT_OVERRIDES}"
# exec: the batch shell becomes mgt_200l.sh, so its traps see Slurm's SIGUSR1.
exec bash "$REPO/slurm/mgt_200l.sh" "$@"
