"""Training throughput and MFU of every residual variant at one shape, and our `preln`
against Hugging Face `LlamaForCausalLM` of the same shape, all in one run.

One step = forward + LM loss + backward + the training AdamW step (engine/optim.py: foreach, decay on matrices), fp32, on the current device
(CPU here). Variants are timed round-robin (one step each per repetition, the order
rotated every repetition) so that machine noise lands on all of them alike; each reports
the median of its timed steps. The CPU peak for MFU is the best fp32 GEMM rate measured
at the start and at the end of the same run.

    python bench/bench_model.py                       # every registered variant, 12 x d256, 4 heads, vocab 8000, 8 x 256
    python bench/bench_model.py --steps 3 --layers 2 --variants preln,mgt --no-hf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

try:
    import megatron_mgt  # noqa: F401
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mgt.config import RESIDUALS, ModelConfig, TrainConfig
from megatron_mgt.engine.host_memory import tune_cpu_malloc
from megatron_mgt.engine.optim import build_optimizer
from megatron_mgt.engine.single import compile_blocks
from megatron_mgt.flops import flops_per_token, matmul_params, measure_cpu_peak_flops
from megatron_mgt.model import Transformer, lm_loss
from megatron_mgt.stats import t_interval

HF_NAME = "hf_llama"


def build_ours(shape: ModelConfig, residual: str) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    cfg = ModelConfig(**{**shape.__dict__, "residual": residual})
    model = Transformer(cfg)
    return model, model


def build_hf_llama(shape: ModelConfig) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """LlamaForCausalLM with our shape: hidden, layers, heads (no GQA), SwiGLU width,
    vocab, tied embeddings, SDPA attention. (It uses RMSNorm where we use LayerNorm.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.d_model,
        intermediate_size=shape.ffn_dim,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_heads,
        max_position_embeddings=shape.max_seq_len,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tie_embeddings,
        use_cache=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    assert model.config._attn_implementation == "sdpa"
    return model, lambda tokens: model(input_ids=tokens).logits


VARIANT_OPTIONS = ("fused", "recompute", "compile", "keep")  # keep: train.cpu_malloc=keep, a process-wide setting
PROCESS_OPTIONS = ("keep",)  # only bench_fused (one process per variant) can apply these


def parse_variant(variant: str) -> tuple[str, list[str]]:
    """'mgt+fused' -> ('mgt', ['fused']); ValueError naming what is unknown."""
    residual, *options = variant.split("+")
    if variant != HF_NAME and residual not in RESIDUALS:
        raise ValueError(f"variant {variant!r}: unknown residual {residual!r}; choose from {list(RESIDUALS)} (or {HF_NAME})")
    unknown = set(options) - set(VARIANT_OPTIONS)
    if unknown:
        raise ValueError(f"variant {variant!r}: unknown options {sorted(unknown)} (choose from {', '.join(VARIANT_OPTIONS)})")
    return residual, options


def check_variants(parser: argparse.ArgumentParser, variants: list[str]) -> list[str]:
    """The --variants list, or a usage error naming the bad entry."""
    try:
        for variant in variants:
            parse_variant(variant)
    except ValueError as err:
        parser.error(str(err))
    return variants


def build(variant: str, shape: ModelConfig, device: torch.device | str = "cpu") -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(model, forward) of a variant on `device`: hf_llama, or residual[+fused][+recompute][+compile][+keep]
    (model.fused_residual; +recompute: fused_recompute_projections, implies fused; model.compile;
    +keep is the process's malloc, PROCESS_OPTIONS, which the caller applies)."""
    if variant == HF_NAME:
        model, forward = build_hf_llama(shape)
        return model.to(device), forward
    residual, options = parse_variant(variant)
    recompute = "recompute" in options  # implies fused: the projections join the recomputed region
    cfg = ModelConfig(**{**shape.__dict__, "fused_residual": recompute or "fused" in options,
                         "fused_recompute_projections": recompute, "compile": "compile" in options})
    model, forward = build_ours(cfg, residual)
    compile_blocks(model.to(device), cfg)
    return model, forward


BENCH_LR = 1e-4


def bench_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Training's AdamW (engine/optim.py: foreach, decay on matrices) at a constant lr BENCH_LR
    (the schedule is left out: its warmup would start the lr near 0)."""
    optimizer, _ = build_optimizer(model, TrainConfig(lr=BENCH_LR, weight_decay=0.1))
    for group in optimizer.param_groups:
        group["lr"] = BENCH_LR
    return optimizer


def check_in_process(parser: argparse.ArgumentParser, variants: list[str]) -> list[str]:
    """A usage error for options that set the whole process (PROCESS_OPTIONS): every variant
    shares one process here; bench/bench_fused.py gives each variant its own."""
    for variant in variants:
        if variant != HF_NAME and set(parse_variant(variant)[1]) & set(PROCESS_OPTIONS):
            parser.error(f"variant {variant!r}: {PROCESS_OPTIONS} set the whole process; all variants share one here, "
                         "bench/bench_fused.py gives each variant its own")
    return variants


class Candidate:
    """A model, its optimizer and one timed training step."""

    def __init__(self, name: str, model: nn.Module, forward: Callable, shape: ModelConfig, seq_len: int):
        self.name, self.model, self.forward = name, model.train(), forward
        self.optimizer = bench_optimizer(model)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_matmul = matmul_params(model)
        self.flops_per_token = flops_per_token(shape, self.n_matmul, seq_len)
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        t0 = time.perf_counter()
        loss = lm_loss(self.forward(inputs), targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        self.losses.append(loss.item())
        return elapsed


def comparison_pairs(variants: list[str]) -> list[tuple[str, str]]:
    """(variant, reference) pairs to compare: every variant but hf_llama against preln, every
    `X+opts` against plain X, and preln against hf_llama (where both are in the run)."""
    pairs = [(v, "preln") for v in variants if v not in ("preln", HF_NAME)]
    pairs += [(v, v.split("+")[0]) for v in variants if "+" in v and v.split("+")[0] != "preln"]
    pairs += [("preln", HF_NAME)]
    return [(a, b) for a, b in pairs if a in variants and b in variants]


def paired_speed_ratios(times: dict[str, list[float]]) -> dict[str, dict]:
    """tokens/s ratio a/b = t_b / t_a per repetition (times[v][r]: v's step time in repetition r) (the two stepped in the same repetition), its
    geometric mean and 95% t interval over repetitions (computed on log ratios): machine drift
    that lands on one repetition cancels in its ratio."""
    out = {}
    for a, b in comparison_pairs(list(times)):
        logs = t_interval([math.log(tb / ta) for ta, tb in zip(times[a], times[b], strict=True)])
        out[f"{a}/{b}"] = {"mean": math.exp(logs["mean"]), "ci": [math.exp(x) for x in logs["ci"]], "n": logs["n"]}
    return out


def run(
    variants: tuple[str, ...] | list[str] = RESIDUALS,
    layers: int = 12,
    d_model: int = 256,
    heads: int = 4,
    vocab: int = 8000,
    batch: int = 8,
    seq_len: int = 256,
    steps: int = 8,
    warmup: int = 2,
    hf: bool = True,
    peak_seconds: float = 3.0,
    threads: int = 0,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Time every candidate round-robin; return per-candidate medians, MFU and ratios."""
    if threads:
        torch.set_num_threads(threads)
    shape = ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=heads, max_seq_len=seq_len)

    load_start = os.getloadavg()[0]
    peak_start = measure_cpu_peak_flops(peak_seconds)
    log(f"fp32 GEMM peak (2048^3, best over {peak_seconds:g} s): {peak_start / 1e9:.1f} GFLOP/s")

    candidates: list[Candidate] = []
    for name in variants:
        torch.manual_seed(seed)
        candidates.append(Candidate(name, *build(name, shape), shape, seq_len))
    if hf and HF_NAME not in variants:  # named in --variants already: built above
        torch.manual_seed(seed)
        candidates.append(Candidate(HF_NAME, *build_hf_llama(shape), shape, seq_len))

    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    for rep in range(warmup + steps):
        shift = rep % len(candidates)
        this_rep = {}
        for cand in candidates[shift:] + candidates[:shift]:
            this_rep[cand.name] = cand.step(inputs, targets)
            if rep >= warmup:
                cand.times.append(this_rep[cand.name])
        log(f"repetition {rep + 1}/{warmup + steps}{' (warm-up)' if rep < warmup else ''}: "
            + ", ".join(f"{c.name} {this_rep[c.name]:.2f}s" for c in candidates))

    peak_end = measure_cpu_peak_flops(peak_seconds)
    peak = max(peak_start, peak_end)
    log(f"fp32 GEMM peak at the end: {peak_end / 1e9:.1f} GFLOP/s; MFU uses the best, {peak / 1e9:.1f} GFLOP/s")

    tokens_per_step = batch * seq_len
    results: dict[str, dict] = {}
    for cand in candidates:
        median = statistics.median(cand.times)
        tps = tokens_per_step / median
        results[cand.name] = {
            "params": cand.n_params,
            "matmul_params": cand.n_matmul,
            "flops_per_token": cand.flops_per_token,
            "step_s_median": median,
            "step_s_min": min(cand.times),
            "step_s_max": max(cand.times),
            "step_s": cand.times,  # per repetition, for paired ratios
            "tokens_per_s": tps,
            "mfu": tps * cand.flops_per_token / peak,
            "first_loss": cand.losses[0],
            "last_loss": cand.losses[-1],
        }
        if not all(map(lambda x: x == x and abs(x) != float("inf"), cand.losses)):
            raise RuntimeError(f"{cand.name}: non-finite loss {cand.losses}")

    # median-step ratios are the headline; best-step ratios (uncontended cost) show how
    # much of a median ratio is noise on a shared machine
    ratios = {}
    pairs = [("mgt", "preln"), *((v, "preln") for v in variants if v.startswith("mgt+")), ("preln", HF_NAME)]
    for num, den in pairs:
        if num in results and den in results:
            a, b = results[num], results[den]
            ratios[f"{num}/{den} tokens/s (median step)"] = a["tokens_per_s"] / b["tokens_per_s"]
            ratios[f"{num}/{den} tokens/s (best step)"] = b["step_s_min"] / a["step_s_min"]

    out = {
        "shape": {"layers": layers, "d_model": d_model, "heads": heads, "ffn_dim": shape.ffn_dim, "vocab": vocab,
                  "batch": batch, "seq_len": seq_len, "tied": shape.tie_embeddings},
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "torch": torch.__version__,
        "peak_flops": {"start": peak_start, "end": peak_end, "used": peak},
        "results": results,
        "ratios": ratios,
        "paired_tokens_per_s_ratios": paired_speed_ratios({c.name: c.times for c in candidates}),
    }
    log(format_table(out))
    return out


def format_paired(paired: dict[str, dict]) -> list[str]:
    """Lines of `paired_speed_ratios`' result."""
    return ["", "tokens/s ratios, paired per repetition (geometric mean [95% CI]):"] + [
        f"- {k}: {v['mean']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] over {v['n']}" for k, v in paired.items()]


def format_table(out: dict) -> str:
    s = out["shape"]
    lines = [
        f"\n{s['layers']} layers, d={s['d_model']}, {s['heads']} heads, ffn {s['ffn_dim']}, vocab {s['vocab']}, "
        f"batch {s['batch']} x {s['seq_len']}, fp32, {out['threads']} threads, torch {out['torch']}; "
        f"median of {out['steps']} steps after {out['warmup']} warm-up; "
        f"1-min load average {out['load_avg_1min']['start']:.1f} at start, {out['load_avg_1min']['end']:.1f} at end "
        f"on {out['cpus']} CPUs",
        "",
        "| model | params | matmul params | GFLOP/token | step s (median, min-max) | tokens/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in out["results"].items():
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['matmul_params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e9:.4f} | "
            f"{r['step_s_median']:.2f} ({r['step_s_min']:.2f}-{r['step_s_max']:.2f}) | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% |"
        )
    lines.append("")
    lines += [f"{k}: {v:.3f}" for k, v in out["ratios"].items()]
    lines += format_paired(out.get("paired_tokens_per_s_ratios", {}))
    return "\n".join(lines)


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark shape, one set of flags for every bench script (12 x d256, 4 heads, vocab 8000, 8 x 256)."""
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    add_shape_arguments(parser)
    parser.add_argument("--variants", default=",".join(RESIDUALS), help="comma-separated: residual[+fused][+recompute][+compile] (+keep: bench_fused.py only)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face Llama comparison")
    parser.add_argument("--peak-seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--json", default="", help="also write the result dict to this file")
    parser.add_argument("--cpu-malloc", choices=("keep", "default"), default="default",
                        help="glibc malloc as train.cpu_malloc sets it (engine/host_memory.py; default: glibc's own; training's default is keep)")
    args = parser.parse_args(argv)
    malloc = tune_cpu_malloc(args.cpu_malloc)
    variants = check_in_process(parser, check_variants(parser, [v for v in args.variants.split(",") if v]))  # --cpu-malloc sets all
    out = run(
        variants=variants,
        layers=args.layers,
        d_model=args.d_model,
        heads=args.heads,
        vocab=args.vocab,
        batch=args.batch,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        hf=not args.no_hf,
        peak_seconds=args.peak_seconds,
        threads=args.threads,
    )
    out["cpu_malloc"] = malloc
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
