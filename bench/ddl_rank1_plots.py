"""Per-layer plots and summary of bench/ddl_rank1_anomaly.sh's runs (issue 14 item 7):
|dX|/|X| per sublayer and distance from init per block, mean +- sd over 5 seeds.
    python bench/ddl_rank1_plots.py [RUNS_DIR] [OUT_DIR]"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from megatron_mgt import plots


def main(root: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ratio, dist, summary = {}, {}, json.loads((root / "summary.json").read_text())
    for arm in ("ddl_rank1", "preln"):
        evals = [json.loads((root / f"{arm}_s{s}" / "eval" / "eval.json").read_text()) for s in range(1, 6)]
        per = [[v["update_ratio"] for v in e["geometry"]["sublayers"].values()] for e in evals]
        ratio[arm] = [(i, statistics.mean(p[i] for p in per), statistics.stdev(p[i] for p in per)) for i in range(len(per[0]))]
        blocks = [e["distance_from_init"]["per_block"] for e in evals]
        dist[arm] = [(i, statistics.mean(b[i] for b in blocks), statistics.stdev(b[i] for b in blocks)) for i in range(len(blocks[0]))]
    plots.plot_series_vs_x(ratio, out / "update_ratio_by_sublayer.png", "|dX|/|X| per sublayer (attn, mlp alternating), 24 layers, 5 seeds", "sublayer", "|X_new - X| / |X|", logy=True)
    plots.plot_series_vs_x(dist, out / "distance_from_init_by_block.png", "|theta - theta_0| / |theta_0| per block, 5 seeds", "block", "relative distance from init")
    summary["per_layer"] = {"update_ratio": ratio, "distance_from_init": dist}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ddl_rank1_anomaly"), Path(sys.argv[2] if len(sys.argv) > 2 else "docs/results/ddl_rank1_anomaly"))
