"""The arms of a fair comparison: each variant at its own tuned learning rate, a
parameter-matched pre-LN control, a 0-layer model, and the n-gram baselines.

An arm is a name: a residual rule (`preln`, `mgt`, ...), `preln_matched` (pre-LN with the
FFN widened so its parameter count equals `mgt`'s at the same depth and width) or
`embed_only` (0 blocks: embedding, final norm, head; what the model learns with no
mixing at all). `tuned_arm` runs the learning-rate sweep of experiments/lr_sweep.py for an
arm through the run pool, at the preset's `tuning` settings:

    tuning: {center: 3.0e-3, points: 4, factor: 2, max_points: 8, bands: {96: 48}}

`bands` maps a depth to the depth whose sweep it uses (a depth not listed is swept itself).
Sweep points are ordinary runs of the pool at the first seed, so the comparison run of the
chosen lr at that seed is the sweep's own run (one name, one hash).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import torch

from megatron_mgt.baselines import ngram_baselines
from megatron_mgt.config import Config, ConfigError, derive
from megatron_mgt.experiments import common, lr_sweep
from megatron_mgt.experiments.common import Experiment, RunOutcome, ensure_run, run_grid, run_summary, variants_for
from megatron_mgt.model import RESIDUAL_RULES, Transformer
from megatron_mgt.stats import decide, interaction, paired_difference, t_interval

SPECIAL_ARMS = ("preln_matched", "embed_only")
TUNING_DEFAULTS = {"center": 3.0e-3, "points": 4, "factor": 2.0, "max_points": 8, "bands": {}}


def param_count(cfg: Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg.model).parameters())


_MATCHED_D_FF: dict[str, int] = {}


def matched_d_ff(base: Config, target: str = "mgt") -> int:
    """The FFN width at which pre-LN has the parameter count of `target` (same depth and
    width): the smallest d_ff >= the default whose count reaches the target's. The count is
    affine in d_ff (3 d d_ff per SwiGLU layer), so two builds give the slope and the answer;
    a check on each side keeps "smallest" exact. Remembered per model config (a campaign
    asks for it once per preln_matched run config)."""
    key = json.dumps({"model": dataclasses.asdict(base.model), "target": target}, sort_keys=True, default=str)
    if key in _MATCHED_D_FF:
        return _MATCHED_D_FF[key]
    goal = param_count(derive(base, {"model.residual": target}))
    start = derive(base, {"model.residual": "preln"}).model.ffn_dim

    def count(d_ff: int) -> int:
        return param_count(derive(base, {"model.residual": "preln", "model.d_ff": d_ff}))

    at_start = count(start)
    slope = count(start + 1) - at_start
    if at_start < goal and slope <= 0:
        raise ValueError(f"preln_matched: pre-LN's parameter count does not grow with d_ff at n_layers={base.model.n_layers}; no width matches {target}")
    d_ff = start if at_start >= goal else start - (-(goal - at_start) // slope)
    while count(d_ff) < goal:
        d_ff += 1
    while d_ff > start and count(d_ff - 1) >= goal:
        d_ff -= 1
    _MATCHED_D_FF[key] = d_ff
    return d_ff


def arm_tag(arm: str) -> str:
    """The run-name tag of an arm: the special arms' names, '' for a residual rule."""
    return arm if arm in SPECIAL_ARMS else ""


def arm_config(base: Config, arm: str) -> Config:
    """`base` (depth, seed, lr already set) as arm `arm`."""
    if arm == "preln_matched":
        return derive(base, {"model.residual": "preln", "model.d_ff": matched_d_ff(base)})
    if arm == "embed_only":
        return derive(base, {"model.residual": "preln", "model.n_layers": 0})
    if arm not in RESIDUAL_RULES:
        raise ConfigError(f"unknown arm {arm!r}: a residual rule ({', '.join(RESIDUAL_RULES)}) or one of {SPECIAL_ARMS}")
    return derive(base, {"model.residual": arm})


def sweep_point(at_depth: Config, arm: str, lr: float) -> Config:
    """The run of one lr sweep point: `at_depth` (sweep depth and first seed set) as `arm` at `lr`."""
    return arm_config(derive(at_depth, {"train.lr": lr}), arm)


def tuning_settings(grid: Mapping) -> dict:
    """grid.tuning over TUNING_DEFAULTS, checked: known keys, a valid initial grid, max_points >= points."""
    settings = {**TUNING_DEFAULTS, **(grid.get("tuning") or {})}
    unknown = set(settings) - set(TUNING_DEFAULTS)
    if unknown:
        raise ConfigError(f"grid.tuning: unknown keys {sorted(unknown)} (allowed: {sorted(TUNING_DEFAULTS)})")
    try:
        lr_sweep.initial_grid(float(settings["center"]), int(settings["points"]), float(settings["factor"]))
        bands = {int(d): int(to) for d, to in dict(settings["bands"]).items()}
    except (TypeError, ValueError) as err:
        raise ConfigError(f"grid.tuning {dict(grid.get('tuning') or {})}: {err}") from None
    if int(settings["max_points"]) < int(settings["points"]):
        raise ConfigError(f"grid.tuning.max_points={settings['max_points']} is below points={settings['points']}")
    return {**settings, "bands": bands}


class _NotRun(Exception):
    """A sweep point left unfinished: report-only mode, or refused by `--deadline`."""


class SweepPointHeld(Exception):
    """A sweep point that another runner on the pool is training (tuned_arm with wait=False);
    `trained` says whether this call trained an earlier point of the sweep first."""

    def __init__(self, lr: float, trained: bool):
        super().__init__(lr)
        self.lr, self.trained = lr, trained


def tuned_arm(base: Config, arm: str, depth: int, pool, tuning: Mapping, report_only: bool = False, wait: bool = True) -> dict:
    """The lr sweep of `arm` at the sweep depth of `depth` (tuning['bands']) and the first
    seed of `base`: every point, the chosen lr and the rule (lr_sweep.sweep's record), and
    `complete`. A sweep with a point left unfinished (report-only mode, or past `--deadline`)
    chooses nothing (lr None, complete False) rather than choosing among the points that
    happen to be done. With
    `wait=False`, a point another runner holds raises SweepPointHeld instead of waiting."""
    sweep_depth = int(tuning["bands"].get(depth, depth))
    at_depth = derive(base, {"model.n_layers": sweep_depth})
    outcomes: dict[float, RunOutcome] = {}

    def loss_at(lr: float) -> float:
        outcome = ensure_run(sweep_point(at_depth, arm, lr), pool, tag=arm_tag(arm), report_only=report_only, wait=wait)
        if outcome is None:
            raise SweepPointHeld(lr, trained=any(o.trained_now for o in outcomes.values()))
        outcomes[lr] = outcome
        if outcome.status == "missing":
            common.NOT_FINISHED[outcome.name] = (arm, sweep_depth, outcome.cfg.train.max_steps)
            raise _NotRun(lr)
        return run_summary(outcomes[lr])["valid_loss"]

    center, points, factor, most = float(tuning["center"]), int(tuning["points"]), float(tuning["factor"]), int(tuning["max_points"])
    if report_only:  # `--status` lists every unfinished point of the initial grid, not just the first
        for lr in lr_sweep.initial_grid(center, points, factor):
            missing = ensure_run(sweep_point(at_depth, arm, lr), pool, tag=arm_tag(arm), report_only=True)
            if missing is not None and missing.status == "missing":
                common.NOT_FINISHED[missing.name] = (arm, sweep_depth, missing.cfg.train.max_steps)
    try:
        record = {**lr_sweep.sweep(loss_at, center, points, factor, most), "complete": True}
    except _NotRun:
        common.OPEN_SWEEPS.append(f"{arm}@{sweep_depth}")
        done = {lr: run_summary(o)["valid_loss"] for lr, o in outcomes.items() if o.status != "missing"}
        record = {"lr": None, "loss": None, "interior": False, "converged": False, "complete": False, "results": [[lr, done[lr]] for lr in sorted(done)],
                  "rule": lr_sweep.SELECTION_RULE, "center": center, "factor": factor, "max_points": most}
    record.update(arm=arm, depth=depth, sweep_depth=sweep_depth, runs={str(lr): o.name for lr, o in outcomes.items()})
    return record


def baselines_for(cfg: Config) -> dict:
    """Unigram and Kneser-Ney bigram of the training split, scored on every valid token."""
    return ngram_baselines(cfg.data.train_prefix, cfg.data.valid_prefix, cfg.model.vocab_size)


def context_label(loss: float, baselines: Mapping, per_seed: Mapping[int, float] | None = None) -> str:
    """'no context learned' for a held-out loss that does not beat the Kneser-Ney bigram. With
    `per_seed`, judged seed by seed (a non-finite loss is a diverged seed, named as such):
    every seed fails -> 'no context learned'; some fail ->
    which ('seed 2: no context learned'), so one collapsed seed is neither hidden inside a good
    mean nor made to stand for the seeds that learned."""
    bigram = baselines["bigram_kn"]
    if not per_seed:
        return "" if loss < bigram else "diverged" if not math.isfinite(loss) else "no context learned"
    diverged = sorted(s for s, v in per_seed.items() if not math.isfinite(v))
    failed = sorted(s for s, v in per_seed.items() if math.isfinite(v) and not v < bigram)
    if len(failed) == len(per_seed):
        return "no context learned"
    if len(diverged) == len(per_seed):
        return "diverged"
    notes = [f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}: {what}" for seeds, what in ((failed, "no context learned"), (diverged, "diverged")) if seeds]
    return "; ".join(notes)


def arms_for(requested) -> list[str]:
    """The requested arms in their order (`comparators` expanded in place by variants_for)."""
    return [arm for a in requested for arm in ([a] if a in SPECIAL_ARMS else variants_for([a]))]


def tuned_sweeps(exp: Experiment, arms: list[str], depth: int, seed: int, tuning: Mapping, desc: str) -> dict:
    """{arm: tuned_arm record}: the lr sweep of every arm at `seed` (at the sweep depth of
    `depth`), every arm's initial grid first so that runners sharing the pool split it. A grid
    point another runner holds is not waited for here: _extend_sweeps goes on to the arms whose
    grids are done (their edge extensions) and waits only when nothing else is left."""
    first = derive(exp.base, {"model.n_layers": depth, "train.seed": seed})
    if not common.REPORT_ONLY:
        grid = lr_sweep.initial_grid(float(tuning["center"]), int(tuning["points"]), float(tuning["factor"]))
        at_depth = derive(first, {"model.n_layers": int(tuning["bands"].get(depth, depth))})
        run_grid([(sweep_point(at_depth, arm, lr), arm_tag(arm)) for arm in arms for lr in grid], exp.pool, f"{desc} lr sweeps", wait_for_held=False)
    return _extend_sweeps(first, arms, depth, exp.pool, tuning)


def tuned_specs(base: Config, sweeps: Mapping, arms: list[str], depth: int, seeds: list[int], changes: Mapping | None = None) -> list[tuple[Config, str]]:
    """(config, tag) of every seed of every arm at its chosen lr (`changes` on top); arms
    whose sweep chose nothing (every point diverged, or still open) have none."""
    return [(arm_config(derive(base, {"model.n_layers": depth, "train.seed": seed, "train.lr": sweeps[arm]["lr"], **(changes or {})}), arm),
             arm_tag(arm)) for arm in arms if sweeps[arm]["lr"] is not None for seed in seeds]


def tuned_runs(exp: Experiment, arms: list[str], depth: int, seeds: list[int], tuning: Mapping, desc: str) -> tuple[dict, list[dict]]:
    """The lr sweep of every arm at the first seed, then every seed at each arm's chosen lr
    (the first seed's run is the sweep's own). Returns ({arm: sweep record}, run summaries
    with 'arm' and 'depth'); an arm whose every sweep point diverged has no runs."""
    sweeps = tuned_sweeps(exp, arms, depth, seeds[0], tuning, desc)
    specs = tuned_specs(exp.base, sweeps, arms, depth, seeds)
    runs = [{**run_summary(o), "arm": o.arm, "depth": depth} for o in run_grid(specs, exp.pool, desc)]
    return sweeps, runs


def _extend_sweeps(first: Config, arms: list[str], depth: int, pool, tuning: Mapping) -> dict:
    """{arm: tuned_arm record} for every arm. Edge extensions are sequential within an arm, so
    a runner that meets a point another runner is training goes on to the next arm's sweep
    instead of waiting; it waits (on the first unfinished arm) only after a round in which it
    neither finished a sweep nor trained a point."""
    sweeps: dict[str, dict] = {}
    pending = list(arms)
    while pending:
        progressed = False
        for arm in list(pending):
            try:
                sweeps[arm] = tuned_arm(first, arm, depth, pool, tuning, report_only=common.REPORT_ONLY, wait=False)
            except SweepPointHeld as held:
                progressed |= held.trained
                continue
            pending.remove(arm)
            progressed = True
        if pending and not progressed:
            sweeps[pending[0]] = tuned_arm(first, pending[0], depth, pool, tuning, report_only=common.REPORT_ONLY)
            pending.pop(0)
    return {arm: sweeps[arm] for arm in arms}


INTERACTION_FORMULA = "I_s = L_mgt - L_mhc - L_ddl + L_preln (I < 0: superadditive)"


def interaction_of(table: list[dict], rule: str, level: float) -> dict | None:
    """The 2 x 2 interaction (stats.interaction) of compare_arms rows of one depth, with its
    decision under `rule`; None unless preln, mhc, ddl and mgt are all in the table."""
    losses = {row["arm"]: row["per_seed"] for row in table}
    if not all(a in losses for a in ("mgt", "mhc", "ddl", "preln")):
        return None
    inter = {**interaction(*(losses[a] for a in ("mgt", "mhc", "ddl", "preln")), level=level), "formula": INTERACTION_FORMULA}
    inter.update(decide(inter, rule))  # on I, "win" (interval below 0) is superadditive, "loss" subadditive
    inter["verdict"] = {"win": "superadditive", "loss": "subadditive"}.get(inter["decision"], "undetermined")
    return inter


RANK_KEYS = ("erank_tol_last", "ln_erank_tol_last", "stable_rank_last", "token_cosine_last", "collapsed_last", "epochs", "distance_from_init")


def compare_arms(runs: list[dict], arms: list[str], depth: int, baseline_arm: str, baselines: Mapping, rule: str, level: float, sweeps: Mapping) -> list[dict]:
    """One row per arm (runs of one depth): the held-out loss over seeds with its t CI, the
    seed-paired difference against `baseline_arm` with its CI and decision under `rule`,
    seed means of the last layer's rank metrics, and the context label against the bigram."""
    by_arm = {arm: {r["seed"]: r for r in runs if r["arm"] == arm} for arm in arms}
    base_losses = {s: r["valid_loss"] for s, r in by_arm.get(baseline_arm, {}).items()}
    rows = []
    for arm in arms:
        mine = by_arm[arm]
        losses = {s: r["valid_loss"] for s, r in mine.items()}
        loss = t_interval(list(losses.values()), level)
        sweep = sweeps[arm]
        row = {"arm": arm, "depth": depth, "lr": sweep["lr"], "lr_interior": sweep["interior"],
               "valid_loss": loss["mean"], "valid_loss_ci": loss["ci"], "seeds": loss["n"], "per_seed": losses,
               "diverged": sum(r["status"] == "diverged" for r in mine.values()),
               "label": context_label(loss["mean"], baselines, losses) if losses else "no finished run"}
        for key in RANK_KEYS:
            row[key] = t_interval([float(r[key]) for r in mine.values() if r.get(key) is not None], level)["mean"]
        if arm != baseline_arm:
            diff = paired_difference(losses, base_losses, level)
            row["diff_vs_baseline"] = diff
            row["decision"] = decide(diff, rule)["decision"]
            for key in ("erank_tol_last", "ln_erank_tol_last"):  # seed-paired, as the loss (higher rank: diff > 0)
                row[f"{key}_diff_vs_baseline"] = paired_difference(*({s: r[key] for s, r in runs_of.items() if r.get(key) is not None}
                                                                     for runs_of in (mine, by_arm.get(baseline_arm, {}))), level)
        rows.append(row)
    return rows
