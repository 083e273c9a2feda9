"""One entry point for the evaluation protocol's runners.

    mgt-experiment NAME --preset configs/experiments/X.yaml [--out DIR] [--pool DIR] [--report-only] [key=value ...]
    mgt-experiment campaign --preset configs/experiments/campaign_cpu.yaml [--report-only]

NAME: rank_evolution | ablation | beta_distribution | depth_scaling | copy_task | edge_of_chaos;
`campaign` runs the steps its preset lists (experiment, preset, overrides), in order, each
resumable: rerun the same command to continue after an interruption.
`grid.key=value` overrides change the experiment's grid (e.g. grid.depths=[12,24]); any
other `section.key=value` is a training-config override applied to every run. Training
runs live in the pool (--pool, default from the preset) and are shared between
experiments; finished runs are skipped, interrupted ones resume. Writes results.json,
results.md and PNGs into --out.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import yaml

from megatron_mgt.config import ConfigError
from megatron_mgt.experiments import common
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


def run_campaign(preset: str, overrides=()) -> list[dict]:
    """Every step of a campaign preset, in order: {campaign: [{experiment, preset, overrides}]}
    (step presets relative to the campaign file); overrides after the preset apply to every step."""
    path = Path(preset)
    if not path.is_file():
        raise ConfigError(f"campaign preset not found: {path}")
    steps = (yaml.safe_load(path.read_text()) or {}).get("campaign")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{path}: needs a non-empty list under 'campaign:'")
    results = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or set(step) - {"experiment", "preset", "overrides"} or "experiment" not in step or "preset" not in step:
            raise ConfigError(f"{path}: campaign step {i} must be a mapping with experiment, preset and optional overrides, got {step!r}")
        print(f"mgt-experiment campaign: step {i + 1}/{len(steps)}: {step['experiment']} {step['preset']} {step.get('overrides', [])}", flush=True)
        results.append(run_experiment(step["experiment"], str(path.parent / step["preset"]), [*step.get("overrides", []), *overrides]))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mgt-experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=(*EXPERIMENTS, "campaign"))
    parser.add_argument("--preset", required=True, help="configs/experiments/*.yaml")
    parser.add_argument("--out", default=None, help="results directory (default: the preset's `out`)")
    parser.add_argument("--pool", default=None, help="directory of training runs (default: the preset's `pool`)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: tabulate the grid's finished runs (e.g. at a deadline)")
    parser.add_argument("overrides", nargs="*", help="grid.key=value or section.key=value")
    args = parser.parse_intermixed_args(argv)
    common.REPORT_ONLY = args.report_only
    try:
        if args.name == "campaign":
            run_campaign(args.preset, args.overrides)
        else:
            run_experiment(args.name, args.preset, args.overrides, out=args.out, pool=args.pool)
    except (ConfigError, FileNotFoundError) as err:
        print(f"mgt-experiment: error: {err}", file=sys.stderr)
        return 2
    print(f"mgt-experiment: wrote {args.out or 'the preset out dir'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
