"""Protocol item 7 and the knob sweep: MGT's open knobs (lam, eps, beta_init, alpha_init,
alpha_mode, beta_granularity, controller_input) against the two signal-propagation
exponents at init (Cowsik et al.) and the final loss.

    mgt-experiment edge_of_chaos --preset configs/experiments/edge_of_chaos_cpu.yaml

grid: variant (mgt), depth, seeds, sweep (a list of {knob: value} points, each trained;
the preset's base knobs are the reference point), init_grid ({beta_init: [...],
alpha_init: [...]}: exponents only, no training). Exponents come from
megatron_mgt.signal_prop when present (collapsed tokens rho = 0.99, unit variance), else
from geometry.angle_exponent / gradient_exponent directly.
"""

from __future__ import annotations

import itertools
import math

from megatron_mgt import plots
from megatron_mgt.config import Config, derive
from megatron_mgt.experiments.common import Experiment, run_grid, run_name, run_summary
from megatron_mgt.experiments.report import markdown_table, sizes_line, write_results
from megatron_mgt.signal_prop import signal_propagation
from megatron_mgt.stats import mean_std, pearson, spearman


def exponents_at_init(cfg: Config) -> dict:
    """{'angle_exponent', 'gradient_exponent'} of the model at init (seed train.seed), by signal_prop."""
    out = signal_propagation(cfg.model, seed=cfg.train.seed)
    return {"angle_exponent": out["angle_exponent"], "gradient_exponent": out["gradient_exponent"], "source": "signal_prop"}


def _tag(point: dict) -> str:
    return "-".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "reference"


def run(exp: Experiment) -> dict:
    g = exp.grid
    variant = g.get("variant", "mgt")
    depth = int(g.get("depth", exp.base.model.n_layers))
    seeds = [int(s) for s in g.get("seeds", [exp.base.train.seed])]
    sweep = [{}] + [{(k if "." in k else f"model.mgt.{k}"): v for k, v in p.items()} for p in g.get("sweep", [])]
    common = {"model.residual": variant, "model.n_layers": depth}
    specs, points = [], []
    for point in sweep:
        for s in seeds:
            cfg = derive(exp.base, {**common, **point, "train.seed": s})
            specs.append((cfg, "" if not point else "eoc-" + _tag(point)))
            points.append(point)
    outcomes = run_grid(specs, exp.pool, "edge_of_chaos")
    runs = []
    point_of = {run_name(cfg, tag): point for (cfg, tag), point in zip(specs, points, strict=True)}
    for o in outcomes:  # in report-only mode, unfinished points are missing
        point = point_of[o.name]
        summary = run_summary(o)
        summary.update(point=point, tag=_tag(point), knobs=dict(vars(o.cfg.model.mgt)), **exponents_at_init(o.cfg))
        runs.append(summary)
    rows = []
    for point in sweep:
        mine = [r for r in runs if r["point"] == point]
        loss, loss_sd, _ = mean_std([r["valid_loss"] for r in mine])
        rows.append({"point": _tag(point), "valid_loss": loss, "valid_loss_std": loss_sd, "angle_exponent": mean_std([r["angle_exponent"] for r in mine])[0],
                     "gradient_exponent": mean_std([r["gradient_exponent"] for r in mine])[0], "erank_final": mean_std([r["erank_final_layer"] for r in mine])[0],
                     "diverged": sum(r["status"] == "diverged" for r in mine)})
    # Exponents only, over a dense beta_init x alpha_init grid (no training).
    init_grid = g.get("init_grid", {})
    phase = []
    for beta, alpha in itertools.product(init_grid.get("beta_init", []), init_grid.get("alpha_init", [])):
        try:
            cfg = derive(exp.base, {**common, "model.mgt.beta_init": beta, "model.mgt.alpha_init": alpha, "train.seed": seeds[0]})
        except Exception:  # beta_init outside (eps - lam, eps + lam)
            continue
        phase.append({"beta_init": beta, "alpha_init": alpha, **exponents_at_init(cfg)})
    dist = [math.hypot(r["angle_exponent"], r["gradient_exponent"]) for r in rows]
    corr = {
        "spearman_loss_vs_abs_angle": spearman([abs(r["angle_exponent"]) for r in rows], [r["valid_loss"] for r in rows]),
        "spearman_loss_vs_abs_gradient": spearman([abs(r["gradient_exponent"]) for r in rows], [r["valid_loss"] for r in rows]),
        "spearman_loss_vs_distance_to_edge": spearman(dist, [r["valid_loss"] for r in rows]),
        "pearson_loss_vs_distance_to_edge": pearson(dist, [r["valid_loss"] for r in rows]),
    }
    finite = [r for r in rows if math.isfinite(r["valid_loss"])]
    best = min(finite, key=lambda r: r["valid_loss"]) if finite else None
    out = exp.out
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_scatter({"sweep": [(r["angle_exponent"], r["valid_loss"]) for r in finite]}, out / "loss_vs_angle_exponent.png",
                       f"final loss vs angle exponent at init, {variant} {depth} layers", "lambda_a (angle exponent)", "valid loss", labels={"sweep": [r["point"] for r in finite]})
    plots.plot_scatter({"sweep": [(r["gradient_exponent"], r["valid_loss"]) for r in finite]}, out / "loss_vs_gradient_exponent.png",
                       f"final loss vs gradient exponent at init, {variant} {depth} layers", "lambda_g (gradient exponent)", "valid loss", labels={"sweep": [r["point"] for r in finite]})
    if phase:
        plots.plot_scatter({"exponents at init": [(p["angle_exponent"], p["gradient_exponent"]) for p in phase]}, out / "phase_exponents.png",
                           f"exponents at init over beta_init x alpha_init, {variant} {depth} layers", "lambda_a", "lambda_g",
                           labels={"exponents at init": [f"b{p['beta_init']},a{p['alpha_init']}" for p in phase]})
    md = f"# edge_of_chaos\n\n{sizes_line(exp)}; {variant}, {depth} layers; seeds {seeds}. Reference knobs: {vars(exp.base.model.mgt)}.\n" \
         f"Exponents at init from {runs[0]['source'] if runs else '-'} (collapsed tokens rho = 0.99).\n\n"
    md += markdown_table(["knobs changed", "valid loss", "+-", "lambda_a", "lambda_g", "erank last", "diverged"],
                         [[r["point"], r["valid_loss"], r["valid_loss_std"], r["angle_exponent"], r["gradient_exponent"], r["erank_final"], r["diverged"]] for r in rows], digits=4)
    md += "\nRank correlations over the sweep: " + ", ".join(f"{k} = {v:.2f}" for k, v in corr.items()) + "\n"
    if best:
        md += f"\nLowest loss: {best['point']} ({best['valid_loss']:.4f}).\n"
    if phase:
        md += "\n## exponents at init, beta_init x alpha_init (no training)\n\n"
        md += markdown_table(["beta_init", "alpha_init", "lambda_a", "lambda_g"], [[p["beta_init"], p["alpha_init"], p["angle_exponent"], p["gradient_exponent"]] for p in phase], digits=4)
    md += "\n![angle](loss_vs_angle_exponent.png)\n![gradient](loss_vs_gradient_exponent.png)\n" + ("![phase](phase_exponents.png)\n" if phase else "")
    results = {"variant": variant, "depth": depth, "seeds": seeds, "table": rows, "correlations": corr, "best": best, "init_grid": phase, "runs": runs}
    write_results(exp, results, md)
    return results
