"""Overhead of live geometry telemetry (`log.geometry_every`) on training time.

The same short training (single engine, fp32, the current device) runs with telemetry
every K steps and without it, side by side: the two runs alternate, the order flipped
every repeat, so machine noise lands on both alike. Per shape it prints

- end to end: median wall time of `train()` with / without, and the ratio - 1, at K;
- per snapshot: the median seconds of one probe snapshot (the records' `seconds`) over the
  median seconds of one training step (from the runs without telemetry), and the overhead
  this implies at K and at K = 100: snapshot / (K x step).

Shapes: the quickstart (configs/quickstart.yaml: d 128, 6 layers, 4 heads, vocab 8192,
16 x 128 tokens, residual mgt) and the same at 48 layers. The data is a synthetic Zipf
token shard written to a temp dir (the cost does not depend on the text). Evaluation,
checkpoints (except the final one, paid by both), wandb and the progress bar are off.

    python bench/bench_telemetry.py                      # both shapes, defaults below
    python bench/bench_telemetry.py --shapes quickstart --steps 30 --every 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import megatron_mgt  # noqa: F401
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from megatron_mgt.config import load_config  # noqa: E402
from megatron_mgt.data.indexed import IndexedDatasetWriter  # noqa: E402
from megatron_mgt.metrics import read_metrics  # noqa: E402
from megatron_mgt.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"quickstart": 6, "depth48": 48}


def write_shards(root: Path, vocab: int) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    for name, docs in (("train", 400), ("valid", 20)):
        with IndexedDatasetWriter(root / name, np.uint16) as writer:
            for _ in range(docs):
                writer.add_document((rng.zipf(1.3, size=1000) % vocab).astype(np.uint16))
    return str(root / "train"), str(root / "valid")


def one_run(shards: tuple[str, str], run_dir: Path, layers: int, steps: int, every: int, residual: str) -> tuple[float, list[dict]]:
    overrides = [
        f"data.train_prefix={shards[0]}",
        f"data.valid_prefix={shards[1]}",
        f"model.n_layers={layers}",
        f"model.residual={residual}",
        f"train.max_steps={steps}",
        "train.eval_every=0",
        "train.save_every=0",
        "train.resume=none",
        f"train.run_dir={run_dir}",
        f"log.every={steps}",
        f"log.geometry_every={every}",
        "log.wandb=disabled",
        "log.progress=false",
    ]
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0, read_metrics(run_dir / "metrics.jsonl")


def bench_shape(name: str, shards, tmp: Path, steps: int, every: int, repeats: int, residual: str) -> dict:
    layers = SHAPES[name]
    walls: dict[str, list[float]] = {"with": [], "without": []}
    snapshot_s: list[float] = []
    step_s: list[float] = []
    for rep in range(repeats):
        order = ("with", "without") if rep % 2 == 0 else ("without", "with")
        for arm in order:
            run_dir = tmp / f"{name}_{arm}_{rep}"
            wall, records = one_run(shards, run_dir, layers, steps, every if arm == "with" else 0, residual)
            walls[arm].append(wall)
            snapshot_s += [r["seconds"] for r in records if r["kind"] == "geometry"]
            if arm == "without":  # one train record over all steps: tokens/s -> s/step
                rec = [r for r in records if r["kind"] == "train"][-1]
                step_s.append(16 * 128 / rec["tokens_per_s"])
            print(f"  {name} rep {rep} {arm:7s} {wall:7.2f} s", flush=True)
    w, wo = statistics.median(walls["with"]), statistics.median(walls["without"])
    snap, step = statistics.median(snapshot_s), statistics.median(step_s)
    return {
        "shape": name,
        "n_layers": layers,
        "residual": residual,
        "steps": steps,
        "every": every,
        "repeats": repeats,
        "wall_with_s": walls["with"],
        "wall_without_s": walls["without"],
        "end_to_end_overhead": w / wo - 1,
        "snapshot_s": snap,
        "step_s": step,
        "snapshot_overhead_at_every": snap / (every * step),
        "snapshot_overhead_at_100": snap / (100 * step),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="quickstart,depth48")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--residual", default="mgt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_telemetry_") as tmp:
        tmp = Path(tmp)
        shards = write_shards(tmp, 8192)
        for name in args.shapes.split(","):
            print(f"{name}: {SHAPES[name]} layers, {args.steps} steps, telemetry every {args.every}, {args.repeats} repeats", flush=True)
            results.append(bench_shape(name, shards, tmp, args.steps, args.every, args.repeats, args.residual))
    print(f"\nload average at the end: {os.getloadavg()}")
    print(
        f"{'shape':12s} {'wall with':>10s} {'wall w/o':>10s} {'end-to-end':>11s} {'snapshot s':>11s} {'step s':>8s} {'@K':>8s} {'@K=100':>8s}"
    )
    for r in results:
        print(
            f"{r['shape']:12s} {statistics.median(r['wall_with_s']):10.2f} {statistics.median(r['wall_without_s']):10.2f} "
            f"{r['end_to_end_overhead']:+11.2%} {r['snapshot_s']:11.3f} {r['step_s']:8.3f} "
            f"{r['snapshot_overhead_at_every']:8.2%} {r['snapshot_overhead_at_100']:8.2%}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
