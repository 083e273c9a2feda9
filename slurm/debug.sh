#!/usr/bin/env bash
#SBATCH --job-name=mgt_debug
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# A small 1-node debug job: the 200-layer stack at a small width in a 2-stage pipeline on
# 2 GPUs for 100 steps (configs/mgt_200l_debug.yaml), through the same launch code as the
# big job (slurm/mgt_200l.sh: rendezvous, NCCL settings, signals, requeue, resume).
# Run it before booking the big job:
#
#   mkdir -p logs && sbatch slurm/debug.sh [section.key=value ...]
#
# The same environment knobs as mgt_200l.sh apply (MGT_PRESET, MGT_OVERRIDES, MGT_PYTHON,
# MGT_BACKEND, MGT_RUN_DIR, MGT_TASKS_PER_NODE, ...).
set -uo pipefail
REPO=${MGT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
export MGT_PRESET=${MGT_PRESET:-configs/mgt_200l_debug.yaml}
export MGT_RUN_DIR=${MGT_RUN_DIR:-runs/${SLURM_JOB_NAME:-mgt_debug}}
# exec: the batch shell becomes mgt_200l.sh, so its signal traps see Slurm's SIGUSR1.
exec bash "$REPO/slurm/mgt_200l.sh" "$@"
