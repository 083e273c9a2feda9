"""Results of a protocol runner: results.json + results.md in the experiment's out dir,
markdown tables, the one-line description of the run sizes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from megatron_mgt.experiments.common import Experiment, config_key, write_json
from megatron_mgt.fileio import write_text_atomic


def fmt(value, digits: int = 3) -> str:
    """A table cell: '-' for a missing (None or NaN) value."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def fmt_ci(ci, signed: bool = True, n: int | None = None) -> str:
    """'[lo, hi]' of a confidence interval; 'n/a (<2 seeds)' where it is undefined (fewer than 2
    values), '-' where there is no value at all (n == 0)."""
    if not ci or n == 0:
        return "-"
    if not all(math.isfinite(v) for v in ci):
        return "n/a (<2 seeds)"
    sign = "+" if signed else ""
    return f"[{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]"


def ci_label(level: float) -> str:
    """The name of an interval at this confidence level: 0.95 -> '95% CI', 0.975 -> '97.5% CI'."""
    return f"{round(level * 100, 6):g}% CI"


def fmt_estimate(t: dict | None) -> str:
    """'mean [lo, hi]' of a {mean, ci} record (signed); '-' without a finite mean."""
    return f"{t['mean']:+.3f} {fmt_ci(t['ci'])}" if t and math.isfinite(t["mean"]) else "-"


def fmt_lr(lr: float | None) -> str:
    """A learning rate as swept, unrounded (1.5e-3 reads 0.0015, 1.875e-4 0.0001875; never a rounded 0.002)."""
    return "-" if lr is None else f"{lr:g}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(exp: Experiment, results: dict, markdown: str) -> None:
    """results.json (with the training config and grid) and results.md into exp.out."""
    exp.out.mkdir(parents=True, exist_ok=True)
    results = {
        "experiment": exp.name,
        "grid": exp.grid,
        "centered": exp.base.eval.center,
        "base_config": config_key(exp.base),
        "pool": str(exp.pool),
        **results,
    }
    write_json(exp.out / "results.json", results)
    write_text_atomic(exp.out / "results.md", markdown)  # several runners may report into one out dir


def sizes_line(exp: Experiment, seq_len: int | None = None) -> str:
    c = exp.base
    seq_len = seq_len or c.data.seq_len
    tokens = c.train.max_steps * c.train.micro_batch_size * c.train.grad_accum_steps * seq_len  # seq_len may differ from the data's (copy task)
    return (
        f"d_model={c.model.d_model}, heads={c.model.n_heads}, seq_len={seq_len}, batch={c.train.micro_batch_size}, "
        f"steps={c.train.max_steps} ({tokens} tokens/run), lr={c.train.lr}, erank {'centred' if c.eval.center else 'uncentred'}, "
        f"data={c.data.train_prefix}"
    )


