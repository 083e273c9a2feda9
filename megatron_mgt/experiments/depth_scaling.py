"""Protocol item 4: held-out loss and last-layer rank against depth, every arm at its own
tuned learning rate, seed-paired against pre-LN.

    mgt-experiment depth_scaling --preset configs/experiments/depth_scaling_cpu.yaml

grid: variants (arms: residual rules, `comparators`, `preln_matched`, `embed_only`),
depths, seeds, tuning (experiments/arms.py), baseline (default preln). The preset's
`decision` (written before anything runs) is applied to every paired difference.

Per depth, in order: the lr sweep of every arm at the first seed (a point at an edge is
extended), then the other seeds at each arm's chosen lr. Results per (arm, depth): the
held-out loss on every valid token (mean, seed t CI), its seed-paired difference against
the baseline arm with a t CI and the decision, the last layer's collapse-robust ranks, and
a "no context learned" label when it does not beat the Kneser-Ney bigram.
"""

from __future__ import annotations

from megatron_mgt import plots
from megatron_mgt.experiments.arms import arms_for, baselines_for, compare_arms, interaction_of, tuned_runs, tuning_settings
from megatron_mgt.experiments.common import Experiment
from megatron_mgt.experiments.report import ci_label, fmt_ci, fmt_estimate, fmt_lr, markdown_table, sizes_line, write_results
from megatron_mgt.geometry import RANK_REL_TOL
from megatron_mgt.stats import decide


def run(exp: Experiment) -> dict:
    g = exp.grid
    arms = arms_for(g.get("variants", ["preln", "postln", "deepnorm", "mgt"]))
    depths = [int(d) for d in g.get("depths", [12, 24, 48, 100, 200])]
    seeds = [int(s) for s in g.get("seeds", [exp.base.train.seed])]
    baseline_arm = g.get("baseline", "preln")
    tuning = tuning_settings(g)
    rule, level = exp.rule, exp.level
    baselines = baselines_for(exp.base)
    sweeps, runs, table = {}, [], []
    for depth in depths:  # depth-major: an interrupted campaign has complete depths
        sweeps[depth], mine = tuned_runs(exp, arms, depth, seeds, tuning, f"depth_scaling L{depth}")
        runs += mine
        table += compare_arms(mine, arms, depth, baseline_arm, baselines, rule, level, sweeps[depth])
    write_plots(exp, arms, depths, table, sweeps, runs, baselines, baseline_arm, level)
    # prediction 3 at every depth where the 2 x 2 arms ran (the declared ablation is its own experiment)
    interactions = {str(d): i for d in depths if (i := interaction_of([r for r in table if r["depth"] == d], rule, level)) is not None}
    results = {"decision_rule": {"rule": rule, "rule_text": decide({"ci": [0, 0]}, rule)["rule_text"], "level": level, "baseline": baseline_arm},
               "baselines": baselines, "tuning": tuning, "lr_sweeps": {str(d): s for d, s in sweeps.items()}, "table": table,
               "interaction_by_depth": interactions, "runs": runs}
    write_results(exp, results, report_markdown(exp, seeds, baseline_arm, baselines, table, interactions, level, sweeps))
    return results


def report_markdown(exp: Experiment, seeds, baseline_arm: str, baselines: dict, table: list[dict], interactions: dict, level: float, sweeps: dict) -> str:
    md = f"# depth_scaling\n\n{sizes_line(exp)}; seeds {seeds}; every arm at its own tuned lr.\n\n"
    md += (f"Baselines on every valid token: unigram {baselines['unigram']:.3f}, Kneser-Ney bigram {baselines['bigram_kn']:.3f} nats/token. "
           f"Decision rule (declared in the preset): {exp.rule} at level {exp.level:g}.\n\n")
    rows = []
    for r in table:
        d = r.get("diff_vs_baseline")
        rows.append([r["arm"], r["depth"], fmt_lr(r["lr"]), r["valid_loss"], fmt_ci(r["valid_loss_ci"], signed=False, n=r["seeds"]),
                     d["mean"] if d else None, fmt_ci(d["ci"], n=d["n"]) if d else "-", r.get("decision", "-") if r["seeds"] else "-",
                     r["erank_tol_last"], r["ln_erank_tol_last"], r["collapsed_last"], r["seeds"], r["diverged"], r["label"]])
    md += markdown_table(["arm", "layers", "lr", "valid loss", ci_label(level), f"- {baseline_arm}", "paired CI", "decision",
                          "erank_tol last", "erank_tol LN last", "collapsed", "seeds", "diverged", "note"], rows)
    md += (f"\n\nLast-layer rank after training ({exp.base.eval.rank_windows} probe windows; erank_tol: singular values below {RANK_REL_TOL:g} s_max dropped)"
           f", seed-paired against {baseline_arm}:\n\n")
    rank_rows = []
    for r in table:
        cells = [r["arm"], r["depth"], r["erank_tol_last"], r["ln_erank_tol_last"], r["stable_rank_last"], r["token_cosine_last"]]
        for key in ("erank_tol_last", "ln_erank_tol_last"):
            cells.append(fmt_estimate(r.get(f"{key}_diff_vs_baseline")))
        rank_rows.append(cells)
    md += markdown_table(["arm", "layers", "erank_tol", "erank_tol of LN(X)", "stable rank", "token cosine", f"erank_tol - {baseline_arm} (CI)",
                          f"LN erank_tol - {baseline_arm} (CI)"], rank_rows)
    for depth, inter in interactions.items():
        terms = ", ".join(f"s{s}: {v:+.3f}" for s, v in inter["terms"].items())
        md += (f"\nInteraction at {depth} layers, {inter['formula']}: per seed {terms or '-'}; "
               + (f"mean {inter['mean']:+.3f}, {ci_label(level)} {fmt_ci(inter['ci'], n=inter['n'])}: {inter['verdict']}.\n" if inter["n"] else "no seed has all four arms.\n"))
    md += sweep_markdown(sweeps)
    md += "\n![loss](loss_vs_depth.png)\n![difference](diff_vs_depth.png)\n![lr sweeps](lr_sweeps.png)\n![loss vs tokens](loss_vs_tokens.png)\n![loss vs flops](loss_vs_flops.png)\n![loss vs time](loss_vs_seconds.png)\n"
    md += "".join(f"![rank L{d}](erank_tol_by_layer_L{d}.png)\n![LN rank L{d}](ln_erank_tol_by_layer_L{d}.png)\n" for d in sorted({r["depth"] for r in table}))
    return md


def sweep_markdown(sweeps: dict) -> str:
    """Every lr sweep point (final valid loss at the first seed), the chosen lr, and whether the
    sweep is complete (an open sweep has a point, or an edge extension, still to train)."""
    rows, seen = [], set()
    for by_arm in sweeps.values():
        for arm, record in by_arm.items():
            if (arm, record["sweep_depth"]) in seen:  # a banded depth repeats its donor's sweep
                continue
            seen.add((arm, record["sweep_depth"]))
            points = ", ".join(f"{fmt_lr(lr)}: {loss:.3f}" for lr, loss in record["results"])
            rows.append([arm, record["sweep_depth"], points or "-", fmt_lr(record["lr"]), "complete" if record.get("complete") else "open: points left to train"])
    return "\n\nlr sweeps (first seed; lr: final valid loss):\n\n" + markdown_table(["arm", "swept at layers", "points", "chosen lr", "sweep"], rows)


def _half_width(ci) -> float:
    return (ci[1] - ci[0]) / 2


def lr_sweep_panels(sweeps: dict, arms: list[str], depths: list[int]) -> tuple[dict, dict]:
    """plots.plot_lr_sweep's panels and chosen lrs: one panel per sweep depth (a banded depth
    uses another depth's sweep, tuning.bands), titled with the depths that use it when those
    differ, e.g. '48 layers (lrs used at 48, 96)'."""
    used_at: dict[int, list[int]] = {}
    for d in depths:
        used_at.setdefault(int(sweeps[d][arms[0]]["sweep_depth"]), []).append(d)  # a band is per depth, the same for every arm
    panels, chosen = {}, {}
    for sweep_depth, users in used_at.items():
        key = f"{sweep_depth} layers" + (f" (lrs used at {', '.join(map(str, users))})" if users != [sweep_depth] else "")
        panels[key] = {a: {lr: loss for lr, loss in sweeps[users[0]][a]["results"]} for a in arms}
        chosen[key] = {a: sweeps[users[0]][a]["lr"] for a in arms if sweeps[users[0]][a]["lr"]}
    return panels, chosen


def write_plots(exp, arms, depths, table, sweeps, runs, baselines, baseline_arm: str, level: float) -> None:
    out = exp.out
    out.mkdir(parents=True, exist_ok=True)
    series = {a: [(r["depth"], r["valid_loss"], _half_width(r["valid_loss_ci"])) for r in table if r["arm"] == a] for a in arms}
    series["bigram (KN)"] = [(d, baselines["bigram_kn"], 0.0) for d in depths]
    plots.plot_series_vs_x(series, out / "loss_vs_depth.png", f"held-out loss vs depth (tuned lr, seed {ci_label(level)})", "layers", "valid loss (nats/token)", logx=True, xticks=depths)
    # prediction 2 across depth: the seed-paired difference against the baseline (2+ seeds), 0 = no difference
    diffs = {a: [(r["depth"], r["diff_vs_baseline"]["mean"], _half_width(r["diff_vs_baseline"]["ci"])) for r in table
                 if r["arm"] == a and r.get("diff_vs_baseline") and r["diff_vs_baseline"]["n"] >= 2] for a in arms if a != baseline_arm}
    diffs[f"{baseline_arm} (0)"] = [(d, 0.0, 0.0) for d in depths]
    plots.plot_series_vs_x(diffs, out / "diff_vs_depth.png", f"valid loss - {baseline_arm}, seed-paired (t {ci_label(level)})", "layers", f"loss - {baseline_arm} (nats/token)", logx=True, xticks=depths)
    plots.plot_lr_sweep(*lr_sweep_panels(sweeps, arms, depths), out / "lr_sweeps.png", "lr sweeps")
    first = [r for r in runs if r["seed"] == runs[0]["seed"]] if runs else []
    for depth in depths:
        for metric in ("erank_tol", "ln_erank_tol"):
            mine = [r for r in first if r["depth"] == depth and r["rank_by_layer"].get(metric)]
            if not mine:
                continue
            curves = {r["arm"]: r["rank_by_layer"][metric] for r in mine}
            curves["(init, preln)"] = next((r["rank_by_layer_init"][metric] for r in mine if r["arm"] == "preln"), [])
            ref = mine[0]["gaussian_reference"]
            curves[f"Gaussian {ref['T']}x{ref['d']}"] = [ref[metric]] * max(len(c) for c in curves.values())
            plots.plot_erank_vs_depth(curves, out / f"{metric}_by_layer_L{depth}.png", f"{metric} by layer after training, {depth} layers (first seed)")
    first = [r for r in first if r["valid_curve"]]
    for x, label in (("tokens", "training tokens"), ("flops", "training FLOPs"), ("seconds", "training wall seconds")):
        panels = {f"{d} layers": {r["arm"]: [(p[x], p["loss"], 0.0) for p in r["valid_curve"] if p.get(x)] for r in first if r["depth"] == d}
                  for d in depths if any(r["depth"] == d for r in first)}
        plots.plot_series_panels(panels, out / f"loss_vs_{x}.png", f"valid loss vs {label} (first seed)", label, "valid loss (nats/token)", logx=True)
