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

from data_prep.wikitext import read_split_words
from megatron_mgt import plots, telemetry
from megatron_mgt.baselines import ngram_baselines
from megatron_mgt.checkpoint import LOAD_ERRORS, CheckpointError, find_checkpoint, verify_checkpoint
from megatron_mgt.config import Config, ConfigError, load_config
from megatron_mgt.data.loader import eval_batches, scoring_windows, spread_windows
from megatron_mgt.engine import read_weights
from megatron_mgt.engine.dist import resolve_device
from megatron_mgt.geometry import gaussian_reference, geometry_snapshot, rank_profile
from megatron_mgt.metrics import read_metrics
from megatron_mgt.model import Transformer, capture_geometry, lm_loss
from megatron_mgt.train import heldout_loss


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


@torch.no_grad()
def rank_probe(cfg: Config, device: torch.device) -> torch.Tensor:
    """The rank probe: `eval.rank_windows` windows [N, seq_len] spread over the valid split."""
    return spread_windows(cfg.data.valid_prefix, cfg.data.seq_len, cfg.eval.rank_windows)[0].to(device)


def rank_profiles(cfg: Config, model: Transformer, at_init: Transformer, device: torch.device) -> dict:
    """geometry.rank_profile of the trained and the initial model on the rank probe (means
    and CIs over windows), and the same metrics on Gaussian matrices of the probe's shape,
    the no-structure reference."""
    probe = rank_probe(cfg, device)
    stream_width = capture_geometry(at_init, probe[:1])["hidden"][0].shape[-1]
    return {
        "rank_profile": rank_profile(capture_geometry(model, probe)["hidden"], cfg.eval.center),
        "rank_profile_init": rank_profile(capture_geometry(at_init, probe)["hidden"], cfg.eval.center),
        "gaussian_reference": gaussian_reference(probe.shape[1], stream_width, cfg.eval.center),
    }


@torch.no_grad()
def distance_from_init(model: Transformer, at_init: Transformer) -> dict:
    """|theta - theta_0| / |theta_0| of each block's parameters and of the whole model
    (how far training moved the weights; a layer that barely moved learnt little)."""

    def rel(pairs) -> float:
        num = sum(float((p.double() - q.double()).pow(2).sum()) for p, q in pairs)
        den = sum(float(q.double().pow(2).sum()) for _, q in pairs)
        return (num / den) ** 0.5 if den > 0 else float("nan")

    blocks = [rel(list(zip(a.parameters(), b.parameters(), strict=True))) for a, b in zip(model.layers.values(), at_init.layers.values(), strict=True)]
    return {"per_block": blocks, "model": rel(list(zip(model.parameters(), at_init.parameters(), strict=True)))}


def eval_splits(cfg: Config) -> dict[str, str]:
    """The held-out shards a full-split evaluation scores: valid, and test when configured."""
    return {name: prefix for name, prefix in (("valid", cfg.data.valid_prefix), ("test", cfg.data.test_prefix)) if prefix}


def evaluate(cfg: Config, run_dir: Path, checkpoint: Path | None = None) -> dict:
    device = resolve_device(cfg.train.device)
    checkpoint = checkpoint or find_checkpoint(run_dir / "checkpoints", "auto")  # the newest that verifies
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints: no complete checkpoint to evaluate")
    problem = verify_checkpoint(checkpoint)
    if problem:
        raise CheckpointError(f"checkpoint {checkpoint} is damaged: {problem}")
    try:
        model = load_model(cfg, checkpoint, device)
    except LOAD_ERRORS as err:
        raise CheckpointError(f"checkpoint {checkpoint}: cannot load its weights into this config's model: {type(err).__name__}: {err}") from err
    probe, _ = next(iter(eval_batches(cfg.data.valid_prefix, cfg.data.seq_len, cfg.eval.geometry_batch, 1)))
    probe = probe.to(device)
    torch.manual_seed(cfg.train.seed)
    at_init = Transformer(cfg.model).to(device).eval()
    result = {
        "checkpoint": str(checkpoint),
        "residual": cfg.model.residual,
        "n_layers": cfg.model.n_layers,
        "valid": perplexity(model, cfg, device),
        "baselines": ngram_baselines(cfg.data.train_prefix, cfg.data.valid_prefix, cfg.model.vocab_size),
        "geometry": geometry_snapshot(model, probe, cfg.eval.center, cfg.eval.spectrum),
        **(
            {"splits": {name: split_perplexity(model, prefix, cfg, device) for name, prefix in eval_splits(cfg).items()}}
            if cfg.eval.full_split
            else {}
        ),
        "geometry_at_init": geometry_snapshot(at_init, probe, cfg.eval.center, cfg.eval.spectrum),
        "distance_from_init": distance_from_init(model, at_init),
    }
    if cfg.eval.rank_windows:
        result.update(rank_profiles(cfg, model, at_init, device))
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
    except (ConfigError, OSError, ValueError) as err:  # CheckpointError and MetricsError are ValueErrors
        print(f"mgt-eval: error: {err}", file=sys.stderr)
        return 2
    valid, h = result["valid"], result["baselines"]["unigram_entropy"]
    erank = result["geometry"]["erank"]
    print(f"valid loss {valid['loss']:.4f} nats/token (ppl {valid['ppl']:.2f}) over {valid['tokens']} tokens")
    print(f"unigram entropy of the training tokens {h:.4f} nats/token: the model is {h - valid['loss']:.4f} nats below it")
    for name, split in result.get("splits", {}).items():
        line = f"{name} (every token, stride {split['stride']}): {split['loss']:.4f} nats/token, ppl {split['ppl']:.2f} per token over {split['tokens']} tokens"
        if "word_ppl" in split:
            line += f"; ppl {split['word_ppl']:.2f} per word over {split['words']} words"
        print(line)
    base = result["baselines"]
    print(f"held-out tokens under the training unigram / Kneser-Ney bigram: {base['unigram']:.4f} / {base['bigram_kn']:.4f} nats/token")
    print(
        f"effective rank ({'centred' if result['geometry']['centered'] else 'uncentred'}): embedding {erank[0]:.3f}, last layer {erank[-1]:.3f}"
    )
    print(f"wrote {args.run_dir / 'eval'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
