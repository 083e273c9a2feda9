"""Protocol item 3: per layer beta statistics after training, and the test of the
hypothesis that negative beta appears systematically in deep layers and goes with preserved
rank, on the tuned runs of the comparison (each arm at its own lr, experiments/arms.py).

    mgt-experiment beta_distribution --preset configs/experiments/beta_distribution_cpu_v512.yaml

grid: variants (those with a DDL controller: ddl, mgt), depths, seeds, tuning, and
`evolution` (default false: with true, beta over training from the kept checkpoints of the
first seed, eval/evolution.json, which trains archived runs again). Beta comes from the probe
batch of the run's final evaluation. Per run, over layers l: the fraction of negative beta
(attn and mlp sublayers averaged) in the shallowest and deepest third and its Spearman
correlations with (a) depth, (b) the effective rank of the layer's output X_{l+1}, (c) the
rank change erank(X_{l+1}) - erank(X_l). Over seeds, t intervals of each, and the preset's
decision rule on D_s = deep third - shallow third ("deeper" if the interval lies above 0).
"""

from __future__ import annotations

import math

from megatron_mgt import plots
from megatron_mgt.experiments.arms import tuned_runs, tuned_specs, tuning_settings
from megatron_mgt.experiments.common import Experiment, read_json, run_grid, variants_for
from megatron_mgt.experiments.report import ci_label, fmt_estimate, fmt_lr, markdown_table, sizes_line, write_results
from megatron_mgt.stats import decide, spearman, t_interval

STAT_KEYS = ("frac_negative_all", "frac_negative_shallow_third", "frac_negative_deep_third", "deep_minus_shallow", "spearman_negfrac_depth",
             "spearman_negfrac_erank_out", "spearman_negfrac_erank_change", "spearman_betamean_erank_out")
DEEPER = {"win": "deeper", "loss": "shallower", "undetermined": "undetermined"}  # decide() on -D: "win" = D's interval above 0


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
        "deep_minus_shallow": sum(neg[-third:]) / third - sum(neg[:third]) / third,
        "spearman_negfrac_depth": spearman(neg, list(range(n_layers))),
        "spearman_negfrac_erank_out": spearman(neg, out_rank),
        "spearman_negfrac_erank_change": spearman(neg, change),
        "spearman_betamean_erank_out": spearman(mean, out_rank),
    }


def run(exp: Experiment) -> dict:
    g = exp.grid
    arms = variants_for(g.get("variants", ["ddl", "mgt"]))
    depths = [int(d) for d in g.get("depths", [exp.base.model.n_layers])]
    seeds = [int(s) for s in g.get("seeds", [exp.base.train.seed])]
    tuning = tuning_settings(g)
    rule, level = exp.rule, exp.level
    out = exp.out
    out.mkdir(parents=True, exist_ok=True)
    runs, scatter, rows, sweeps = [], {}, [], {}
    for depth in depths:
        sweeps[depth], mine = tuned_runs(exp, arms, depth, seeds, tuning, f"beta_distribution L{depth}")
        for r in mine:
            if not (r["beta_by_sublayer"] and r["erank"]):
                continue  # diverged, or no controller
            r["final"] = beta_rank_stats({"sublayers": {k: {"beta": v} for k, v in r["beta_by_sublayer"].items()}, "erank": r["erank"]}, depth)
            runs.append(r)
            scatter[f"{r['arm']} L{depth} s{r['seed']}"] = list(zip(r["final"]["frac_negative_by_layer"], r["erank"][1:], strict=True))
            if r["seed"] == seeds[0]:
                plots.plot_beta_by_layer(list(r["beta_by_sublayer"].values()), out / f"beta_by_sublayer_{r['arm']}_L{depth}.png",
                                         f"beta per sublayer after training (attn, mlp alternating), {r['arm']} {depth} layers, lr {r['lr']:g}")
        for arm in arms:
            theirs = [r for r in runs if r["arm"] == arm and r["depth"] == depth]
            if not theirs:
                continue
            row = {"variant": arm, "depth": depth, "lr": sweeps[depth][arm]["lr"], "seeds": len(theirs),
                   **{key: t_interval([r["final"][key] for r in theirs], level) for key in STAT_KEYS}}
            d = row["deep_minus_shallow"]
            row["decision_deeper"] = DEEPER[decide({"ci": [-d["ci"][1], -d["ci"][0]]}, rule)["decision"]]
            row["beta_min"] = min(min(b["min"] for b in r["beta_by_sublayer"].values()) for r in theirs)
            row["beta_max"] = max(max(b["max"] for b in r["beta_by_sublayer"].values()) for r in theirs)
            rows.append(row)
    evolution = plot_evolution(exp, arms, depths, seeds[0], sweeps) if g.get("evolution", False) else {}
    plots.plot_scatter(scatter, out / "negfrac_vs_erank.png", "per layer, after training: fraction of beta < 0 vs erank of the layer output",
                       "fraction of beta < 0 (attn+mlp mean)", "erank(X_{l+1}) / min(T, d)")
    md = (f"# beta_distribution\n\n{sizes_line(exp)}; depths {depths}; seeds {seeds}; every arm at its own tuned lr. Beta on the probe batch "
          f"after training; Spearman over layers; mean over seeds with the t interval ({ci_label(level)}). Decision on D = deep third - shallow "
          f"third of the fraction of beta < 0 under {rule}: 'deeper' if its interval lies above 0.\n\n")
    md += markdown_table(["variant", "layers", "lr", "frac beta<0 (all)", "shallow third", "deep third", "D = deep - shallow (CI)", "decision",
                          "rho(neg, depth)", "rho(neg, erank out) (CI)", "rho(neg, erank change) (CI)", "rho(mean beta, erank out)", "beta min", "beta max", "seeds"],
                         [[r["variant"], r["depth"], fmt_lr(r["lr"]), r["frac_negative_all"]["mean"], r["frac_negative_shallow_third"]["mean"],
                           r["frac_negative_deep_third"]["mean"], fmt_estimate(r["deep_minus_shallow"]), r["decision_deeper"], r["spearman_negfrac_depth"]["mean"],
                           fmt_estimate(r["spearman_negfrac_erank_out"]), fmt_estimate(r["spearman_negfrac_erank_change"]), r["spearman_betamean_erank_out"]["mean"],
                           r["beta_min"], r["beta_max"], r["seeds"]] for r in rows])
    md += "\n![scatter](negfrac_vs_erank.png)\n" + "".join(f"![beta {r['variant']} L{r['depth']}](beta_by_sublayer_{r['variant']}_L{r['depth']}.png)\n" for r in rows)
    results = {"table": rows, "runs": runs, "evolution": evolution, "lr_sweeps": {str(d): s for d, s in sweeps.items()},
               "decision_rule": {"rule": rule, "level": level, "on": "D = frac beta<0, deep third - shallow third"}}
    write_results(exp, results, md)
    return results


def plot_evolution(exp: Experiment, arms, depths, seed: int, sweeps) -> dict:
    """Heatmaps of the fraction of negative and the mean beta [layer, step] from the kept
    checkpoints of the first seed's tuned run (eval/evolution.json); returns {run: per-step stats}."""
    specs = [spec for d in depths for spec in tuned_specs(exp.base, sweeps[d], arms, d, [seed])]
    evolution = {}
    for o in run_grid(specs, exp.pool, "beta_distribution evolution", evolution=True):
        d = o.cfg.model.n_layers
        points = read_json(o.run_dir / "eval" / "evolution.json")["points"]
        over_steps = [beta_rank_stats(p, d) for p in points]
        evolution[o.name] = [{"step": p["step"], **stats} for p, stats in zip(points, over_steps, strict=True)]
        steps = [p["step"] for p in points]
        tag = f"{o.cfg.model.residual}_L{d}"
        plots.plot_heatmap([[p["frac_negative_by_layer"][layer] for p in over_steps] for layer in range(d)], steps, exp.out / f"negfrac_heatmap_{tag}.png",
                           f"fraction of beta < 0 [layer, step], {o.cfg.model.residual} {d} layers", "fraction negative")
        plots.plot_heatmap([[p["beta_mean_by_layer"][layer] for p in over_steps] for layer in range(d)], steps, exp.out / f"betamean_heatmap_{tag}.png",
                           f"mean beta [layer, step], {o.cfg.model.residual} {d} layers", "mean beta")
    return evolution

