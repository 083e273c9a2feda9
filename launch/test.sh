#!/usr/bin/env bash
# Set up the environment (dev extras) and run the test suite.
#   bash launch/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --dev
export WANDB_MODE=disabled HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu
exec "${MGT_VENV:-.venv}/bin/python" -m pytest -q --durations=25 "$@"
