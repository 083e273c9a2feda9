"""Compare training runs side by side: one table and PNG plots.

    mgt-compare RUN_DIR... [--out DIR] [--loss X]

Per run (from RUN/config.yaml, metrics.jsonl and, when mgt-eval ran, eval/eval.json):

    final / best valid ppl    per token, from the trainer's periodic validation
    word ppl                  valid and test per word, from `mgt-eval eval.full_split=true`
    spikes                    anomaly records (megatron_mgt/stability.py), one per step and metric
    steps / time to loss X    first step (and train_seconds) where the smoothed training loss
                              (EMA, weight 0.1) is <= X; X defaults to the largest final smoothed
                              loss among the runs, so every run reaches it
    erank last                normalised effective rank of the last layer, last geometry record
                              (live telemetry), else eval.json
    neg beta deep             fraction of beta < 0 over the deepest third of the sublayers

A run rolled back repeats steps in metrics.jsonl (a resume moves the records of the steps it
repeats to metrics.superseded.jsonl); the last record of a step wins. A bad line in a metrics
file is an error naming the file and line; a torn last line is skipped with a warning.
Writes OUT/compare.md, OUT/compare.json, OUT/loss_curves.png (training loss, spikes marked x,
validation dashed), OUT/grad_norm.png and OUT/erank_heatmap_<run>.png (layer x step, one
colour scale for all runs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

from megatron_mgt import plots
from megatron_mgt.data.indexed import IndexedDataset
from megatron_mgt.experiments.report import markdown_table
from megatron_mgt.fileio import write_text_atomic
from megatron_mgt.metrics import read_metrics
from megatron_mgt.telemetry import latest_per_step

EMA_WEIGHT = 0.1


def ema(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """s_0 = v_0, s_t = (1 - w) s_{t-1} + w v_t (non-finite values are passed over)."""
    out, s = [], None
    for v in values:
        if math.isfinite(v):
            s = v if s is None else (1 - weight) * s + weight * v
        out.append(s if s is not None else math.nan)
    return out


def load_run(run_dir: Path) -> dict:
    """The records and config of one run directory, steps deduplicated."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    records = read_metrics(metrics)
    by_kind = {kind: latest_per_step([r for r in records if r.get("kind") == kind]) for kind in ("train", "valid", "geometry")}
    anomalies = {(r["step"], r["metric"]): r for r in records if r.get("kind") == "anomaly"}
    eval_file = run_dir / "eval" / "eval.json"
    return {
        "name": run_dir.name,
        "dir": str(run_dir),
        "config": config,
        **by_kind,
        "anomalies": sorted(anomalies.values(), key=lambda r: (r["step"], r["metric"])),
        "eval": json.loads(eval_file.read_text()) if eval_file.is_file() else None,
    }


def deep_third_mean(values: list) -> float | None:
    """Mean over the last third of the entries that are not None."""
    tail = values[len(values) - max(1, len(values) // 3) :]
    tail = [v for v in tail if v is not None]
    return sum(tail) / len(tail) if tail else None


EPOCH_POINTS = (1, 2, 4, 8, 16, 32)  # fixed epoch counts at which arms are compared


def steps_per_epoch(config: dict) -> float | None:
    """Optimizer steps per pass over the train split: train tokens / global tokens per step
    (None when the shard is not on this machine). Data-parallel size is not in the config:
    the presets' micro_batch_size x grad_accum_steps x seq_len is per data-parallel rank, so
    runs compare exactly only at equal dp; `parallel.data_parallel` is used when recorded."""
    data, train = config.get("data", {}), config.get("train", {})
    prefix = data.get("train_prefix")
    try:
        tokens = IndexedDataset(prefix).num_tokens if prefix else 0
    except (OSError, ValueError):
        return None
    per_step = train.get("micro_batch_size", 0) * train.get("grad_accum_steps", 1) * data.get("seq_len", 0) * config.get("parallel", {}).get("data_parallel", 1)
    return tokens / per_step if tokens and per_step else None


def at_epochs(valid: list[dict], per_epoch: float | None) -> dict:
    """Valid perplexity at fixed epoch counts (the last evaluation at or before each), and
    the epoch of the best one: long runs overfit, so arms are compared at stated points."""
    if not valid or not per_epoch:
        return {}
    out = {}
    for epoch in EPOCH_POINTS:
        before = [r for r in valid if r["step"] <= epoch * per_epoch]
        if epoch * per_epoch <= valid[-1]["step"] and before:
            out[f"valid_ppl_epoch_{epoch}"] = math.exp(min(before[-1]["loss"], 50.0))
    best = min(valid, key=lambda r: r["loss"])
    out["best_valid_epoch"] = best["step"] / per_epoch
    return out


def summarise(run: dict, loss_target: float) -> dict:
    train, valid = run["train"], run["valid"]
    per_epoch = steps_per_epoch(run["config"])
    smooth = ema([r["loss"] for r in train])
    reached = next((i for i, s in enumerate(smooth) if s <= loss_target), None)
    model = run["config"].get("model", {})
    geometry = run["geometry"][-1] if run["geometry"] else None
    if geometry is None and run["eval"]:
        snap = run["eval"]["geometry"]
        geometry = {
            "erank": snap["erank"],
            "beta_frac_negative": [s["beta"]["frac_negative"] if "beta" in s else None for s in snap["sublayers"].values()],
        }
    splits = (run["eval"] or {}).get("splits", {})
    valid_ppl = [math.exp(min(r["loss"], 50.0)) for r in valid]
    return {
        "run": run["name"],
        "residual": model.get("residual"),
        "layers": model.get("n_layers"),
        "steps": train[-1]["step"] if train else 0,
        "final_valid_ppl": valid_ppl[-1] if valid_ppl else None,
        "best_valid_ppl": min(valid_ppl) if valid_ppl else None,
        "valid_word_ppl": splits.get("valid", {}).get("word_ppl"),
        "test_word_ppl": splits.get("test", {}).get("word_ppl"),
        "spikes": len(run["anomalies"]),
        "spikes_by_metric": {m: sum(a["metric"] == m for a in run["anomalies"]) for m in sorted({a["metric"] for a in run["anomalies"]})},
        "loss_target": loss_target,
        "steps_to_target": train[reached]["step"] if reached is not None else None,
        "seconds_to_target": train[reached].get("train_seconds") if reached is not None else None,
        "final_smoothed_loss": smooth[-1] if smooth else None,
        "erank_last": geometry["erank"][-1] if geometry else None,
        "neg_beta_deep": deep_third_mean(geometry.get("beta_frac_negative", [])) if geometry else None,
        "centered": run["geometry"][-1]["centered"] if run["geometry"] else (run["eval"] or {}).get("geometry", {}).get("centered"),
        "epochs": train[-1]["step"] / per_epoch if train and per_epoch else None,
        "steps_per_epoch": per_epoch,
        **at_epochs(valid, per_epoch),
    }


HEADER = [
    "run",
    "residual",
    "layers",
    "steps",
    "final valid ppl",
    "best valid ppl",
    "valid word ppl",
    "test word ppl",
    "spikes",
    "steps to loss X",
    "s to loss X",
    "erank last",
    "neg beta deep",
    "epochs",
    "best valid at epoch",
]
KEYS = [
    "run",
    "residual",
    "layers",
    "steps",
    "final_valid_ppl",
    "best_valid_ppl",
    "valid_word_ppl",
    "test_word_ppl",
    "spikes",
    "steps_to_target",
    "seconds_to_target",
    "erank_last",
    "neg_beta_deep",
    "epochs",
    "best_valid_epoch",
]


def compare(run_dirs: list[Path], out: Path, loss_target: float | None = None) -> dict:
    runs = [load_run(Path(d)) for d in run_dirs]
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        runs = [{**r, "name": str(Path(r["dir"]))} for r in runs]  # same leaf names: use the paths
    finals = [s[-1] for s in (ema([r["loss"] for r in run["train"]]) for run in runs) if s and math.isfinite(s[-1])]
    if loss_target is None:
        loss_target = max(finals) if finals else math.nan
    rows = [summarise(run, loss_target) for run in runs]
    out.mkdir(parents=True, exist_ok=True)
    result = {"loss_target": loss_target, "runs": rows}
    write_text_atomic(out / "compare.json", json.dumps(result, indent=2))
    centred = {r["centered"] for r in rows if r["centered"] is not None}
    note = f"Loss X = {loss_target:.4f} nats (smoothed training loss). erank is {'centred' if centred == {True} else 'uncentred' if centred == {False} else 'mixed centring'}.\n"
    table = markdown_table(HEADER, ([r.get(k) for k in KEYS] for r in rows))
    epochs = [e for e in EPOCH_POINTS if any(f"valid_ppl_epoch_{e}" in r for r in rows)]
    if epochs:
        table += "\nValid perplexity at fixed epoch counts (last evaluation at or before each):\n\n" + markdown_table(
            ["run", *(f"epoch {e}" for e in epochs)], ([r["run"], *(r.get(f"valid_ppl_epoch_{e}") for e in epochs)] for r in rows)
        )
    write_text_atomic(out / "compare.md", note + "\n" + table)
    write_plots(runs, out)
    return result


def write_plots(runs: list[dict], out: Path) -> None:
    curves, markers = {}, {}
    for run in runs:
        steps = [r["step"] for r in run["train"]]
        curves[run["name"]] = list(zip(steps, [r["loss"] for r in run["train"]], strict=True))
        if run["valid"]:
            curves[f"{run['name']} (valid)"] = [(r["step"], r["loss"]) for r in run["valid"]]
        loss_at = dict(curves[run["name"]])
        markers[run["name"]] = [
            (a["step"], loss_at.get(a["step"], a["value"] if a["metric"] == "loss" else math.nan)) for a in run["anomalies"]
        ]
    plots.plot_loss_curves(
        curves, out / "loss_curves.png", "loss (x: anomalies)", markers=markers, dashed=lambda name: name.endswith("(valid)")
    )
    by_epoch = {}
    for run in runs:
        per_epoch = steps_per_epoch(run["config"])
        if run["valid"] and per_epoch:
            by_epoch[run["name"]] = [(r["step"] / per_epoch, r["loss"]) for r in run["valid"]]
    if by_epoch:
        plots.plot_loss_curves(by_epoch, out / "valid_vs_epochs.png", "valid loss against epochs of the train split", xlabel="epochs")
    norms = {run["name"]: [(r["step"], r["grad_norm"]) for r in run["train"] if math.isfinite(r["grad_norm"])] for run in runs}
    grad_marks = {run["name"]: [(a["step"], a["value"]) for a in run["anomalies"] if a["metric"] == "grad_norm"] for run in runs}
    plots.plot_loss_curves(
        norms, out / "grad_norm.png", "gradient norm before clipping (x: spikes)", ylabel="grad norm", markers=grad_marks, logy=True
    )
    values = [v for run in runs for r in run["geometry"] for v in r["erank"] if v is not None]
    limits = (min(values), max(values)) if values else None  # one colour scale for every run
    for run in runs:
        if run["geometry"]:
            matrix = [[r["erank"][layer] for r in run["geometry"]] for layer in range(len(run["geometry"][-1]["erank"]))]
            safe = run["name"].replace("/", "_")
            steps = [r["step"] for r in run["geometry"]]
            title = f"effective rank by layer, {run['name']}"
            plots.plot_heatmap(matrix, steps, out / f"erank_heatmap_{safe}.png", title, "effective rank / min(T, d)", limits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mgt-compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="output directory (default %(default)s)")
    parser.add_argument(
        "--loss", type=float, default=None, help="loss X for 'steps/time to loss X' (default: the largest final smoothed loss)"
    )
    args = parser.parse_args(argv)
    try:
        result = compare(args.runs, args.out, args.loss)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"mgt-compare: error: {err}", file=sys.stderr)
        return 2
    print((args.out / "compare.md").read_text(), end="")
    maps = len(list(args.out.glob("erank_heatmap_*.png")))
    print(
        f"wrote {args.out}/compare.md, compare.json, loss_curves.png, grad_norm.png, {maps} erank heat map(s); loss X = {result['loss_target']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
