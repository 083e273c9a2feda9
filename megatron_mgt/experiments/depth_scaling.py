"""Protocol item 4: loss and final effective rank against depth, for every variant.

    mgt-experiment depth_scaling --preset configs/experiments/depth_scaling_cpu.yaml

grid: variants, depths, seeds. Runs go depth-major (all variants at 12 layers, then 24,
...), so an interrupted campaign has complete depths. Results per (variant, depth): mean
and seed spread of the held-out loss and of the final-layer normalised effective rank.
"""

from __future__ import annotations

from megatron_mgt import plots
from megatron_mgt.config import derive
from megatron_mgt.experiments.common import Experiment, run_grid, run_summary, variants_for
from megatron_mgt.experiments.report import markdown_table, sizes_line, write_results
from megatron_mgt.experiments.stats import mean_std


def run(exp: Experiment) -> dict:
    g = exp.grid
    variants = variants_for(g.get("variants", ["preln", "postln", "deepnorm", "mgt"]))
    depths = [int(d) for d in g.get("depths", [12, 24, 48, 100, 200])]
    seeds = [int(s) for s in g.get("seeds", [exp.base.train.seed])]
    specs = [(derive(exp.base, {"model.residual": v, "model.n_layers": d, "train.seed": s}), "") for d in depths for v in variants for s in seeds]
    outcomes = run_grid(specs, exp.pool, "depth_scaling", evolution=bool(g.get("evolution", False)))
    runs = [run_summary(o) for o in outcomes]
    table = []
    for v in variants:
        for d in depths:
            mine = [r for r in runs if r["residual"] == v and r["n_layers"] == d]
            loss, loss_sd, n = mean_std([r["valid_loss"] for r in mine])
            erank, erank_sd, _ = mean_std([r["erank_final_layer"] for r in mine])
            erank0, _, _ = mean_std([r["erank_final_layer_init"] for r in mine])
            diverged = sum(r["status"] == "diverged" for r in mine)
            table.append({"variant": v, "depth": d, "valid_loss": loss, "valid_loss_std": loss_sd, "erank_final": erank, "erank_final_std": erank_sd,
                          "erank_final_init": erank0, "seeds": len(mine), "finished": n, "diverged": diverged})
    out = exp.out
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_series_vs_x({v: [(r["depth"], r["valid_loss"], r["valid_loss_std"]) for r in table if r["variant"] == v] for v in variants},
                           out / "loss_vs_depth.png", "held-out loss vs depth", "layers", "valid loss (nats/token)", logx=True)
    plots.plot_series_vs_x({v: [(r["depth"], r["erank_final"], r["erank_final_std"]) for r in table if r["variant"] == v] for v in variants},
                           out / "erank_vs_depth.png", "final-layer effective rank vs depth (trained)", "layers", "erank / min(T, d)", logx=True)
    md = f"# depth_scaling\n\n{sizes_line(exp)}; seeds {seeds}.\n\n"
    md += markdown_table(["variant", "layers", "valid loss", "+-", "erank last (trained)", "erank last (init)", "runs", "diverged"],
                         [[r["variant"], r["depth"], r["valid_loss"], r["valid_loss_std"], r["erank_final"], r["erank_final_init"], r["seeds"], r["diverged"]] for r in table])
    md += "\n![loss](loss_vs_depth.png)\n![erank](erank_vs_depth.png)\n"
    results = {"table": table, "runs": runs}
    write_results(exp, results, md)
    return results
