"""Cost of stability monitoring (`stability.*`) per training step.

Per shape, on one single-engine model (fp32, the current device), interleaved step by step:
a training step with the update norm off, the same with it on; per step also the time of
the monitor's spike test and bookkeeping (check + accept). It prints the median step time,
the median extra time of the update norm (on - off, and adamw_update_sq_norm timed alone),
the monitor's time, and their ratios to the step.

Shapes: the quickstart (configs/quickstart.yaml: d 128, 6 layers, vocab 8192, 16 x 128
tokens, mgt) and the same at 48 layers. Data: a synthetic Zipf shard in a temp dir.

    python bench/bench_stability.py                    # both shapes
    python bench/bench_stability.py --shapes depth48 --steps 30
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: megatron_mgt and bench.*

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from bench.bench_telemetry import SHAPES, write_shards  # noqa: E402
from megatron_mgt.config import load_config  # noqa: E402
from megatron_mgt.data.loader import TokenBatchLoader  # noqa: E402
from megatron_mgt.engine.optim import adamw_update_sq_norm, scheduled_lrs  # noqa: E402
from megatron_mgt.engine.single import SingleEngine  # noqa: E402
from megatron_mgt.stability import StabilityMonitor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def measure(shards: tuple[str, str], layers: int, steps: int) -> dict:
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"data.train_prefix={shards[0]}", f"model.n_layers={layers}", f"train.max_steps={10 * steps}"])
    engine = SingleEngine(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    loader = TokenBatchLoader(shards[0], cfg.data.seq_len, cfg.train.micro_batch_size, 0)
    monitor = StabilityMonitor(cfg.stability)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    times = {"off": [], "on": [], "norm_alone": [], "monitor": []}
    for i in range(2 * steps + 4):
        mode = "on" if i % 2 else "off"
        cfg.stability.update_norm = mode == "on"
        batch = [loader.next_batch()]
        sync()
        t0 = time.perf_counter()
        out = engine.train_step(batch)
        sync()
        t1 = time.perf_counter()
        adamw_update_sq_norm(engine.optimizer, scheduled_lrs(engine.scheduler)).item()
        t2 = time.perf_counter()
        values = {"loss": out.loss, "grad_norm": out.grad_norm, "update_norm": out.update_norm}
        monitor.accept({k: v for k, v in values.items() if k not in {a.metric for a in monitor.check(values)}})
        t3 = time.perf_counter()
        if i >= 4:  # warm-up steps are not timed
            times[mode].append(t1 - t0)
            times["norm_alone"].append(t2 - t1)
            times["monitor"].append(t3 - t2)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "layers": layers,
        "steps_per_mode": steps,
        "median_step_s_update_norm_off": med["off"],
        "median_step_s_update_norm_on": med["on"],
        "update_norm_alone_s": med["norm_alone"],
        "monitor_s": med["monitor"],
        "update_norm_over_step": med["norm_alone"] / med["off"],
        "on_over_off_minus_1": med["on"] / med["off"] - 1,
        "monitor_over_step": med["monitor"] / med["off"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode and shape")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp), 8192)
        for shape in args.shapes:
            r = measure(shards, SHAPES[shape], args.steps)
            print(
                f"{shape} ({r['layers']} layers): step {r['median_step_s_update_norm_off'] * 1e3:.1f} ms; update norm alone "
                f"{r['update_norm_alone_s'] * 1e3:.2f} ms = {r['update_norm_over_step']:.2%} of a step (on/off - 1: "
                f"{r['on_over_off_minus_1']:+.2%}); monitor {r['monitor_s'] * 1e6:.0f} us = {r['monitor_over_step']:.3%}"
            )
            print(json.dumps({"shape": shape, **r}))


if __name__ == "__main__":
    main()
