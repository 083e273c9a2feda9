"""Protocol item 1: the rank of the residual stream per layer, at init and over training,
each arm at its own tuned learning rate (the lr sweeps of experiments/arms.py, shared with
depth_scaling).

    mgt-experiment rank_evolution --preset configs/experiments/rank_evolution_cpu.yaml

grid: variants (arms), depths, seeds (default the base seed), tuning (as depth_scaling),
checkpoint_every (steps between kept checkpoints; default max_steps / 10). Each arm's tuned
run is trained again with a checkpoint every `checkpoint_every` steps, a run of its own in
the pool (the checkpoint cadence is part of its name); checkpoints change nothing it computes,
so its final held-out loss is reported beside its twin's in the comparison as a check. At init
and at every checkpoint the collapse-robust rank profile (geometry.rank_profile on
eval.rank_windows windows spread over the valid split: erank_tol of X and of LN(X), stable
rank, token cosine, the collapsed flag) is measured (eval/evolution.json, archived with the
run). Outputs: the last layer's erank_tol of X and of LN(X) against step per arm with the
Gaussian reference, erank_tol[layer, step] heat maps, and a table over seeds (t intervals).
"""

from __future__ import annotations

import math

from megatron_mgt import plots
from megatron_mgt.config import ConfigError
from megatron_mgt.experiments import common
from megatron_mgt.experiments.arms import arms_for, tuned_specs, tuned_sweeps, tuning_settings
from megatron_mgt.experiments.common import Experiment, read_json, run_grid, run_summary
from megatron_mgt.experiments.report import ci_label, fmt_estimate, fmt_lr, markdown_table, sizes_line, write_results
from megatron_mgt.geometry import RANK_REL_TOL
from megatron_mgt.stats import t_interval

METRICS = ("erank_tol", "ln_erank_tol")


def evolution_points(run_dir) -> list[dict]:
    """Per kept checkpoint (and init, step 0): step, held-out loss and the rank profile's
    per-layer means and collapsed flags (eval/evolution.json)."""
    points = read_json(run_dir / "eval" / "evolution.json")["points"]
    if any("rank_profile" not in p for p in points):
        raise ConfigError(f"{run_dir}/eval/evolution.json has no rank_profile (written before rank profiles were recorded): delete it to recompute")
    return [{"step": p["step"], "valid_loss": p["valid_loss"], "collapsed": p["rank_profile"]["collapsed"],
             **{k: v["mean"] for k, v in p["rank_profile"]["metrics"].items()}} for p in points]


def run(exp: Experiment) -> dict:
    g = exp.grid
    arms = arms_for(g.get("variants", ["preln", "postln", "deepnorm", "mhc", "ddl", "mgt"]))
    depths = [int(d) for d in g.get("depths", [exp.base.model.n_layers])]
    seeds = [int(s) for s in g.get("seeds", [exp.base.train.seed])]
    tuning = tuning_settings(g)
    level = exp.level
    steps = exp.base.train.max_steps
    every = int(g.get("checkpoint_every", max(1, steps // 10)))
    if not 0 < every <= steps:
        raise ConfigError(f"grid.checkpoint_every must be in 1..train.max_steps ({steps}), got {every}")
    if exp.base.eval.rank_windows < 2:
        raise ConfigError(f"rank_evolution needs eval.rank_windows >= 2 (the rank profile's windows), got {exp.base.eval.rank_windows}")
    cadence = {"train.save_every": every, "train.keep_checkpoints": steps // every + 1}
    runs, table, sweeps = [], [], {}
    for depth in depths:
        sweeps[depth] = tuned_sweeps(exp, arms, depth, seeds[0], tuning, f"rank_evolution L{depth}")
        twins = {(o.arm, o.cfg.train.seed): o for o in
                 (common.ensure_run(cfg, exp.pool, tag, report_only=True) for cfg, tag in tuned_specs(exp.base, sweeps[depth], arms, depth, seeds))}
        diverged = {}
        for o in run_grid(tuned_specs(exp.base, sweeps[depth], arms, depth, seeds, cadence), exp.pool, f"rank_evolution L{depth}", evolution=True):
            if o.status != "finished":  # its last checkpoint is not the end of training: left out of the table and plots, counted
                diverged[o.arm] = diverged.get(o.arm, 0) + 1
                continue
            twin = twins.get((o.arm, o.cfg.train.seed))
            runs.append({**run_summary(o), "arm": o.arm, "depth": depth, "evolution": evolution_points(o.run_dir),
                         "twin_valid_loss": run_summary(twin)["valid_loss"] if twin is not None and twin.status == "finished" else math.nan})
        for arm in arms:
            mine = [r for r in runs if r["arm"] == arm and r["depth"] == depth]
            if mine or diverged.get(arm):
                table.append({**summary_row(arm, depth, sweeps[depth][arm]["lr"], mine, level), "diverged": diverged.get(arm, 0)})
    reference = next((r["gaussian_reference"] for r in runs if r.get("gaussian_reference")), None)  # from the runs' final evaluation
    write_plots(exp, depths, seeds[0], runs, reference)
    md = report_markdown(exp, depths, seeds, every, table, reference)
    results = {"centered": exp.base.eval.center, "checkpoint_every": every, "gaussian_reference": reference, "table": table,
               "lr_sweeps": {str(d): s for d, s in sweeps.items()}, "runs": runs}
    write_results(exp, results, md)
    return results


def summary_row(arm: str, depth: int, lr: float, mine: list[dict], level: float) -> dict:
    """Over seeds (t intervals): the last layer's ranks at init, halfway and at the end, the
    lowest layer's erank_tol at the end, collapsed layers at the end, the held-out loss and
    its difference from the twin run's."""
    def over_seeds(fn) -> dict:
        return t_interval([fn(r) for r in mine], level)

    def at(r, fraction: float) -> dict:
        points = r["evolution"]
        target = fraction * points[-1]["step"]
        return min(points, key=lambda p: abs(p["step"] - target))

    return {
        "arm": arm, "depth": depth, "lr": lr, "seeds": len(mine),
        "erank_tol_last_init": over_seeds(lambda r: r["evolution"][0]["erank_tol"][-1]),
        "erank_tol_last_mid": over_seeds(lambda r: at(r, 0.5)["erank_tol"][-1]),
        "erank_tol_last_final": over_seeds(lambda r: r["evolution"][-1]["erank_tol"][-1]),
        "ln_erank_tol_last_final": over_seeds(lambda r: r["evolution"][-1]["ln_erank_tol"][-1]),
        "erank_tol_min_final": over_seeds(lambda r: min(r["evolution"][-1]["erank_tol"])),
        "token_cosine_last_final": over_seeds(lambda r: r["evolution"][-1]["token_cosine"][-1]),
        "collapsed_layers_final": over_seeds(lambda r: sum(r["evolution"][-1]["collapsed"])),
        "valid_loss": over_seeds(lambda r: r["valid_loss"]),
        "valid_loss_minus_twin": over_seeds(lambda r: r["valid_loss"] - r["twin_valid_loss"]),
    }


def write_plots(exp: Experiment, depths: list[int], seed: int, runs: list[dict], reference: dict) -> None:
    out = exp.out
    out.mkdir(parents=True, exist_ok=True)
    for depth in depths:
        first = [r for r in runs if r["depth"] == depth and r["seed"] == seed]
        if not first:
            continue
        for metric in METRICS:
            curves = {r["arm"]: [(p["step"], p[metric][-1], 0.0) for p in r["evolution"]] for r in first}
            last_step = max(p["step"] for r in first for p in r["evolution"])
            if reference:
                curves[f"Gaussian {reference['T']}x{reference['d']}"] = [(0, reference[metric], 0.0), (last_step, reference[metric], 0.0)]
            plots.plot_series_vs_x(curves, out / f"{metric}_last_vs_step_L{depth}.png", f"last layer's {metric} during training, {depth} layers (seed {seed})",
                                   "step", f"{metric} / min(T, d)")
            plots.plot_erank_vs_depth({**{f"{r['arm']} init": r["evolution"][0][metric] for r in first[:1]},
                                       **{r["arm"]: r["evolution"][-1][metric] for r in first}}, out / f"{metric}_by_layer_L{depth}.png",
                                      f"{metric} by layer after training, {depth} layers (seed {seed})")
        for r in first:
            steps = [p["step"] for p in r["evolution"]]
            matrix = [[p["erank_tol"][layer] for p in r["evolution"]] for layer in range(depth + 1)]
            plots.plot_heatmap(matrix, steps, out / f"heatmap_{r['arm']}_L{depth}.png", f"erank_tol[layer, step], {r['arm']} {depth} layers", "erank_tol / min(T, d)",
                               limits=(0.0, 1.0))


def report_markdown(exp: Experiment, depths, seeds, every: int, table: list[dict], reference: dict) -> str:
    md = (f"# rank_evolution\n\n{sizes_line(exp)}; depths {depths}; seeds {seeds}; every arm at its own tuned lr, a checkpoint every {every} steps. "
          f"Rank profile on {exp.base.eval.rank_windows} windows spread over the valid split; erank_tol drops singular values below {RANK_REL_TOL:g} s_max, "
          f"normalised by min(T, d)."
          + (f" Gaussian {reference['T']} x {reference['d']} reference: erank_tol {reference['erank_tol']:.3f}, of LN {reference['ln_erank_tol']:.3f}." if reference else "")
          + f" Mean over seeds with the t interval ({ci_label(exp.level)}).\n\n")
    md += markdown_table(["arm", "layers", "lr", "erank_tol last @ init", "@ half", "@ end (CI)", "LN erank_tol last @ end (CI)", "lowest layer @ end",
                          "token cos last @ end", "collapsed layers @ end", "valid loss", "- twin run", "seeds", "diverged"],
                         [[r["arm"], r["depth"], fmt_lr(r["lr"]), r["erank_tol_last_init"]["mean"], r["erank_tol_last_mid"]["mean"], fmt_estimate(r["erank_tol_last_final"]),
                           fmt_estimate(r["ln_erank_tol_last_final"]), r["erank_tol_min_final"]["mean"], r["token_cosine_last_final"]["mean"],
                           r["collapsed_layers_final"]["mean"], r["valid_loss"]["mean"], r["valid_loss_minus_twin"]["mean"], r["seeds"], r["diverged"]] for r in table])
    for d in depths:
        md += f"\n![last layer L{d}](erank_tol_last_vs_step_L{d}.png)\n![LN last layer L{d}](ln_erank_tol_last_vs_step_L{d}.png)\n![by layer L{d}](erank_tol_by_layer_L{d}.png)\n"
        md += "".join(f"![heatmap {r['arm']} L{d}](heatmap_{r['arm']}_L{d}.png)\n" for r in table if r["depth"] == d and r["seeds"])
    return md
