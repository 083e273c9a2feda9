"""Evaluate a trained run: held-out perplexity, a geometry snapshot, plots.

    mgt-eval RUN_DIR [--checkpoint DIR] [section.key=value ...]

Held-out loss over the first `eval.batches` batches; with `eval.full_split=true`, also the
perplexity of every token of the valid (and `data.test_prefix`) shard, per model token and,
when the shard's meta.json has the split's word count (data_prep.wikitext), per word of the
original text: exp(total NLL / words), the WikiText convention.

Writes RUN_DIR/eval/{eval.json, loss_curve.png, erank_vs_depth.png, beta_by_layer.png}
and, when training logged geometry telemetry, {erank,token_cosine}_heatmap.png (layer x step).
The geometry snapshot is one forward pass on a fixed batch (the first held-out windows)
for the trained model and for the same architecture at initialisation (same seed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from data_prep.inspect_shards import token_counts, unigram_cross_entropy, unigram_entropy
from data_prep.wikitext import read_split_words
from megatron_mgt import plots, telemetry
from megatron_mgt.checkpoint import find_checkpoint
from megatron_mgt.config import Config, ConfigError, load_config
from megatron_mgt.data.indexed import IndexedDataset
from megatron_mgt.data.loader import eval_batches, scoring_windows
from megatron_mgt.engine import read_weights
from megatron_mgt.engine.dist import resolve_device
from megatron_mgt.geometry import geometry_snapshot
from megatron_mgt.metrics import read_metrics
from megatron_mgt.model import Transformer, lm_loss
from megatron_mgt.train import heldout_loss


def unigram_baselines(train_prefix: str, valid_prefix: str) -> dict:
    """The loss of the best context-free predictor, a bar every language model must clear:
    the entropy of the training unigram distribution, and the held-out tokens' cross-entropy
    under the (add-one smoothed) training unigram model, both in nats/token."""
    train = token_counts(IndexedDataset(train_prefix).tokens)
    valid = token_counts(IndexedDataset(valid_prefix).tokens)
    return {"train_entropy": unigram_entropy(train), "valid_cross_entropy": unigram_cross_entropy(train, valid)}


def load_model(cfg: Config, checkpoint: Path, device: torch.device) -> Transformer:
    """The weights of a checkpoint of any engine's layout (engine.read_weights), in eval mode."""
    model = Transformer(cfg.model).to(device)
    model.load_state_dict(read_weights(checkpoint, cfg.model))
    return model.eval()


@torch.no_grad()
def perplexity(model: Transformer, cfg: Config, device: torch.device) -> dict:
    """Token-weighted mean next-token loss over the first `eval.batches` held-out batches."""
    return heldout_loss(lambda x, y: lm_loss(model(x.to(device)), y.to(device)).item(), cfg.data.valid_prefix, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.eval.batches)


@torch.no_grad()
def split_perplexity(model: Transformer, prefix: str, cfg: Config, device: torch.device) -> dict:
    """Every token of the shard at `prefix` scored once (data.loader.scoring_windows, stride
    `eval.stride`): nats per token, perplexity per token and, with a reference word count,
    per word = exp(sum of NLL / words)."""
    nll, tokens = 0.0, 0
    for x, y in scoring_windows(prefix, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.eval.stride):
        logits = model(x.to(device)).float()
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.to(device).reshape(-1), ignore_index=-100, reduction="sum").item()
        tokens += int((y != -100).sum())
    out = {
        "tokens": tokens,
        "nll_sum": nll,
        "loss": nll / tokens,
        "ppl": math.exp(nll / tokens),
        "stride": cfg.eval.stride or cfg.data.seq_len,
    }
    words = read_split_words(prefix)
    if words:
        out.update(words=words, nats_per_word=nll / words, word_ppl=math.exp(min(nll / words, 700.0)))
    return out


def eval_splits(cfg: Config) -> dict[str, str]:
    """The held-out shards a full-split evaluation scores: valid, and test when configured."""
    return {name: prefix for name, prefix in (("valid", cfg.data.valid_prefix), ("test", cfg.data.test_prefix)) if prefix}


def evaluate(cfg: Config, run_dir: Path, checkpoint: Path | None = None) -> dict:
    device = resolve_device(cfg.train.device)
    checkpoint = checkpoint or find_checkpoint(run_dir / "checkpoints", "auto")
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints: no complete checkpoint to evaluate")
    model = load_model(cfg, checkpoint, device)
    probe, _ = next(iter(eval_batches(cfg.data.valid_prefix, cfg.data.seq_len, cfg.eval.geometry_batch, 1)))
    probe = probe.to(device)
    torch.manual_seed(cfg.train.seed)
    at_init = Transformer(cfg.model).to(device).eval()
    result = {
        "checkpoint": str(checkpoint),
        "residual": cfg.model.residual,
        "n_layers": cfg.model.n_layers,
        "valid": perplexity(model, cfg, device),
        "unigram": unigram_baselines(cfg.data.train_prefix, cfg.data.valid_prefix),
        "geometry": geometry_snapshot(model, probe, cfg.eval.center),
        **(
            {"splits": {name: split_perplexity(model, prefix, cfg, device) for name, prefix in eval_splits(cfg).items()}}
            if cfg.eval.full_split
            else {}
        ),
        "geometry_at_init": geometry_snapshot(at_init, probe, cfg.eval.center),
    }
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "eval.json")
    write_plots(result, run_dir, out)
    return result


def write_plots(result: dict, run_dir: Path, out: Path) -> None:
    name = f"{result['residual']} L={result['n_layers']}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        series = {kind: [(r["step"], r["loss"]) for r in read_metrics(metrics, kind)] for kind in ("train", "valid")}
        plots.plot_loss_curves(series, out / "loss_curve.png", f"loss, {name}")
        telemetry.write_heatmaps(metrics, out, name)  # layer x step, when training logged geometry
    centred = "centred" if result["geometry"]["centered"] else "uncentred"
    plots.plot_erank_vs_depth(
        {"trained": result["geometry"]["erank"], "init": result["geometry_at_init"]["erank"]},
        out / "erank_vs_depth.png",
        f"effective rank ({centred}), {name}",
    )
    betas = [s["beta"] for s in result["geometry"]["sublayers"].values() if "beta" in s]
    if betas:
        plots.plot_beta_by_layer(betas, out / "beta_by_layer.png", f"beta per sublayer (attn, mlp alternating), {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mgt-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="section.key=value applied over the run's config.yaml")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.run_dir / "config.yaml", args.overrides)
        result = evaluate(cfg, args.run_dir, args.checkpoint)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"mgt-eval: error: {err}", file=sys.stderr)
        return 2
    valid, h = result["valid"], result["unigram"]["train_entropy"]
    erank = result["geometry"]["erank"]
    print(f"valid loss {valid['loss']:.4f} nats/token (ppl {valid['ppl']:.2f}) over {valid['tokens']} tokens")
    print(f"unigram entropy of the training tokens {h:.4f} nats/token: the model is {h - valid['loss']:.4f} nats below it")
    for name, split in result.get("splits", {}).items():
        line = f"{name} (every token, stride {split['stride']}): {split['loss']:.4f} nats/token, ppl {split['ppl']:.2f} per token over {split['tokens']} tokens"
        if "word_ppl" in split:
            line += f"; ppl {split['word_ppl']:.2f} per word over {split['words']} words"
        print(line)
    print(f"held-out tokens under the training unigram model: {result['unigram']['valid_cross_entropy']:.4f} nats/token")
    print(
        f"effective rank ({'centred' if result['geometry']['centered'] else 'uncentred'}): embedding {erank[0]:.3f}, last layer {erank[-1]:.3f}"
    )
    print(f"wrote {args.run_dir / 'eval'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
