#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the project.
#   bash launch/setup.sh [--dev]
# Env: MGT_VENV (default .venv), MGT_TORCH (default torch==2.13.0, the local CPU wheel;
# a GPU user sets MGT_TORCH=skip to keep their own CUDA torch), MGT_CONSTRAINTS.
# Idempotent: a stamp in the venv records what was installed; a dev install covers a plain one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MGT_VENV:-.venv}
TORCH=${MGT_TORCH:-torch==2.13.0}
CONSTRAINTS=${MGT_CONSTRAINTS:-launch/constraints-cpu.txt}
EXTRAS=""
[ "${1:-}" = "--dev" ] && EXTRAS="[dev]"

want=$( (cat pyproject.toml "$CONSTRAINTS"; pwd) | sha256sum | cut -c1-16)
for stamp in "$VENV/.mgt-installed[dev]" "$VENV/.mgt-installed$EXTRAS"; do
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup: $VENV is up to date"
    exit 0
  fi
done
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first: anything that pulls torch unpinned would otherwise fetch a multi-GB CUDA build.
[ "$TORCH" = "skip" ] || $PIP install "$TORCH"
if [ "$TORCH" = "skip" ]; then
  # keep the user's own (CUDA) torch: the CPU constraints must not pin it
  FILTERED="$VENV/.constraints-without-torch.txt"
  grep -v '^torch==' "$CONSTRAINTS" > "$FILTERED"
  CONSTRAINTS=$FILTERED
fi
$PIP install -c "$CONSTRAINTS" -e ".$EXTRAS"
echo "$want" > "$VENV/.mgt-installed$EXTRAS"
echo "setup: installed into $VENV"
