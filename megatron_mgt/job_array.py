"""A grid of training runs as a Slurm job array: one array index -> one run.

An array file (configs/wt103/array_*.yaml) is a small YAML mapping:

    name: wt103_gpu                          # runs/<name>/<run>, and the wandb group
    presets: {12: gpu_L12.yaml, 200: gpu_L200.yaml}   # depth -> preset, relative to the file
    variants: [mgt, preln]                   # model.residual
    seeds: [1, 2]                            # train.seed
    overrides: [train.max_steps=1000]        # optional, for every run

Runs are ordered variant-major, then depth, then seed; run i is named
`<variant>_L<depth>_s<seed>` and gets the overrides `model.residual`, `model.n_layers`,
`train.seed`, `train.run_dir`, `log.run_name` and `log.wandb_group`. Every run is validated
against the config schema when the array is loaded, so a bad grid fails before submission.

    python -m megatron_mgt.job_array ARRAY.yaml --list          # index, run, preset
    python -m megatron_mgt.job_array ARRAY.yaml --count
    python -m megatron_mgt.job_array ARRAY.yaml --index 3 --shell   # what slurm/wt103_stability.sh evals
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_mgt.config import RESIDUALS, ConfigError, load_config

KEYS = {"name", "presets", "variants", "seeds", "overrides", "runs_root"}


@dataclass(frozen=True)
class ArrayRun:
    index: int
    name: str
    preset: Path
    overrides: tuple[str, ...]
    run_dir: str


def load_array(path: str | Path) -> list[ArrayRun]:
    """Every run of an array file, in array-index order; a ConfigError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job array file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict) or not {"name", "presets", "variants"} <= set(spec):
        raise ConfigError(f"{path}: a job array needs 'name', 'presets' and 'variants' (optional: 'seeds', 'overrides', 'runs_root')")
    unknown = set(spec) - KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown job array keys {sorted(unknown)} (allowed: {sorted(KEYS)})")
    presets = {int(depth): path.parent / preset for depth, preset in spec["presets"].items()}
    bad = [v for v in spec["variants"] if v not in RESIDUALS]
    if bad:
        raise ConfigError(f"{path}: variants {bad} are not residual rules {list(RESIDUALS)}")
    seeds = spec.get("seeds") or [1]
    common = tuple(spec.get("overrides") or ())
    root = f"{spec.get('runs_root', 'runs')}/{spec['name']}"
    runs = []
    for variant in spec["variants"]:
        for depth, preset in presets.items():
            for seed in seeds:
                name = f"{variant}_L{depth}_s{seed}"
                run_dir = f"{root}/{name}"
                own = (
                    f"model.residual={variant}",
                    f"model.n_layers={depth}",
                    f"train.seed={seed}",
                    f"train.run_dir={run_dir}",
                    f"log.run_name={name}",
                    f"log.wandb_group={spec['name']}",
                )
                runs.append(ArrayRun(len(runs), name, preset, common + own, run_dir))
    for run in runs:
        try:
            load_config(run.preset, run.overrides)
        except ConfigError as err:
            raise ConfigError(f"{path}: run {run.index} ({run.name}): {err}") from err
    return runs


def shell_assignments(run: ArrayRun) -> str:
    """Variables for `eval` in a batch script (the trainer's overrides, shell-quoted)."""
    values = {
        "MGT_RUN_NAME": run.name,
        "MGT_PRESET": str(run.preset),
        "MGT_RUN_DIR": run.run_dir,
        "MGT_RUN_OVERRIDES": " ".join(run.overrides),
    }
    return "\n".join(f"{key}={shlex.quote(value)}" for key, value in values.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_mgt.job_array", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("array", type=Path)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="print index, run name and preset of every run")
    group.add_argument("--count", action="store_true", help="print the number of runs (array indices 0 .. count-1)")
    group.add_argument("--index", type=int, help="the run of one array index")
    parser.add_argument("--shell", action="store_true", help="with --index: shell assignments for eval")
    args = parser.parse_args(argv)
    try:
        runs = load_array(args.array)
        if args.index is not None and not 0 <= args.index < len(runs):
            raise ConfigError(f"{args.array}: array index {args.index} is outside 0..{len(runs) - 1} ({len(runs)} runs)")
    except ConfigError as err:
        print(f"job_array: error: {err}", file=sys.stderr)
        return 2
    if args.count:
        print(len(runs))
    elif args.list:
        for run in runs:
            print(f"{run.index}\t{run.name}\t{run.preset}")
    else:
        run = runs[args.index]
        print(shell_assignments(run) if args.shell else f"{run.name}\t{run.preset}\t{' '.join(run.overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
