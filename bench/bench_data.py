"""Data pipeline throughput: (c) tokenisation tokens/s per worker count, (d) mmap loader
tokens/s against what the trainer consumes: the quickstart model's training tokens/s
(configs/quickstart.yaml, single engine, this device), measured in the same run, and the
ratio loader / trainer (how many times faster the loader feeds than training eats).

Run with ``python -m bench.bench_data [--out DIR]`` from the repository root.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

from data_prep.corpora import fetch_shakespeare
from data_prep.pipeline import prepare_default
from data_prep.shards import tokenize_to_shards
from data_prep.sources import iter_documents
from megatron_mgt.data.loader import TokenBatchLoader


def _prep_tokens_per_second(inputs: list[str], model_file: Path, out_dir: Path, workers: int, repeats: int) -> float:
    """Best-of-``repeats`` tokens/s of reading + tokenising + writing the whole corpus."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        items = (("train", doc) for doc in iter_documents(inputs))
        stats = tokenize_to_shards(items, model_file, {"train": out_dir / f"bench_w{workers}"}, workers=workers)
        best = max(best, stats["train"].tokens / (time.perf_counter() - start))
    return best


def _loader_tokens_per_second(prefix: Path, seq_len: int, batch_size: int, steps: int) -> float:
    loader = TokenBatchLoader(prefix, seq_len, batch_size, seed=0)
    for _ in range(10):
        loader.next_batch()
    start = time.perf_counter()
    for _ in range(steps):
        loader.next_batch()
    return steps * batch_size * seq_len / (time.perf_counter() - start)


def _trainer_tokens_per_second(prefix: Path, steps: int) -> tuple[float, dict]:
    """Training tokens/s of the quickstart model on the shard (median step after 2 warm-up steps)."""
    import statistics

    import torch

    from megatron_mgt.config import load_config
    from megatron_mgt.engine.single import SingleEngine

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "quickstart.yaml", [f"data.train_prefix={prefix}"])
    engine = SingleEngine(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    loader = TokenBatchLoader(prefix, cfg.data.seq_len, cfg.train.micro_batch_size, seed=0)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        engine.train_step([loader.next_batch() for _ in range(cfg.train.grad_accum_steps)])
        if i >= 2:
            times.append(time.perf_counter() - start)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len
    shape = {"seq_len": cfg.data.seq_len, "batch_size": cfg.train.micro_batch_size, "layers": cfg.model.n_layers, "d_model": cfg.model.d_model}
    return tokens / statistics.median(times), shape


def run(
    out_dir: str | Path | None = None,
    workers: Sequence[int] = (1, 2),
    seq_len: int = 256,
    batch_size: int = 16,
    loader_steps: int = 2000,
    repeats: int = 2,
    trainer_steps: int = 10,
) -> dict:
    """Measure both throughputs on the default corpus; ``out_dir`` holds the prepared data (temp dir if None)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp)
        prepare_default(out)
        corpus = fetch_shakespeare()
        inputs = [str(f) for f in chain(corpus.train_files, corpus.valid_files)]
        prep = {w: _prep_tokens_per_second(inputs, out / "tokenizer.model", out, w, repeats) for w in workers}
        for w in workers:
            for ext in ("bin", "idx"):
                (out / f"bench_w{w}.{ext}").unlink()
        result = {
            "prep_tokens_per_s": prep,
            "prep_speedup_vs_1_worker": {w: prep[w] / prep[workers[0]] for w in workers},
            "loader_tokens_per_s": _loader_tokens_per_second(out / "train", seq_len, batch_size, loader_steps),
            "loader_shape": {"seq_len": seq_len, "batch_size": batch_size},
        }
        result["trainer_tokens_per_s"], result["trainer_shape"] = _trainer_tokens_per_second(out / "train", trainer_steps)
        result["loader_over_trainer"] = result["loader_tokens_per_s"] / result["trainer_tokens_per_s"]
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="directory for the prepared default dataset (reused if present)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loader-steps", type=int, default=2000)
    args = parser.parse_args(argv)
    result = run(args.out, workers=args.workers, loader_steps=args.loader_steps)
    for w, tps in result["prep_tokens_per_s"].items():
        print(f"(c) data_prep, {w} worker(s): {tps:,.0f} tokens/s  (x{result['prep_speedup_vs_1_worker'][w]:.2f})")
    shape = result["loader_shape"]
    print(f"(d) mmap loader, seq_len {shape['seq_len']} batch {shape['batch_size']}: {result['loader_tokens_per_s']:,.0f} tokens/s")
    t = result["trainer_shape"]
    print(
        f"(d) trainer (quickstart: {t['layers']} layers, d {t['d_model']}, {t['batch_size']} x {t['seq_len']}): "
        f"{result['trainer_tokens_per_s']:,.0f} tokens/s; loader / trainer = {result['loader_over_trainer']:,.0f}x"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
