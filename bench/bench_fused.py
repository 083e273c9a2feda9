"""What MGT's residual update costs beyond its FLOPs, eager against fused against compiled,
with preln and Hugging Face `LlamaForCausalLM` of the same shape, all in one run.

Each variant lives in its own worker subprocess (so its peak memory is its own: ru_maxrss on
CPU, torch.cuda.max_memory_allocated on CUDA); the parent drives them step by step,
round-robin with the order rotated every repetition, so machine noise lands on all alike.
One step = forward + LM loss + backward + AdamW step (bench_model.Candidate): fp32 on CPU,
bf16 autocast on CUDA. Per variant: median tokens/s, MFU (megatron_mgt/flops.py; CPU peak =
best fp32 GEMM at the start and end of the run), the bytes autograd saves per token per
layer ((S(L) - S(1)) / (L - 1), S = distinct saved storages of one fp32 forward, parameters
excluded), peak memory, and every ratio to preln.

Variants: a residual name with optional suffixes `+fused` (model.fused_residual),
`+recompute` (model.fused_recompute_projections, implies +fused), `+compile`
(model.compile, engine/single.compile_blocks) and `+keep` (train.cpu_malloc=keep, this
worker's glibc malloc: engine/host_memory.py), or `hf_llama`.

    python bench/bench_fused.py --json bench_fused.json     # 12 x d256, 4 heads, vocab 8000, 8 x 256
    python bench/bench_fused.py --smoke --json /tmp/b.json  # tiny sizes, seconds (a test, not a measurement)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import (  # noqa: E402
    HF_NAME,
    Candidate,
    add_shape_arguments,
    build,
    check_variants,
    format_paired,
    paired_speed_ratios,
    parse_variant,
)

from megatron_mgt.config import ModelConfig  # noqa: E402
from megatron_mgt.engine.host_memory import tune_cpu_malloc  # noqa: E402
from megatron_mgt.flops import device_peak_flops  # noqa: E402
from megatron_mgt.model import lm_loss  # noqa: E402
from megatron_mgt.plan import saved_tensor_bytes  # noqa: E402

DEFAULT_VARIANTS = ("preln", "mgt", "mgt+fused", "mgt+recompute", "mgt+compile", "preln+compile", HF_NAME)
SMOKE = {"layers": 2, "d_model": 32, "heads": 2, "vocab": 64, "batch": 2, "seq_len": 16, "steps": 2, "warmup": 1, "peak_seconds": 0.1}


def saved_bytes(model: nn.Module, forward, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after forward + loss (`plan.saved_tensor_bytes`: distinct
    storages, parameters and buffers excluded)."""
    return saved_tensor_bytes(lambda: lm_loss(forward(inputs), targets), exclude=[*model.parameters(), *model.buffers()])


def batch(shape: ModelConfig, size: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.randint(0, shape.vocab_size, (size, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    return data[:, :-1], data[:, 1:]


def worker(variant: str, spec: dict) -> None:
    """Build the variant, report its static figures, then run one step per 'step' line on stdin."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    malloc = tune_cpu_malloc("keep" if variant != HF_NAME and "keep" in parse_variant(variant)[1] else "default")  # +keep: train.cpu_malloc=keep
    device = torch.device(spec["device"])
    shape = ModelConfig(**spec["shape"])
    inputs, targets = batch(shape, spec["batch"], spec["seq_len"], device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    # saved bytes counted at fp32 (under autocast the bf16 weight copies would count as saved tensors)
    torch.manual_seed(0)
    one = build(variant, ModelConfig(**{**spec["shape"], "n_layers": 1}), device)
    s1 = saved_bytes(*one, inputs, targets)
    del one
    torch.manual_seed(0)
    model, forward = build(variant, shape, device)
    sl = saved_bytes(model, forward, inputs, targets)
    cand = Candidate(variant, model, forward, shape, spec["seq_len"])
    tokens = spec["batch"] * spec["seq_len"]
    per_layer = (sl - s1) / (shape.n_layers - 1) / tokens
    print(json.dumps({"cpu_malloc": malloc, "params": cand.n_params, "matmul_params": cand.n_matmul, "flops_per_token": cand.flops_per_token,
                      "saved_bytes_per_token_per_layer": per_layer, "saved_d_fp32_per_token_per_layer": per_layer / (4 * shape.d_model)}),
          flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        with autocast:
            cand.step(inputs, targets)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(json.dumps({"step_s": time.perf_counter() - t0, "loss": cand.losses[-1]}), flush=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_memory_bytes": peak}), flush=True)


class Worker:
    """A variant's subprocess and its replies."""

    def __init__(self, variant: str, spec: dict):
        self.variant = variant
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--spec", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self.reply()
        self.times: list[float] = []
        self.losses: list[float] = []

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.variant}: worker exited with {self.proc.wait()}")
        return json.loads(line)

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        out = self.reply()
        self.losses.append(out["loss"])
        return out["step_s"]

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        out = self.reply()
        self.proc.wait()
        return out


def run(variants, layers, d_model, heads, vocab, batch_size, seq_len, steps, warmup, peak_seconds, threads, device, log=print) -> dict:
    if layers < 2:
        raise ValueError("--layers must be >= 2 (saved bytes per layer = (S(L) - S(1)) / (L - 1))")
    if HF_NAME in variants and importlib.util.find_spec("transformers") is None:
        log(f"transformers is not installed: {HF_NAME} left out")
        variants = [v for v in variants if v != HF_NAME]
    if threads:
        torch.set_num_threads(threads)
    shape = ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=heads, max_seq_len=seq_len)
    flat = {k: v for k, v in shape.__dict__.items() if not dataclasses.is_dataclass(v)}  # nested knob dataclasses keep their defaults
    spec = {"shape": flat, "batch": batch_size, "seq_len": seq_len, "threads": threads, "device": device}
    load_start = os.getloadavg()[0]
    peak_start = device_peak_flops(device, peak_seconds)
    workers = [Worker(v, spec) for v in variants]
    for rep in range(warmup + steps):
        shift = rep % len(workers)
        this_rep = {w.variant: w.step() for w in workers[shift:] + workers[:shift]}
        for w in workers:
            if rep >= warmup:
                w.times.append(this_rep[w.variant])
        log(f"repetition {rep + 1}/{warmup + steps}{' (warm-up)' if rep < warmup else ''}: "
            + ", ".join(f"{w.variant} {this_rep[w.variant]:.3f}s" for w in workers))
    finals = {w.variant: w.finish() for w in workers}
    peak_end = device_peak_flops(device, peak_seconds)
    peak = max(p for p in (peak_start, peak_end) if p) if (peak_start or peak_end) else None

    results = {}
    for w in workers:
        median = statistics.median(w.times)
        tps = batch_size * seq_len / median
        results[w.variant] = {**w.info, **finals[w.variant], "step_s_median": median, "step_s_min": min(w.times), "tokens_per_s": tps,
                              "mfu": tps * w.info["flops_per_token"] / peak if peak else None, "losses": w.losses}
    ratios = {}
    paired = paired_speed_ratios({w.variant: w.times for w in workers})
    if "preln" in results:
        base = results["preln"]
        for name, r in results.items():
            if name != "preln":
                ratios[f"{name}/preln"] = {
                    "tokens_per_s": r["tokens_per_s"] / base["tokens_per_s"],
                    "saved_bytes_per_token_per_layer": r["saved_bytes_per_token_per_layer"] / base["saved_bytes_per_token_per_layer"],
                    "peak_memory": r["peak_memory_bytes"] / base["peak_memory_bytes"],
                }
    out = {
        "shape": {"layers": layers, "d_model": d_model, "heads": heads, "ffn_dim": shape.ffn_dim, "vocab": vocab, "batch": batch_size, "seq_len": seq_len},
        "device": device, "precision": "bf16 autocast" if device.startswith("cuda") else "fp32", "steps": steps, "warmup": warmup,
        "threads": threads or torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "load_avg_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "peak_flops": {"start": peak_start, "end": peak_end, "used": peak},
        "results": results, "ratios": ratios, "paired_tokens_per_s_ratios": paired,
    }
    log(format_table(out))
    return out


def format_table(out: dict) -> str:
    s = out["shape"]
    lines = [
        f"\n{s['layers']} layers, d={s['d_model']}, {s['heads']} heads, ffn {s['ffn_dim']}, vocab {s['vocab']}, batch {s['batch']} x {s['seq_len']}, "
        f"{out['device']} {out['precision']}, {out['threads']} threads, torch {out['torch']}; median of {out['steps']} steps after {out['warmup']} "
        f"warm-up; 1-min load {out['load_avg_1min']['start']:.1f} -> {out['load_avg_1min']['end']:.1f} on {out['cpus']} CPUs",
        "",
        "| variant | params | tokens/s | MFU | saved B/token/layer (d fp32) | peak memory MiB | tokens/s vs preln | saved vs preln | peak vs preln |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in out["results"].items():
        ratio = out["ratios"].get(f"{name}/preln", {})
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['tokens_per_s']:.0f} | {mfu} | {r['saved_bytes_per_token_per_layer']:.0f} "
            f"({r['saved_d_fp32_per_token_per_layer']:.1f}) | {r['peak_memory_bytes'] / 2**20:.0f} | "
            + " | ".join(f"{ratio[k]:.3f}" if k in ratio else "-" for k in ("tokens_per_s", "saved_bytes_per_token_per_layer", "peak_memory"))
            + " |"
        )
    lines += format_paired(out.get("paired_tokens_per_s_ratios", {}))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated: residual[+fused][+recompute][+compile][+keep] or hf_llama")
    add_shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile compiles in the first)")
    parser.add_argument("--peak-seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker; 0 keeps torch's default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes for a test: {SMOKE}")
    parser.add_argument("--json", default="bench_fused.json", help="where the result dict is written")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, json.loads(args.spec))
        return None
    sizes = {k: getattr(args, k) for k in ("layers", "d_model", "heads", "vocab", "batch", "seq_len", "steps", "warmup", "peak_seconds")}
    if args.smoke:
        sizes.update(SMOKE)
    sizes["batch_size"] = sizes.pop("batch")
    out = run(check_variants(parser, [v for v in args.variants.split(",") if v]), threads=args.threads, device=args.device, **sizes)
    Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
