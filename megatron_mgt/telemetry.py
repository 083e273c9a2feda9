"""Live geometry telemetry during training (spec 3.1 and 3.3 "during training").

Every `log.geometry_every` steps (0: off), and once at step 0 of a fresh run, one forward
pass on a fixed probe batch - the first `eval.geometry_batch` held-out windows, the same
for the whole run and for `mgt-eval` - gives, through `geometry.geometry_snapshot` (the one
place these numbers are computed), a metrics record (and, with wandb on, the layer x step heat maps so far as wandb images)

    {"kind": "geometry", "step", "centered", "seconds",
     "erank", "token_cosine", "relative_residual":        [n_layers + 1] (embedding, block 1..L)
     "sublayers", "update_ratio", "beta_{mean,std,q05,q50,q95,frac_negative}",
     "erase_mean" (alpha * beta):                           [2 n_layers] (attn, mlp, ...)}

beta and erase entries are null for rules without beta; mhc_nstream adds "h_res_diag" and
"h_res_col_err" [2 n_layers] (mean diagonal of H_res, worst column-sum error after Sinkhorn). MetricsLog sends each list entry to wandb as
its own scalar (`geometry/erank/003`). The probe forward runs without autocast and does not
touch any RNG, so a run with telemetry trains exactly like one without.

Engines: `engine.geometry_snapshot(probe, center, spectrum)`. Single, ZeRO and FSDP run the whole
`Transformer` on every rank (FSDP / ZeRO-3 gather parameters collectively) and split the
per-layer metrics (a float64 spectrum per layer, the cost at depth: `eval.spectrum` = svd,
the reference, or gram, the d x d Gram matrix's eigenvalues, for d in the thousands on GPUs) over the ranks: rank r measures
layers l = r mod world_size; the DeepSpeed pipeline sends the probe through its schedule
(`eval_batch`), each stage's data-parallel replicas split its layers, and the parts are
gathered into one record. The main rank logs.

    python -m megatron_mgt.telemetry RUN_DIR     # erank / cosine heat maps from metrics.jsonl
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import torch

from megatron_mgt import plots
from megatron_mgt.config import Config
from megatron_mgt.data.loader import check_token_ids, eval_batches
from megatron_mgt.geometry import LAYER_METRICS
from megatron_mgt.metrics import read_metrics

COST_BUDGET = 0.05  # the share of wall time a run may spend in geometry snapshots before it is told

BETA_KEYS = ("mean", "std", "q05", "q50", "q95", "frac_negative")  # of geometry.beta_stats, per sublayer


def snapshot_record(snap: dict, step: int) -> dict:
    """A flat 'geometry' record (lists per layer / sublayer) from geometry.geometry_snapshot."""
    subs = snap["sublayers"]
    beta = {name: s.get("beta") for name, s in subs.items()}
    return {
        "kind": "geometry",
        "step": step,
        "centered": snap["centered"],
        **{key: snap[key] for key in LAYER_METRICS},
        "sublayers": list(subs),
        "update_ratio": [s["update_ratio"] for s in subs.values()],
        **{f"beta_{key}": [b[key] if b else None for b in beta.values()] for key in BETA_KEYS},
        "erase_mean": [s["erase"]["mean"] if "erase" in s else None for s in subs.values()],
        **{key: [s.get(key) for s in subs.values()] for key in ("h_res_diag", "h_res_col_err") if any(key in s for s in subs.values())},
    }


class GeometryTelemetry:
    """Call `at(step)` after every optimizer step (and at step 0 of a fresh run)."""

    def __init__(self, cfg: Config, engine, log):
        self.every, self.center, self.log, self.engine = cfg.log.geometry_every, cfg.eval.center, log, engine
        self.spectrum = cfg.eval.spectrum
        self.probe: torch.Tensor | None = None
        self._last_end: float | None = None  # when the previous snapshot ended (its cost against the steps between)
        self._warned = False
        if not self.every:
            return
        if not cfg.data.valid_prefix:
            message = "geometry telemetry disabled: no data.valid_prefix to take the probe batch from"
            if engine.is_main:
                warnings.warn(message, stacklevel=2)
            log.log({"kind": "event", "step": 0, "event": "telemetry_disabled", "reason": message})
            self.every = 0
            return
        inputs, _ = next(iter(eval_batches(cfg.data.valid_prefix, cfg.data.seq_len, cfg.eval.geometry_batch, 1)))
        check_token_ids(inputs, cfg.model.vocab_size, cfg.data.valid_prefix)  # before any forward
        self.probe = inputs.to(engine.device)

    def at(self, step: int) -> dict | None:
        if not self.every or step % self.every:
            return None
        t0 = time.perf_counter()
        record = snapshot_record(self.engine.geometry_snapshot(self.probe, self.center, self.spectrum), step)
        record["seconds"] = time.perf_counter() - t0
        self.log.log(record)
        if self.log.wandb is not None:  # the layer x step heat maps so far, as wandb images
            run_dir = self.log.path.parent
            maps = write_heatmaps(self.log.path, run_dir / "eval", run_dir.name)
            self.log.log_images(step, {f"geometry/{p.stem}": p for p in maps})
        self._check_cost(step, t0, time.perf_counter())
        return record

    def _check_cost(self, step: int, started: float, ended: float) -> None:
        """Once per run: an event (and a warning) when telemetry (snapshot + heat maps, S
        seconds) takes more than B = COST_BUDGET of the wall time since the previous one
        ended (W seconds of training in between), f = S / (S + W) > B, with the cadence that
        brings it under B: geometry_every' = ceil(geometry_every * S (1 - B) / (B W))."""
        previous, self._last_end = self._last_end, ended
        if previous is None or self._warned:
            return
        cost, between = ended - started, max(started - previous, 1e-9)
        fraction = cost / (cost + between)
        if fraction <= COST_BUDGET:
            return
        self._warned = True
        fits = math.ceil(self.every * cost * (1 - COST_BUDGET) / (COST_BUDGET * between))
        message = (f"geometry telemetry takes {fraction:.0%} of the training time ({cost:.2f} s every {self.every} steps, "
                   f"eval.spectrum={self.spectrum}); log.geometry_every={fits} keeps it under {COST_BUDGET:.0%}")
        if self.engine.is_main:
            warnings.warn(message, stacklevel=3)  # at the trainer's call of at()
        self.log.log({"kind": "event", "step": step, "event": "telemetry_costly", "fraction": fraction,
                      "seconds": cost, "training_seconds": between, "suggested_geometry_every": fits})


def latest_per_step(records: list[dict]) -> list[dict]:
    """One record per step (the last written: a resumed run may repeat steps), by step."""
    return [r for _, r in sorted({r["step"]: r for r in records}.items())]


def write_heatmaps(metrics_path: Path, out_dir: Path, name: str = "") -> list[Path]:
    """layer x step heat maps of erank and token cosine from the 'geometry' records of a
    metrics file; nothing (an empty list) when it has none."""
    records = latest_per_step(read_metrics(metrics_path, "geometry")) if Path(metrics_path).is_file() else []
    if not records:
        return []
    steps = [r["step"] for r in records]
    centred = "centred" if records[-1]["centered"] else "uncentred"
    written = []
    for key, label in (("erank", f"effective rank / min(T, d) ({centred})"), ("token_cosine", "mean pairwise token cosine")):
        matrix = [[r[key][layer] for r in records] for layer in range(len(records[-1][key]))]
        path = Path(out_dir) / f"{key}_heatmap.png"
        plots.plot_heatmap(matrix, steps, path, f"{key} by layer over training{', ' + name if name else ''}", label)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    run_dir = Path(args[0])
    written = write_heatmaps(run_dir / "metrics.jsonl", run_dir / "eval")
    print("\n".join(map(str, written)) or f"{run_dir}/metrics.jsonl: no geometry records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
