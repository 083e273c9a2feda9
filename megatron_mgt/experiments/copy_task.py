"""Protocol item 6: synthetic sequence copying, a probe of whether information survives depth.

    mgt-experiment copy_task --preset configs/experiments/copy_task_cpu.yaml

Each example is one document of seq_len = 2n + 2 tokens: n random symbols, a separator,
the same n symbols again, an end token. The shards are written with the real writer
(IndexedDatasetWriter) into POOL/copy_data_*; since the loader cuts windows of seq_len + 1
at stride seq_len, every window is exactly one example (plus the next one's first token).
The model trains on next-token loss over the whole window (the first half is
unpredictable by construction); we report accuracy on the copied half (targets at input
positions n .. 2n-1) and the fraction of examples copied exactly, on held-out examples.

grid: variants, depths, seeds, n (symbols to copy), symbols (alphabet size),
train_examples, valid_examples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megatron_mgt import plots
from megatron_mgt.checkpoint import find_checkpoint
from megatron_mgt.config import Config, derive
from megatron_mgt.data.indexed import IndexedDatasetWriter, bin_path, idx_path
from megatron_mgt.data.loader import eval_batches
from megatron_mgt.engine.dist import resolve_device
from megatron_mgt.evaluate import load_model
from megatron_mgt.experiments.common import Experiment, run_grid, run_summary, variants_for
from megatron_mgt.experiments.report import markdown_table, sizes_line, write_results
from megatron_mgt.stats import mean_std

PAD, SEP, END = 0, 1, 2  # symbols are 3 .. 3 + symbols - 1


def copy_examples(count: int, n: int, symbols: int, seed: int) -> np.ndarray:
    """[count, 2n + 2] uint16: x_1..x_n, SEP, x_1..x_n, END with x_i uniform over the symbols."""
    rng = np.random.default_rng(seed)
    x = rng.integers(3, 3 + symbols, size=(count, n), dtype=np.int64)
    sep = np.full((count, 1), SEP)
    end = np.full((count, 1), END)
    return np.concatenate([x, sep, x, end], axis=1).astype(np.uint16)


def write_copy_shards(root: Path, n: int, symbols: int, train_examples: int, valid_examples: int, seed: int = 0) -> tuple[str, str]:
    """Train/valid shards of copy examples (one document each) under root; idempotent."""
    root.mkdir(parents=True, exist_ok=True)
    prefixes = []
    for split, count, split_seed in (("train", train_examples, seed), ("valid", valid_examples, seed + 1)):
        prefix = root / split
        if not (bin_path(prefix).is_file() and idx_path(prefix).is_file()):
            with IndexedDatasetWriter(prefix, np.uint16) as writer:
                for example in copy_examples(count, n, symbols, split_seed):
                    writer.add_document(example)
        prefixes.append(str(prefix))
    return prefixes[0], prefixes[1]


@torch.no_grad()
def copy_accuracy(cfg: Config, run_dir: Path, n: int, batches: int = 16) -> dict:
    """Accuracy on the copied half and exact-copy rate over held-out examples (greedy argmax,
    teacher-forced: position n + i sees the true x_1..x_i)."""
    device = resolve_device(cfg.train.device)
    model = load_model(cfg, find_checkpoint(run_dir / "checkpoints", "auto"), device)
    correct = total = exact = examples = 0
    for x, y in eval_batches(cfg.data.valid_prefix, cfg.data.seq_len, cfg.train.micro_batch_size, batches):
        pred = model(x.to(device)).argmax(-1)[:, n : 2 * n]
        hit = pred == y[:, n : 2 * n].to(device)
        correct += hit.sum().item()
        total += hit.numel()
        exact += hit.all(dim=1).sum().item()
        examples += hit.shape[0]
    return {"copy_accuracy": correct / total, "exact_copy": exact / examples, "examples": examples}


def run(exp: Experiment) -> dict:
    g = exp.grid
    n, symbols = int(g.get("n", 10)), int(g.get("symbols", 24))
    variants = variants_for(g.get("variants", ["preln", "postln", "mgt"]))
    depths = [int(d) for d in g.get("depths", [exp.base.model.n_layers])]
    seeds = [int(s) for s in g.get("seeds", [exp.base.train.seed])]
    data_dir = exp.pool / f"copy_data_n{n}_v{symbols}_{int(g.get('train_examples', 20000))}"
    train_prefix, valid_prefix = write_copy_shards(data_dir, n, symbols, int(g.get("train_examples", 20000)), int(g.get("valid_examples", 512)))
    seq = 2 * n + 2
    task = {"data.train_prefix": train_prefix, "data.valid_prefix": valid_prefix, "data.tokenizer": "", "data.seq_len": seq, "model.max_seq_len": seq,
            "model.vocab_size": symbols + 3}
    specs = [(derive(exp.base, {**task, "model.residual": v, "model.n_layers": d, "train.seed": s}), "copy") for d in depths for v in variants for s in seeds]
    outcomes = run_grid(specs, exp.pool, "copy_task")
    runs = []
    for o in outcomes:
        summary = run_summary(o)
        cache = o.run_dir / "eval" / "copy.json"
        if o.status == "finished":
            if not cache.is_file():
                cache.write_text(json.dumps(copy_accuracy(o.cfg, o.run_dir, n)))
            summary.update(json.loads(cache.read_text()))
        else:
            summary.update(copy_accuracy=float("nan"), exact_copy=float("nan"))
        runs.append(summary)
    table = []
    for v in variants:
        for d in depths:
            mine = [r for r in runs if r["residual"] == v and r["n_layers"] == d]
            acc, acc_sd, _ = mean_std([r["copy_accuracy"] for r in mine])
            ex, _, _ = mean_std([r["exact_copy"] for r in mine])
            loss, _, _ = mean_std([r["valid_loss"] for r in mine])
            erank, _, _ = mean_std([r["erank_final_layer"] for r in mine])
            table.append({"variant": v, "depth": d, "copy_accuracy": acc, "copy_accuracy_std": acc_sd, "exact_copy": ex, "valid_loss": loss, "erank_final": erank,
                          "diverged": sum(r["status"] == "diverged" for r in mine)})
    out = exp.out
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_series_vs_x({v: [(r["depth"], r["copy_accuracy"], r["copy_accuracy_std"]) for r in table if r["variant"] == v] for v in variants},
                           out / "copy_accuracy_vs_depth.png", f"copy accuracy on the copied half (n={n}, {symbols} symbols; chance {1 / symbols:.3f})",
                           "layers", "accuracy", logx=True)
    md = f"# copy_task\n\n{sizes_line(exp, seq)} (task data: n = {n} symbols copied, alphabet {symbols}, vocab {symbols + 3}); " \
         f"depths {depths}; seeds {seeds}. Chance accuracy {1 / symbols:.3f}.\n\n"
    md += markdown_table(["variant", "layers", "copy accuracy", "+-", "exact copies", "valid loss", "erank last", "diverged"],
                         [[r["variant"], r["depth"], r["copy_accuracy"], r["copy_accuracy_std"], r["exact_copy"], r["valid_loss"], r["erank_final"], r["diverged"]] for r in table])
    md += "\n![copy](copy_accuracy_vs_depth.png)\n"
    results = {"n": n, "symbols": symbols, "chance": 1 / symbols, "table": table, "runs": runs}
    write_results(exp, results, md)
    return results
