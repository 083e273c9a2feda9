"""Protocol item 3: per layer and sublayer beta statistics over training, and the test of
the hypothesis that negative beta appears systematically in deep layers and goes with
preserved rank.

    mgt-experiment beta_distribution --preset configs/experiments/beta_distribution_cpu.yaml

grid: variants (those with a DDL controller: ddl, mgt), depths, seeds. Beta comes from the
kept checkpoints (eval/evolution.json, the probe batch). Reported per run, at the last
checkpoint: Spearman correlations over layers of (a) the layer's fraction of negative
beta (attn and mlp sublayers averaged) with its depth, (b) with the effective rank of that
layer's output X_{l+1}, (c) with the rank change through the layer erank(X_{l+1}) -
erank(X_l); and the fraction of negative beta in the shallowest and deepest third.
"""

from __future__ import annotations

import json
import math

from megatron_mgt import plots
from megatron_mgt.config import derive
from megatron_mgt.experiments.common import Experiment, run_grid, run_summary, variants_for
from megatron_mgt.experiments.report import markdown_table, sizes_line, write_results
from megatron_mgt.stats import mean_std, spearman


def layer_beta(sublayers: dict, n_layers: int, key: str) -> list[float]:
    """Per layer: the mean over its attn and mlp sublayers of beta_stats[key] (NaN without beta)."""
    out = []
    for layer in range(n_layers):
        values = [sublayers.get(f"layers.{layer}.{part}", {}).get("beta", {}).get(key) for part in ("attn", "mlp")]
        values = [v for v in values if v is not None]
        out.append(sum(values) / len(values) if values else math.nan)
    return out


def beta_rank_stats(point: dict, n_layers: int) -> dict:
    """The hypothesis test on one geometry snapshot (see the module docstring)."""
    neg = layer_beta(point["sublayers"], n_layers, "frac_negative")
    mean = layer_beta(point["sublayers"], n_layers, "mean")
    erank = point["erank"]
    out_rank = erank[1:]
    change = [erank[i + 1] - erank[i] for i in range(n_layers)]
    third = max(1, n_layers // 3)
    return {
        "frac_negative_by_layer": neg,
        "beta_mean_by_layer": mean,
        "frac_negative_all": sum(neg) / n_layers,
        "frac_negative_shallow_third": sum(neg[:third]) / third,
        "frac_negative_deep_third": sum(neg[-third:]) / third,
        "spearman_negfrac_depth": spearman(neg, list(range(n_layers))),
        "spearman_negfrac_erank_out": spearman(neg, out_rank),
        "spearman_negfrac_erank_change": spearman(neg, change),
        "spearman_betamean_erank_out": spearman(mean, out_rank),
    }


def run(exp: Experiment) -> dict:
    g = exp.grid
    variants = variants_for(g.get("variants", ["ddl", "mgt"]))
    depths = [int(d) for d in g.get("depths", [exp.base.model.n_layers])]
    seeds = [int(s) for s in g.get("seeds", [exp.base.train.seed])]
    specs = [(derive(exp.base, {"model.residual": v, "model.n_layers": d, "train.seed": s}), "") for d in depths for v in variants for s in seeds]
    outcomes = run_grid(specs, exp.pool, "beta_distribution", evolution=True)
    out = exp.out
    out.mkdir(parents=True, exist_ok=True)
    runs, scatter = [], {}
    for o in outcomes:
        d = o.cfg.model.n_layers
        points = json.loads((o.run_dir / "eval" / "evolution.json").read_text())["points"]
        if not any("beta" in s for s in points[-1]["sublayers"].values()):
            continue
        over_steps = [{"step": p["step"], **beta_rank_stats(p, d)} for p in points]
        final = over_steps[-1]
        summary = run_summary(o)
        summary.update(over_steps=over_steps, final=final, sublayer_beta_final={k: v["beta"] for k, v in points[-1]["sublayers"].items() if "beta" in v})
        runs.append(summary)
        label = f"{o.cfg.model.residual} L{d} s{o.cfg.train.seed}"
        scatter[label] = list(zip(final["frac_negative_by_layer"], points[-1]["erank"][1:], strict=True))
        if o.cfg.train.seed == seeds[0]:
            tag = f"{o.cfg.model.residual}_L{d}"
            plots.plot_beta_by_layer(list(summary["sublayer_beta_final"].values()), out / f"beta_by_sublayer_{tag}.png",
                                     f"beta per sublayer after training (attn, mlp alternating), {o.cfg.model.residual} {d} layers")
            steps = [p["step"] for p in over_steps]
            plots.plot_heatmap([[p["frac_negative_by_layer"][layer] for p in over_steps] for layer in range(d)], steps, out / f"negfrac_heatmap_{tag}.png",
                               f"fraction of beta < 0 [layer, step], {o.cfg.model.residual} {d} layers", "fraction negative")
            plots.plot_heatmap([[p["beta_mean_by_layer"][layer] for p in over_steps] for layer in range(d)], steps, out / f"betamean_heatmap_{tag}.png",
                               f"mean beta [layer, step], {o.cfg.model.residual} {d} layers", "mean beta")
    plots.plot_scatter(scatter, out / "negfrac_vs_erank.png", "per layer, after training: fraction of beta < 0 vs erank of the layer output",
                       "fraction of beta < 0 (attn+mlp mean)", "erank(X_{l+1}) / min(T, d)")
    rows = []
    for v in variants:
        for d in depths:
            mine = [r for r in runs if r["residual"] == v and r["n_layers"] == d]
            if not mine:
                continue
            row = {"variant": v, "depth": d, "seeds": len(mine)}
            for key in ("frac_negative_all", "frac_negative_shallow_third", "frac_negative_deep_third", "spearman_negfrac_depth", "spearman_negfrac_erank_out",
                        "spearman_negfrac_erank_change", "spearman_betamean_erank_out"):
                row[key], row[key + "_std"], _ = mean_std([r["final"][key] for r in mine])
            row["beta_min"] = min(min(b["min"] for b in r["sublayer_beta_final"].values()) for r in mine)
            row["beta_max"] = max(max(b["max"] for b in r["sublayer_beta_final"].values()) for r in mine)
            rows.append(row)
    md = f"# beta_distribution\n\n{sizes_line(exp)}; depths {depths}; seeds {seeds}. Beta on the probe batch at the last checkpoint; Spearman over layers.\n\n"
    md += markdown_table(["variant", "layers", "frac beta<0 (all)", "shallow third", "deep third", "rho(neg, depth)", "rho(neg, erank out)", "rho(neg, erank change)",
                          "rho(mean beta, erank out)", "beta min", "beta max"],
                         [[r["variant"], r["depth"], r["frac_negative_all"], r["frac_negative_shallow_third"], r["frac_negative_deep_third"], r["spearman_negfrac_depth"],
                           r["spearman_negfrac_erank_out"], r["spearman_negfrac_erank_change"], r["spearman_betamean_erank_out"], r["beta_min"], r["beta_max"]] for r in rows])
    md += "\n![scatter](negfrac_vs_erank.png)\n"
    results = {"table": rows, "runs": runs}
    write_results(exp, results, md)
    return results
