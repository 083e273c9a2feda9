#!/usr/bin/env bash
#SBATCH --job-name=mgt_exp
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
#
# An evaluation-protocol runner (megatron_mgt/experiments) on a cluster: every task of the
# array runs the same `mgt-experiment NAME --preset PRESET` on one GPU. The tasks share the
# experiment's run pool; a run another task is training is passed over and waited for at the
# end, so N tasks split the grid N ways and each writes the complete results at the end.
#
#   mkdir -p logs && sbatch --array=0-7 slurm/experiment.sh depth_scaling configs/experiments/depth_scaling_gpu.yaml [grid.k=v | section.k=v ...]
#
# Preemption / time limit: SIGUSR1 (120 s before the limit) or SIGTERM reach the runner; the
# run in training checkpoints and stops, and after SIGUSR1 the task is requeued
# (`scontrol requeue`) and resumes it (MGT_REQUEUE=0: do not). Environment: MGT_PYTHON,
# MGT_VENV, MGT_REPO as in slurm/mgt_200l.sh.
set -uo pipefail
REPO=${MGT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO" || { echo "experiment: cannot cd to $REPO" >&2; exit 2; }
NAME=${1:?usage: sbatch --array=0-N slurm/experiment.sh NAME PRESET [overrides]}
PRESET=${2:?usage: sbatch --array=0-N slurm/experiment.sh NAME PRESET [overrides]}
shift 2
PY=${MGT_PYTHON:-}
if [ -z "$PY" ]; then
  for cand in "${MGT_VENV:-.venv}/bin/python" python3; do command -v "$cand" >/dev/null && { PY=$cand; break; }; done
fi
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
echo "experiment: $NAME $PRESET $* (job ${SLURM_JOB_ID:-?}, array task ${SLURM_ARRAY_TASK_ID:-none}, restart ${SLURM_RESTART_COUNT:-0}) on $(hostname)"

CHILD=""
REQUEUE=0
trap 'echo "experiment: got SIGUSR1, checkpointing"; REQUEUE=1; [ -n "$CHILD" ] && kill -USR1 "$CHILD"' USR1
trap 'echo "experiment: got SIGTERM"; [ -n "$CHILD" ] && kill -TERM "$CHILD"' TERM
"$PY" -m megatron_mgt.experiments.cli "$NAME" --preset "$PRESET" "$@" &
CHILD=$!
while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD"; done
wait "$CHILD"
RC=$?
echo "experiment: runner exited with status $RC"
if [ "$REQUEUE" = 1 ] && [ "${MGT_REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "experiment: requeueing ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$RC"
