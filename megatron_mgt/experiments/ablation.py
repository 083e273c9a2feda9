"""Protocol item 2: the residual family at equal depth, width, tokens, data and seeds, each
arm at its own tuned learning rate, and the interaction of the two MGT mechanisms.

    mgt-experiment ablation --preset configs/experiments/ablation_cpu.yaml

grid: variants (arms, experiments/arms.py), depth, seeds, baseline (default preln),
tuning. The 2 x 2 design {preln, mhc, ddl, mgt} gives, per seed s,

    I_s = L_mgt - L_mhc - L_ddl + L_preln     (held-out loss on every valid token)

I < 0: the two mechanisms together gain more than the sum of their separate gains
(superadditive); I > 0: less. The preset's `decision` rule is applied to the t interval of
I over seeds and to each arm's seed-paired difference against the baseline. (The ratio S
of the first report is not reported: its denominator, mhc's gain, is within noise.)
"""

from __future__ import annotations

from megatron_mgt import plots
from megatron_mgt.config import ConfigError
from megatron_mgt.experiments.arms import arms_for, baselines_for, compare_arms, interaction_of, tuned_runs, tuning_settings
from megatron_mgt.experiments.common import Experiment, record_dir, train_curve
from megatron_mgt.experiments.report import ci_label, fmt_ci, fmt_lr, markdown_table, sizes_line, write_results

CORE = ("preln", "mhc", "ddl", "mgt")


def run(exp: Experiment) -> dict:
    g = exp.grid
    arms = arms_for(g.get("variants", ["preln", "postln", "deepnorm", "mhc", "ddl", "mgt", "comparators"]))
    arms = [a for a in CORE if a in arms] + [a for a in arms if a not in CORE]  # the 2 x 2 first
    depth = int(g.get("depth", exp.base.model.n_layers))
    seeds = [int(s) for s in g.get("seeds", [exp.base.train.seed])]
    baseline_arm = g.get("baseline", "preln")
    rule, level = exp.rule, exp.level
    baselines = baselines_for(exp.base)
    sweeps, runs = tuned_runs(exp, arms, depth, seeds, tuning_settings(g), "ablation")
    table = compare_arms(runs, arms, depth, baseline_arm, baselines, rule, level, sweeps)
    inter = interaction_of(table, rule, level)
    if inter is None:
        raise ConfigError(f"ablation: grid.variants must include {list(CORE)}, got {arms}")

    out = exp.out
    out.mkdir(parents=True, exist_ok=True)
    first = [r for r in runs if r["seed"] == seeds[0]]
    plots.plot_loss_curves({r["arm"]: train_curve(record_dir(exp.pool, r["run"])) for r in first}, out / "train_loss.png", f"training loss, {depth} layers, seed {seeds[0]}")
    plots.plot_erank_vs_depth({r["arm"]: r["erank"] for r in first if r["erank"]}, out / "erank_by_layer.png", f"effective rank by layer after training, seed {seeds[0]}")
    md = f"# ablation\n\n{sizes_line(exp)}; {depth} layers; seeds {seeds}; every arm at its own tuned lr.\n\n"
    md += f"Baselines on every valid token: unigram {baselines['unigram']:.3f}, Kneser-Ney bigram {baselines['bigram_kn']:.3f} nats/token.\n\n"
    md += markdown_table(
        ["arm", "lr", "valid loss", ci_label(level), f"- {baseline_arm}", "paired CI", "decision", "erank_tol last", "collapsed", "seeds", "note"],
        [[r["arm"], fmt_lr(r["lr"]), r["valid_loss"], fmt_ci(r["valid_loss_ci"], signed=False), (r.get("diff_vs_baseline") or {}).get("mean"), fmt_ci((r.get("diff_vs_baseline") or {}).get("ci")),
          r.get("decision", "-"), r["erank_tol_last"], r["collapsed_last"], r["seeds"], r["label"]] for r in table],
    )
    md += (f"\nInteraction {inter['formula']}: per seed " + ", ".join(f"s{s}: {v:+.3f}" for s, v in inter["terms"].items())
           + f"; mean {inter['mean']:+.3f}, {ci_label(level)} {fmt_ci(inter['ci'])}: {inter['verdict']} under {rule}.\n")
    md += "\n![train loss](train_loss.png)\n![erank](erank_by_layer.png)\n"
    results = {"depth": depth, "seeds": seeds, "baselines": baselines, "lr_sweeps": sweeps, "table": table, "interaction": inter, "runs": runs,
               "decision_rule": {"rule": rule, "rule_text": inter["rule_text"], "level": level, "baseline": baseline_arm}}
    write_results(exp, results, md)
    return results

