"""One entry point for the evaluation protocol's runners.

    mgt-experiment NAME --preset configs/experiments/X.yaml [--out DIR] [--pool DIR] [--report-only] [key=value ...]
    mgt-experiment campaign --preset configs/experiments/campaign_cpu.yaml [--report-only | --status [--workers N] | --deadline +150]

NAME: rank_evolution | ablation | beta_distribution | depth_scaling | copy_task | edge_of_chaos;
`campaign` runs the steps its preset lists (experiment, preset, overrides), in order, each
resumable: rerun the same command to continue after an interruption.
`grid.key=value` overrides change the experiment's grid (e.g. grid.depths=[12,24]); any
other `section.key=value` is a training-config override applied to every run. Training
runs live in the pool (--pool, default from the preset) and are shared between
experiments; finished runs are skipped, interrupted ones resume. Writes results.json,
results.md and PNGs into --out. `--status` trains and writes nothing: it lists the runs the
grid (or every campaign step) still needs, which are running, and an estimate of the time
left (experiments/status.py). `--deadline` (+MINUTES, +HOURSh, HH:MM, or an ISO date-time)
sizes a chunk to a session: a run starts only if its estimate (the same one) ends by then;
the rest is left for the next chunk and the reports are written as with --report-only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import sys
import tempfile
import warnings
from pathlib import Path

import yaml

from megatron_mgt.config import ConfigError
from megatron_mgt.experiments import common, status
from megatron_mgt.experiments.arms import arms_for, tuning_settings
from megatron_mgt.experiments.common import load_experiment

EXPERIMENTS = ("rank_evolution", "ablation", "beta_distribution", "depth_scaling", "copy_task", "edge_of_chaos")


def run_experiment(name: str, preset: str, overrides=(), out=None, pool=None) -> dict:
    """Load the preset, run the grid, write the results; returns the results dict."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment '{name}' (one of {list(EXPERIMENTS)})")
    exp = load_experiment(name, preset, overrides, out=out, pool=pool)
    common.ARCHIVE = exp.archive
    module = importlib.import_module(f"megatron_mgt.experiments.{name}")
    return module.run(exp)


def campaign_steps(preset: str) -> list[dict]:
    """The validated steps of a campaign preset: [{experiment, preset (relative to the campaign file), overrides}]."""
    path = Path(preset)
    if not path.is_file():
        raise ConfigError(f"campaign preset not found: {path}")
    steps = (yaml.safe_load(path.read_text()) or {}).get("campaign")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{path}: needs a non-empty list under 'campaign:'")
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or set(step) - {"experiment", "preset", "overrides"} or "experiment" not in step or "preset" not in step:
            raise ConfigError(f"{path}: campaign step {i} must be a mapping with experiment, preset and optional overrides, got {step!r}")
    return [{"experiment": s["experiment"], "preset": str(path.parent / s["preset"]), "overrides": list(s.get("overrides", []))} for s in steps]


def check_grid(exp) -> None:
    """The grid settings every runner shares, checked up front: the arms (`grid.variants`) and
    the lr sweep (`grid.tuning`); a ConfigError names the bad value."""
    if "variants" in exp.grid:
        arms_for(exp.grid["variants"])
    if "tuning" in exp.grid:
        tuning_settings(exp.grid)


def run_campaign(preset: str, overrides=()) -> list[dict]:
    """Every step of a campaign preset, in order: {campaign: [{experiment, preset, overrides}]}
    (step presets relative to the campaign file); overrides after the preset apply to every step."""
    steps = campaign_steps(preset)
    for i, step in enumerate(steps):  # every step's preset and overrides checked before the first run, not hours later
        if step["experiment"] not in EXPERIMENTS:
            raise ConfigError(f"{preset}: campaign step {i}: unknown experiment '{step['experiment']}' (one of {list(EXPERIMENTS)})")
        try:
            check_grid(load_experiment(step["experiment"], step["preset"], [*step["overrides"], *overrides]))
        except ConfigError as err:
            raise ConfigError(f"{preset}: campaign step {i}: {err}") from err
    results = []
    for i, step in enumerate(steps):
        print(f"mgt-experiment campaign: step {i + 1}/{len(steps)}: {step['experiment']} {step['preset']} {step['overrides']}", flush=True)
        results.append(run_experiment(step["experiment"], step["preset"], [*step["overrides"], *overrides]))
    return results


def grid_status(steps: list[dict], overrides=(), pool=None, workers: int = 1) -> str:
    """status.summary of the runs `steps` still need: each step walked in report-only mode,
    its reports written to a throwaway directory."""
    was, common.REPORT_ONLY, common.QUIET = (common.REPORT_ONLY, common.QUIET), True, True
    collected = []
    try:
        with tempfile.TemporaryDirectory(prefix="mgt-status-") as scratch, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the throwaway reports' plotting warnings are not the status
            for i, step in enumerate(steps):
                common.NOT_FINISHED.clear()
                common.OPEN_SWEEPS.clear()
                run_experiment(step["experiment"], step["preset"], [*step["overrides"], *overrides], out=Path(scratch) / str(i), pool=pool)
                collected.append((f"step {i + 1}/{len(steps)} {step['experiment']} {step['overrides']}", dict(common.NOT_FINISHED), list(common.OPEN_SWEEPS)))
    finally:
        common.REPORT_ONLY, common.QUIET = was
    exp = load_experiment(steps[0]["experiment"], steps[0]["preset"], [*steps[0]["overrides"], *overrides], pool=pool)
    return status.summary(collected, exp.pool, exp.archive, workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mgt-experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=(*EXPERIMENTS, "campaign"))
    parser.add_argument("--preset", required=True, help="configs/experiments/*.yaml")
    parser.add_argument("--out", default=None, help="results directory (default: the preset's `out`)")
    parser.add_argument("--pool", default=None, help="directory of training runs (default: the preset's `pool`)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: tabulate the grid's finished runs (e.g. at a deadline)")
    parser.add_argument("--status", action="store_true", help="train and write nothing: the runs still to train, which are running, and the time left")
    parser.add_argument("--workers", type=int, default=1, help="with --status: runners sharing the pool, for the time estimate")
    parser.add_argument("--deadline", default=None, help="start no run whose estimated end passes this time: +MINUTES, +HOURSh, HH:MM or YYYY-MM-DDTHH:MM")
    parser.add_argument("overrides", nargs="*", help="grid.key=value or section.key=value")
    args = parser.parse_intermixed_args(argv)
    common.REPORT_ONLY = args.report_only
    try:
        common.START_GATE = None
        if args.deadline is not None:
            deadline = status.parse_deadline(args.deadline)
            print(f"deadline {dt.datetime.fromtimestamp(deadline):%Y-%m-%d %H:%M} (local): a run starts only if its estimate ends by then (one without an estimate: only before then)", file=sys.stderr)
            common.START_GATE = status.deadline_gate(deadline)
        if args.status:
            steps = campaign_steps(args.preset) if args.name == "campaign" else [{"experiment": args.name, "preset": args.preset, "overrides": []}]
            print(grid_status(steps, args.overrides, pool=args.pool if args.name != "campaign" else None, workers=args.workers))
            return 0
        if args.name == "campaign":
            run_campaign(args.preset, args.overrides)
        else:
            run_experiment(args.name, args.preset, args.overrides, out=args.out, pool=args.pool)
    except (ConfigError, FileNotFoundError) as err:
        print(f"mgt-experiment: error: {err}", file=sys.stderr)
        return 2
    except common.RunStopped as err:  # a signal or exit_at_step: nothing lost, the same command resumes
        print(f"mgt-experiment: stopped: {err}", file=sys.stderr)
        return 130
    finally:
        common.START_GATE, common.REPORT_ONLY = None, False
    print(f"mgt-experiment: wrote {args.out or 'the preset out dir'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
