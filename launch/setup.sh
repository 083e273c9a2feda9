#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the project.
#   bash launch/setup.sh [--dev]
# Env: MGT_VENV (default .venv), MGT_TORCH (default torch==2.13.0, the local CPU wheel;
# a GPU user sets MGT_TORCH=skip to keep their own CUDA torch), MGT_CONSTRAINTS,
# MGT_EXTRAS (comma list of pyproject extras: dev, gpu).
# GPU machine (flash-attn is compiled against the CUDA torch already in the venv, so it is
# installed after the project with --no-build-isolation; needs nvcc, takes minutes):
#   MGT_TORCH=skip MGT_VENV=/path/to/env-with-cuda-torch MGT_EXTRAS=gpu bash launch/setup.sh
# Idempotent: a stamp in the venv records what was installed; a dev install covers a plain one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MGT_VENV:-.venv}
TORCH=${MGT_TORCH:-torch==2.13.0}
CONSTRAINTS=${MGT_CONSTRAINTS:-launch/constraints-cpu.txt}
LIST=${MGT_EXTRAS:-}
[ "${1:-}" = "--dev" ] && LIST="dev${LIST:+,$LIST}"
GPU=0
case ",$LIST," in *,gpu,*) GPU=1 ;; esac
if [ "$GPU" = 1 ] && [ "$TORCH" != "skip" ]; then
  echo "setup: MGT_EXTRAS=gpu builds flash-attn against your CUDA torch: set MGT_TORCH=skip and MGT_VENV to that environment" >&2
  exit 2
fi
PIP_EXTRAS=$(echo "$LIST" | tr ',' '\n' | { grep -vx -e gpu -e '' || true; } | sort -u | paste -sd, -)
EXTRAS=${PIP_EXTRAS:+[$PIP_EXTRAS]}
STAMP_GPU=$([ "$GPU" = 1 ] && echo "+gpu" || true)

want=$( (cat pyproject.toml "$CONSTRAINTS"; pwd) | sha256sum | cut -c1-16)
for stamp in "$VENV/.mgt-installed[dev]$STAMP_GPU" "$VENV/.mgt-installed$EXTRAS$STAMP_GPU"; do
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
if [ "$GPU" = 1 ]; then
  if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
    echo "setup: MGT_EXTRAS=gpu but the torch in $VENV is not a CUDA build (torch.version.cuda is None)" >&2
    exit 2
  fi
  $PIP install packaging ninja wheel
  $PIP install --no-build-isolation "$(sed -n 's/^gpu = \["\(.*\)"\]$/\1/p' pyproject.toml)"
fi
echo "$want" > "$VENV/.mgt-installed$EXTRAS$STAMP_GPU"
echo "setup: installed into $VENV"
