"""Protocol item 2: the residual family at equal depth, width, tokens, data and seeds, and
the synergy of the two MGT mechanisms.

    mgt-experiment ablation --preset configs/experiments/ablation_cpu.yaml

grid: variants (list; `comparators` adds ddl_rank1 / mhc_nstream when registered), depth,
seeds, base (default preln). Synergy S = (L_base - L_mgt) / ((L_base - L_mhc) + (L_base -
L_ddl)) on held-out loss: per seed, and from the seed-mean losses; S > 1 superadditive.
"""

from __future__ import annotations

import math

from megatron_mgt import plots
from megatron_mgt.config import derive
from megatron_mgt.experiments.common import Experiment, run_grid, run_summary, train_curve, variants_for
from megatron_mgt.experiments.report import markdown_table, sizes_line, write_results
from megatron_mgt.experiments.stats import mean_std


def synergy(l_base: float, l_mgt: float, l_mhc: float, l_ddl: float) -> float:
    """S = (L_base - L_mgt) / ((L_base - L_mhc) + (L_base - L_ddl)); NaN if the denominator is 0
    or a loss is missing. S > 1: the full block gains more than the two mechanisms' gains added."""
    values = (l_base, l_mgt, l_mhc, l_ddl)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return math.nan
    den = (l_base - l_mhc) + (l_base - l_ddl)
    return (l_base - l_mgt) / den if den != 0 else math.nan


def run(exp: Experiment) -> dict:
    g = exp.grid
    variants = variants_for(g.get("variants", ["preln", "postln", "deepnorm", "mhc", "ddl", "mgt", "comparators"]))
    depth = int(g.get("depth", exp.base.model.n_layers))
    seeds = [int(s) for s in g.get("seeds", [exp.base.train.seed])]
    base = g.get("base", "preln")
    core = [v for v in (base, "mhc", "ddl", "mgt") if v in variants]  # the synergy runs first, every seed, then the rest
    order = [(s, v) for s in seeds for v in core] + [(s, v) for s in seeds for v in variants if v not in core]
    specs = [(derive(exp.base, {"model.residual": v, "model.n_layers": depth, "train.seed": s}), "") for s, v in order]
    outcomes = run_grid(specs, exp.pool, "ablation")
    runs = sorted((run_summary(o) for o in outcomes), key=lambda r: (variants.index(r["residual"]), r["seed"]))
    loss = {(r["residual"], r["seed"]): r["valid_loss"] for r in runs}

    table = []
    for v in variants:
        mine = [r for r in runs if r["residual"] == v]
        m, sd, n = mean_std([r["valid_loss"] for r in mine])
        e, esd, _ = mean_std([r["erank_final_layer"] for r in mine])
        table.append({"variant": v, "valid_loss": m, "valid_loss_std": sd, "per_seed": [r["valid_loss"] for r in mine], "erank_final": e, "erank_final_std": esd,
                      "finished": n, "diverged": sum(r["status"] == "diverged" for r in mine)})
    per_seed = {s: synergy(*(loss.get((v, s), math.nan) for v in (base, "mgt", "mhc", "ddl"))) for s in seeds}
    means = {row["variant"]: row["valid_loss"] for row in table}
    s_mean, s_sd, _ = mean_std(list(per_seed.values()))
    syn = {
        "formula": "S = (L_base - L_mgt) / ((L_base - L_mhc) + (L_base - L_ddl)), held-out loss",
        "base": base,
        "per_seed": per_seed,
        "mean_over_seeds": s_mean,
        "std_over_seeds": s_sd,
        "from_mean_losses": synergy(*(means.get(v, math.nan) for v in (base, "mgt", "mhc", "ddl"))),
        "gains_vs_base": {v: means.get(base, math.nan) - means.get(v, math.nan) for v in ("mhc", "ddl", "mgt")},
    }

    out = exp.out
    out.mkdir(parents=True, exist_ok=True)
    first = seeds[0]
    plots.plot_loss_curves({o.cfg.model.residual: train_curve(o.run_dir) for o in outcomes if o.cfg.train.seed == first},
                           out / "train_loss.png", f"training loss, {depth} layers, seed {first}")
    plots.plot_erank_vs_depth({r["residual"]: r["erank"] for r in runs if r["seed"] == first and r["erank"]},
                              out / "erank_by_layer.png", f"effective rank by layer after training ({'centred' if exp.base.eval.center else 'uncentred'}), seed {first}")
    md = f"# ablation\n\n{sizes_line(exp)}; {depth} layers; seeds {seeds}.\n\n"
    md += markdown_table(["variant", "valid loss (mean)", "+- (seed std)", "per seed", "erank last", "diverged"],
                         [[r["variant"], r["valid_loss"], r["valid_loss_std"], ", ".join(f"{x:.3f}" for x in r["per_seed"]), r["erank_final"], r["diverged"]] for r in table])
    md += (f"\nSynergy ({syn['formula']}, base = {base}): per seed "
           + ", ".join(f"s{s}: {v:.2f}" for s, v in per_seed.items())
           + f"; mean {s_mean:.2f} +- {s_sd:.2f}; from seed-mean losses {syn['from_mean_losses']:.2f}. "
           + "Gains vs base: " + ", ".join(f"{k} {v:+.4f}" for k, v in syn["gains_vs_base"].items()) + " nats.\n")
    md += "\n![train loss](train_loss.png)\n![erank](erank_by_layer.png)\n"
    results = {"depth": depth, "seeds": seeds, "table": table, "synergy": syn, "runs": runs}
    write_results(exp, results, md)
    return results
