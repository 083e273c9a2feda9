#!/usr/bin/env bash
# Issue 14 item 7: why ddl_rank1's seed spread in the first report (0.0025 nats over 5 seeds)
# was 20-40x smaller than every other arm's. Re-runs the first report's ablation setting
# (configs/experiments/base_cpu.yaml: d 64, 24 layers, 61k tokens, lr 3e-3, 8192-piece
# Shakespeare) for ddl_rank1, preln and the 0-layer model (embedding + final norm + head),
# 5 seeds each, and evaluates each with mgt-eval (n-gram baselines, distance from init,
# per-sublayer update ratio |dX|/|X|). Writes runs/ddl_rank1_anomaly/ and a JSON summary.
#   bash bench/ddl_rank1_anomaly.sh   (data: mgt-prep prepare-default --out data/shakespeare)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${MGT_VENV:-.venv}/bin"
OUT=${OUT:-runs/ddl_rank1_anomaly}
for arm in ddl_rank1 preln embed_only; do
  for seed in 1 2 3 4 5; do
    run="$OUT/${arm}_s$seed"
    [ -f "$run/eval/eval.json" ] && continue
    extra=("model.residual=$arm" "model.n_layers=24")
    [ "$arm" = embed_only ] && extra=("model.residual=preln" "model.n_layers=0")
    "$BIN/mgt-train" configs/experiments/base_cpu.yaml "${extra[@]}" "train.seed=$seed" "train.run_dir=$run" log.progress=false >/dev/null
    "$BIN/mgt-eval" "$run" >/dev/null
  done
done
"$BIN/python" - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for arm in ("ddl_rank1", "preln", "embed_only"):
    evals = [json.loads((out / f"{arm}_s{s}" / "eval" / "eval.json").read_text()) for s in range(1, 6)]
    losses = [e["valid"]["loss"] for e in evals]
    ratios = [statistics.mean(v["update_ratio"] for v in e["geometry"]["sublayers"].values()) if e["geometry"]["sublayers"] else None for e in evals]
    summary[arm] = {
        "valid_loss": losses, "mean": statistics.mean(losses), "std": statistics.stdev(losses),
        "distance_from_init_model": [e["distance_from_init"]["model"] for e in evals],
        "distance_from_init_blocks_mean": [statistics.mean(e["distance_from_init"]["per_block"]) if e["distance_from_init"]["per_block"] else None for e in evals],
        "mean_update_ratio": ratios,
        "baselines": evals[0]["baselines"],
    }
(out / "summary.json").write_text(json.dumps(summary, indent=2))
for arm, s in summary.items():
    print(f"{arm:10s} loss {s['mean']:.4f} +- {s['std']:.4f} (seed std); |theta-theta0|/|theta0| {statistics.mean(s['distance_from_init_model']):.3f}; "
          f"blocks {s['distance_from_init_blocks_mean'][0]}; |dX|/|X| {s['mean_update_ratio'][0]}")
b = summary["preln"]["baselines"]
print(f"baselines: unigram {b['unigram']:.4f}, bigram KN {b['bigram_kn']:.4f}")
PY
"$BIN/python" bench/ddl_rank1_plots.py "$OUT" docs/results/ddl_rank1_anomaly
