"""Protocol item 1: effective rank against depth, at init and during/after training, per variant.

    mgt-experiment rank_evolution --preset configs/experiments/rank_evolution_cpu.yaml

grid: variants, depths, seeds. Every run keeps a checkpoint every train.save_every steps;
the geometry of each (and of the same-seed model at init) is measured on the fixed probe
batch (eval/evolution.json). erank is normalised by min(T, d); centred iff eval.center.
"""

from __future__ import annotations

from megatron_mgt import plots
from megatron_mgt.config import derive
from megatron_mgt.experiments.common import Experiment, run_grid, run_summary, variants_for
from megatron_mgt.experiments.report import markdown_table, sizes_line, write_results
from megatron_mgt.stats import mean_std


def _read_evolution(run_dir) -> dict:
    import json

    return json.loads((run_dir / "eval" / "evolution.json").read_text())


def run(exp: Experiment) -> dict:
    g = exp.grid
    variants = variants_for(g.get("variants", ["preln", "postln", "deepnorm", "mhc", "ddl", "mgt"]))
    depths = [int(d) for d in g.get("depths", [exp.base.model.n_layers])]
    seeds = [int(s) for s in g.get("seeds", [exp.base.train.seed])]
    specs = [(derive(exp.base, {"model.residual": v, "model.n_layers": d, "train.seed": s}), "") for d in depths for v in variants for s in seeds]
    outcomes = run_grid(specs, exp.pool, "rank_evolution", evolution=True)
    centred = "centred" if exp.base.eval.center else "uncentred"
    runs, table = [], []
    for o in outcomes:
        evo = _read_evolution(o.run_dir)
        summary = run_summary(o)
        summary["evolution"] = [{"step": p["step"], "valid_loss": p["valid_loss"], "erank": p["erank"], "token_cosine": p["token_cosine"],
                                 "relative_residual": p["relative_residual"]} for p in evo["points"]]
        runs.append(summary)
    out = exp.out
    out.mkdir(parents=True, exist_ok=True)
    for d in depths:
        for s in seeds[:1]:
            mine = [r for r in runs if r["n_layers"] == d and r["seed"] == s]
            plots.plot_erank_vs_depth({r["residual"]: r["evolution"][0]["erank"] for r in mine}, out / f"erank_init_L{d}.png", f"effective rank by layer at init ({centred}), {d} layers")
            plots.plot_erank_vs_depth({r["residual"]: r["evolution"][-1]["erank"] for r in mine}, out / f"erank_trained_L{d}.png",
                                      f"effective rank by layer after training ({centred}), {d} layers")
            plots.plot_series_vs_x({r["residual"]: [(p["step"], p["erank"][-1], 0.0) for p in r["evolution"]] for r in mine}, out / f"erank_last_vs_step_L{d}.png",
                                   f"last-layer effective rank during training ({centred}), {d} layers", "step", "erank / min(T, d)")
            for r in mine:
                steps = [p["step"] for p in r["evolution"]]
                matrix = [[p["erank"][layer] for p in r["evolution"]] for layer in range(d + 1)]
                plots.plot_heatmap(matrix, steps, out / f"heatmap_{r['residual']}_L{d}.png", f"erank[layer, step], {r['residual']} {d} layers", "erank / min(T, d)")
    for v in variants:
        for d in depths:
            mine = [r for r in runs if r["residual"] == v and r["n_layers"] == d]
            init, _, _ = mean_std([r["evolution"][0]["erank"][-1] for r in mine])
            final, final_sd, _ = mean_std([r["evolution"][-1]["erank"][-1] if r["status"] == "finished" else float("nan") for r in mine])
            lowest, _, _ = mean_std([min(r["evolution"][-1]["erank"]) for r in mine])
            cos, _, _ = mean_std([r["evolution"][-1]["token_cosine"][-1] for r in mine])
            rel, _, _ = mean_std([r["evolution"][-1]["relative_residual"][-1] for r in mine])
            loss, _, _ = mean_std([r["valid_loss"] for r in mine])
            row = {"variant": v, "depth": d, "erank_last_init": init, "erank_last_trained": final, "erank_last_trained_std": final_sd,
                   "erank_min_trained": lowest, "token_cosine_last_trained": cos, "relative_residual_last_trained": rel, "valid_loss": loss,
                   "erank_last_by_step": {step: mean_std([p["erank"][-1] for r in mine for p in r["evolution"] if p["step"] == step])[0]
                                          for step in sorted({p["step"] for r in mine for p in r["evolution"]})}}
            table.append(row)
    md = f"# rank_evolution\n\n{sizes_line(exp)}; depths {depths}; seeds {seeds}. Effective rank is {centred} (X - 1 xbar^T), normalised by min(T, d) = {min(exp.base.data.seq_len, exp.base.model.d_model)}.\n\n"
    steps = sorted({int(k) for row in table for k in row["erank_last_by_step"]})
    md += markdown_table(["variant", "layers", "valid loss", *[f"erank last @ {s}" for s in steps], "min over layers (trained)", "token cos last (trained)", "rel. residual last (trained)"],
                         [[r["variant"], r["depth"], r["valid_loss"], *[r["erank_last_by_step"].get(s, float("nan")) for s in steps], r["erank_min_trained"], r["token_cosine_last_trained"], r["relative_residual_last_trained"]] for r in table])
    md += "".join(f"\n![init](erank_init_L{d}.png)\n![trained](erank_trained_L{d}.png)\n![last vs step](erank_last_vs_step_L{d}.png)\n" for d in depths)
    results = {"centered": exp.base.eval.center, "table": table, "runs": runs}
    write_results(exp, results, md)
    return results
