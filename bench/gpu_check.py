"""First checks on one GPU, in one run: writes OUT/gpu_check.json and OUT/gpu_check.md.

    PYTHONPATH=. python bench/gpu_check.py --out DIR            # one GPU, under 8 minutes (bash bench/gpu_check.sh)
    PYTHONPATH=. python bench/gpu_check.py --out DIR --dry-run  # the same code on CPU at tiny sizes, fp32, < 1 minute

Sections, each timed and recorded on its own (a failure is recorded, the next section runs):

- env: torch / CUDA / device, the dense bf16 peak (megatron_mgt/flops.py), which optional
  packages are there (deepspeed, wandb, datasets, flash-attn: none is needed here), the
  attention kernel the model would run.
- attention: SDPA (each CUDA backend that accepts the shape) and flash-attn where installed,
  against math attention computed in fp32: max |out - ref| in bf16.
- throughput: bf16 training steps of preln and mgt through the single engine (autocast,
  fp32 master weights) at a GPU shape: tokens/s and MFU = 6 N + 12 L H d_head T FLOPs per
  token x tokens/s / peak.
- activation_memory: bytes a bf16 model holds after forward, per block, from
  torch.cuda.memory_allocated at two depths, (M(L2) - M(L1)) / (L2 - L1), next to mgt-plan's
  per-block figure for the same shape.
- deep: a 200-layer MGT trained for a few hundred steps with activation checkpointing
  (torch.utils.checkpoint around every block, from outside the model) on a synthetic
  learnable stream (each token's successor is fixed with probability 0.9): the loss must fall.
- engines: the single and the FSDP engine (world size 1; NCCL on CUDA, gloo on CPU) from the
  same seed on the same batches: their losses must agree (fp32 tightly, bf16 loosely).
- telemetry: one layer's centred erank at the 200-layer preset's probe shape ([4, 2048,
  2048], float64) with eval.spectrum = svd and gram: seconds per layer and per snapshot, and
  their agreement (the figure that sets log.geometry_every on GPUs).
- fused: bench/bench_fused.py's table (each variant in its own process, stepped round-robin):
  tokens/s, MFU, saved bytes per token per layer and peak memory of preln, mgt eager, fused,
  fused with recomputed projections and compiled blocks (and HF Llama where transformers is
  installed), with every ratio to preln.

Needs torch, numpy, pyyaml, tqdm and the repository on PYTHONPATH; nothing is installed.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

OPTIONAL = ("deepspeed", "wandb", "datasets", "flash_attn")
DEEP_MIN_DROP = 0.25  # nats the deep run's loss must fall (first tenth of the steps -> last tenth)
BF16_ATOL = 2e-2  # attention output in bf16 against fp32 math (|out| <= 1: about 3 bf16 ulps)

# sizes: (GPU, dry run)
SHAPES = {
    "attention": ({"b": 4, "t": 2048, "h": 16, "d": 128}, {"b": 2, "t": 64, "h": 2, "d": 16}),
    "throughput": (
        {"d_model": 2048, "n_heads": 16, "n_layers": 8, "seq_len": 2048, "vocab_size": 32000, "mbs": 4, "steps": 10, "warmup": 3},
        {"d_model": 64, "n_heads": 4, "n_layers": 2, "seq_len": 64, "vocab_size": 256, "mbs": 2, "steps": 2, "warmup": 1},
    ),
    "activation_memory": (
        {"d_model": 2048, "n_heads": 16, "depths": (2, 6), "seq_len": 2048, "vocab_size": 32000, "mbs": 1},
        {"d_model": 64, "n_heads": 4, "depths": (1, 2), "seq_len": 64, "vocab_size": 256, "mbs": 2},
    ),
    "deep": (
        {"d_model": 512, "n_heads": 8, "n_layers": 200, "seq_len": 512, "vocab_size": 8192, "mbs": 8, "steps": 300, "lr": 1e-3},
        {"d_model": 32, "n_heads": 2, "n_layers": 6, "seq_len": 32, "vocab_size": 64, "mbs": 4, "steps": 40, "lr": 1e-2},
    ),
    "fused": (
        {"d_model": 1024, "n_heads": 8, "n_layers": 8, "seq_len": 1024, "vocab_size": 32000, "mbs": 8, "steps": 6, "warmup": 2,
         "variants": ("preln", "mgt", "mgt+fused", "mgt+recompute", "mgt+compile", "hf_llama")},
        {"d_model": 32, "n_heads": 2, "n_layers": 2, "seq_len": 16, "vocab_size": 64, "mbs": 2, "steps": 2, "warmup": 1,
         "variants": ("preln", "mgt", "mgt+recompute")},
    ),
    "telemetry": (  # one layer's probe stream at the 200-layer preset's shape (eval.geometry_batch 4 x 2048, d 2048)
        {"batch": 4, "seq_len": 2048, "d_model": 2048, "n_layers": 200, "repeats": 3},
        {"batch": 2, "seq_len": 32, "d_model": 32, "n_layers": 6, "repeats": 2},
    ),
    "engines": (
        {"d_model": 256, "n_heads": 4, "n_layers": 4, "seq_len": 256, "vocab_size": 4096, "mbs": 4, "steps": 5},
        {"d_model": 32, "n_heads": 2, "n_layers": 2, "seq_len": 32, "vocab_size": 64, "mbs": 2, "steps": 3},
    ),
}


def shape(section: str, dry: bool) -> dict:
    return dict(SHAPES[section][1 if dry else 0])


def model_config(s: dict, residual: str, **extra):
    from megatron_mgt.config import load_config

    keys = {
        "model.residual": residual,
        "model.d_model": s["d_model"],
        "model.n_heads": s["n_heads"],
        "model.n_layers": s.get("n_layers", 1),
        "model.vocab_size": s["vocab_size"],
        "model.max_seq_len": s["seq_len"],
        "model.mlp": "swiglu",
        "data.seq_len": s["seq_len"],
        "train.micro_batch_size": s["mbs"],
        "train.grad_accum_steps": 1,
        "train.warmup_steps": 10,
        "train.max_steps": max(s.get("steps", 1), 1),
        "train.lr": 3e-4,
        **extra,
    }
    return load_config(None, [f"{k}={v}" for k, v in keys.items()])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(cfg, gen: torch.Generator, device: torch.device, successor: torch.Tensor | None = None) -> tuple:
    """(inputs, targets) [B, T]: uniform tokens, or with `successor` a stream in which each
    token is followed by successor[token] with probability 0.9 (learnable: the loss can fall
    from ln V towards 0.9 ln(1/0.9) + 0.1 ln(V/0.1) nats)."""
    b, t, v = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    if successor is None:
        tokens = torch.randint(0, v, (b, t + 1), generator=gen)
    else:
        tokens = torch.empty(b, t + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, v, (b,), generator=gen)
        noise = torch.randint(0, v, (b, t + 1), generator=gen)
        keep = torch.rand(b, t + 1, generator=gen) < 0.9
        for i in range(1, t + 1):
            tokens[:, i] = torch.where(keep[:, i], successor[tokens[:, i - 1]], noise[:, i])
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


# --- sections --------------------------------------------------------------------------


def check_env(device: torch.device, dry: bool) -> dict:
    from megatron_mgt.flops import device_peak_flops
    from megatron_mgt.model.attention import kernel_description

    s = shape("throughput", dry)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_flops": device_peak_flops(device, seconds=0.5),
        "optional_packages": {name: importlib.util.find_spec(name) is not None for name in OPTIONAL},
        "attention_kernel": kernel_description(s["d_model"] // s["n_heads"], "auto", device, dtype, s["n_heads"]),
    }
    if device.type == "cuda":
        out["memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return out


def math_attention(q, k, v) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v in fp32, q, k, v [B, T, H, D]."""
    q, k, v = (x.float() for x in (q, k, v))
    t = q.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def check_attention(device: torch.device, dry: bool) -> dict:
    import torch.nn.functional as F

    from megatron_mgt.model.attention import causal_attention, flash_refusal

    s = shape("attention", dry)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(s["b"], s["t"], s["h"], s["d"], device=device, dtype=dtype, generator=gen) for _ in range(3))
    ref = math_attention(q, k, v)
    atol = BF16_ATOL if dtype == torch.bfloat16 else 1e-5
    kernels: dict[str, dict] = {}

    def compare(name: str, run) -> None:
        try:
            out = run()
            sync(device)
            err = (out.float() - ref).abs().max().item()
            kernels[name] = {"max_abs_err": err, "ok": err <= atol}
        except (RuntimeError, ValueError) as e:  # a backend that refuses the shape / device
            kernels[name] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}

    compare("sdpa_default", lambda: causal_attention(q, k, v, kernel="sdpa"))
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):

            def run(backend=backend):
                with sdpa_kernel(backend):
                    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)

            compare(f"sdpa_{backend.name.lower()}", run)
    reason = flash_refusal(q, "flash")
    if reason:
        kernels["flash_attn"] = {"skipped": reason}
    else:
        compare("flash_attn", lambda: causal_attention(q, k, v, kernel="flash"))
    ran = [r for r in kernels.values() if "ok" in r]
    return {"shape": s, "dtype": str(dtype), "atol": atol, "kernels": kernels, "ok": bool(ran) and all(r["ok"] for r in ran)}


def timed_steps(engine, batches: list, steps: int, warmup: int, device: torch.device) -> tuple[float, list[float]]:
    """Seconds per step (median of the timed steps) and every step's loss."""
    losses, times = [], []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(engine.train_step([batches[i % len(batches)]]).loss)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], losses


def check_throughput(device: torch.device, dry: bool, peak: float | None) -> dict:
    from megatron_mgt.engine.single import SingleEngine
    from megatron_mgt.flops import flops_per_token, matmul_params

    s = shape("throughput", dry)
    precision = "bf16" if device.type == "cuda" else "fp32"
    out: dict = {"shape": s, "precision": precision, "variants": {}}
    for residual in ("preln", "mgt"):
        cfg = model_config(s, residual, **{"train.precision": precision})
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        engine = SingleEngine(cfg, device)
        gen = torch.Generator().manual_seed(1)
        batches = [synthetic_batch(cfg, gen, device) for _ in range(2)]
        step_s, losses = timed_steps(engine, batches, s["steps"], s["warmup"], device)
        tokens = s["mbs"] * s["seq_len"]
        flops = flops_per_token(cfg.model, matmul_params(engine.model), s["seq_len"])
        row = {"step_s": step_s, "tokens_per_s": tokens / step_s, "tflops": flops * tokens / step_s / 1e12, "loss_last": losses[-1]}
        row["mfu"] = flops * tokens / step_s / peak if peak else None
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["variants"][residual] = row
        del engine
    return out


def forward_bytes(model, tokens: torch.Tensor, device: torch.device) -> int | None:
    """CUDA bytes held after a forward (the graph's saved tensors + the logits): None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    logits = model(tokens)
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - before
    del logits
    return held


def check_activation_memory(device: torch.device, dry: bool) -> dict:
    from megatron_mgt.model import Transformer
    from megatron_mgt.plan import Cluster, build_plan

    s = shape("activation_memory", dry)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lo, hi = s["depths"]
    out: dict = {"shape": s, "dtype": str(dtype), "variants": {}}
    modes = {"preln": ("preln", {}), "mgt": ("mgt", {}), "mgt+fused": ("mgt", {"model.fused_residual": True}),
             "mgt+recompute": ("mgt", {"model.fused_residual": True, "model.fused_recompute_projections": True})}
    for name, (residual, knobs) in modes.items():
        held = {}
        for depth in (lo, hi):
            cfg = model_config({**s, "n_layers": depth}, residual, **{"train.precision": "bf16" if dtype == torch.bfloat16 else "fp32"}, **knobs)
            model = Transformer(cfg.model).to(device=device, dtype=dtype)  # whole-module bf16, as DeepSpeed runs it
            tokens = torch.randint(0, s["vocab_size"], (s["mbs"], s["seq_len"]), device=device)
            held[depth] = forward_bytes(model, tokens, device)
            del model
        plan = build_plan(cfg, Cluster(nodes=1, gpus_per_node=1, pipeline_stages=1))
        measured = (held[hi] - held[lo]) / (hi - lo) / 1e6 if held[lo] is not None else None
        out["variants"][name] = {
            "measured_mb_per_block": measured,
            "plan_mb_per_block": plan.layer_activation_mb,
            "ratio": measured / plan.layer_activation_mb if measured is not None else None,
        }
    if device.type != "cuda":
        out["note"] = "no CUDA memory statistics on CPU: plan figures only"
    return out


def checkpoint_blocks(model) -> None:
    """Recompute every block in backward: torch.utils.checkpoint around each block's forward."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers.values():
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def check_deep(device: torch.device, dry: bool, budget_s: float) -> dict:
    from megatron_mgt.engine.single import SingleEngine

    s = shape("deep", dry)
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = model_config(s, "mgt", **{"train.precision": precision, "train.warmup_steps": max(s["steps"] // 10, 1), "train.lr": s["lr"]})
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    engine = SingleEngine(cfg, device)
    checkpoint_blocks(engine.model)
    gen = torch.Generator().manual_seed(2)
    successor = torch.randperm(s["vocab_size"], generator=gen)
    batches = [synthetic_batch(cfg, gen, device, successor) for _ in range(8)]
    losses, norms, t0 = [], [], time.perf_counter()
    for step in range(s["steps"]):
        result = engine.train_step([batches[step % len(batches)]])
        losses.append(result.loss)
        norms.append(result.grad_norm)
        if time.perf_counter() - t0 > budget_s:
            break
    sync(device)
    seconds = time.perf_counter() - t0
    head, tail = losses[: max(len(losses) // 10, 1)], losses[-max(len(losses) // 10, 1) :]
    out = {
        "shape": s,
        "precision": precision,
        "activation_checkpointing": "torch.utils.checkpoint per block",
        "steps_run": len(losses),
        "seconds": seconds,
        "tokens_per_s": len(losses) * s["mbs"] * s["seq_len"] / seconds,
        "loss_first": sum(head) / len(head),
        "loss_last": sum(tail) / len(tail),
        "loss_uniform": math.log(s["vocab_size"]),
        "max_grad_norm": max(norms),
        "finite": all(math.isfinite(x) for x in losses + norms),
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out["ok"] = out["finite"] and out["loss_last"] < out["loss_first"] - DEEP_MIN_DROP
    return out


def check_fused(device: torch.device, dry: bool) -> dict:
    """bench/bench_fused.py's side-by-side table at the section's shape (bf16 autocast on CUDA)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_fused

    s = shape("fused", dry)
    return bench_fused.run(list(s["variants"]), s["n_layers"], s["d_model"], s["n_heads"], s["vocab_size"], s["mbs"], s["seq_len"],
                           s["steps"], s["warmup"], 0.1 if dry else 1.0, 1 if dry else 0, str(device), log=lambda line: None)


def check_telemetry(device: torch.device, dry: bool) -> dict:
    """Seconds of one layer's erank (geometry.effective_rank, centred, float64) at the preset's
    probe shape, eval.spectrum = svd vs gram, their agreement, and what a snapshot's spectra
    cost at n_layers (one rank; ranks split the layers)."""
    from megatron_mgt.geometry import SPECTRA, effective_rank

    s = shape("telemetry", dry)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s["batch"], s["seq_len"], s["d_model"], generator=gen, device=device)  # the fp32 stream
    out: dict = {"shape": s, "spectra": {}}
    for spectrum in SPECTRA:
        effective_rank(x, True, spectrum)  # warm-up (cusolver handles, workspace)
        times = []
        for _ in range(s["repeats"]):
            sync(device)
            t0 = time.perf_counter()
            erank = effective_rank(x, True, spectrum)
            sync(device)
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        out["spectra"][spectrum] = {"seconds_per_layer": sec, "seconds_per_snapshot": sec * (s["n_layers"] + 1), "erank": erank.mean().item()}
    out["erank_abs_diff"] = abs(out["spectra"]["svd"]["erank"] - out["spectra"]["gram"]["erank"])
    out["gram_speedup"] = out["spectra"]["svd"]["seconds_per_layer"] / out["spectra"]["gram"]["seconds_per_layer"]
    out["ok"] = out["erank_abs_diff"] < 1e-6
    return out


def check_engines(device: torch.device, dry: bool) -> dict:
    from megatron_mgt.engine.fsdp import FSDPEngine
    from megatron_mgt.engine.single import SingleEngine

    s = shape("engines", dry)
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    tolerance = {"fp32": 1e-4, "bf16": 5e-2}
    out: dict = {"shape": s, "backend": "nccl" if device.type == "cuda" else "gloo", "runs": {}}
    for precision in precisions:
        cfg = model_config(s, "mgt", **{"train.precision": precision, "train.device": device.type, "parallel.backend": "auto"})
        gen = torch.Generator().manual_seed(3)
        batches = [synthetic_batch(cfg, gen, device) for _ in range(s["steps"])]
        losses = {}
        for name, cls in (("single", SingleEngine), ("fsdp", FSDPEngine)):
            engine = cls(cfg, device)
            losses[name] = [engine.train_step([batch]).loss for batch in batches]
            engine.close()
            del engine
        diff = max(abs(a - b) for a, b in zip(losses["single"], losses["fsdp"], strict=True))
        out["runs"][precision] = {**losses, "max_abs_diff": diff, "tolerance": tolerance[precision], "ok": diff <= tolerance[precision]}
    out["ok"] = all(r["ok"] for r in out["runs"].values())
    return out


# --- report ----------------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(report: dict) -> str:
    env = report["sections"].get("env", {}).get("result", {})
    lines = [
        "# GPU check",
        "",
        f"`bench/gpu_check.py{' --dry-run' if report['dry_run'] else ''}` on {env.get('device', '?')} (torch {env.get('torch', '?')}, "
        f"CUDA {env.get('cuda')}), {report['seconds']:.0f} s. Attention kernel: {env.get('attention_kernel', '?')}.",
        f"Optional packages: {', '.join(k + (' yes' if v else ' no') for k, v in env.get('optional_packages', {}).items())}.",
        "",
        "| section | status | seconds |",
        "|---|---|---|",
    ]
    for name, sec in report["sections"].items():
        lines.append(f"| {name} | {sec['status']} | {sec['seconds']:.1f} |")
    sec = report["sections"]
    if "result" in sec.get("attention", {}):
        lines += ["", "## Attention against fp32 math", "", "| kernel | max abs err | ok |", "|---|---|---|"]
        for name, r in sec["attention"]["result"]["kernels"].items():
            lines.append(f"| {name} | {_fmt(r.get('max_abs_err', r.get('skipped')))} | {_fmt(r.get('ok', '-'))} |")
    if "result" in sec.get("throughput", {}):
        res = sec["throughput"]["result"]
        lines += [
            "",
            f"## Throughput ({res['precision']}, single engine, {res['shape']})",
            "",
            "| variant | tokens/s | TFLOP/s | MFU | peak GiB |",
            "|---|---|---|---|---|",
        ]
        for name, r in res["variants"].items():
            lines.append(
                f"| {name} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {_fmt(r['mfu'])} | {_fmt(r.get('peak_mem_gib', '-'))} |"
            )
    if "result" in sec.get("activation_memory", {}):
        res = sec["activation_memory"]["result"]
        lines += [
            "",
            f"## Activation memory per block ({res['dtype']}, {res['shape']})",
            "",
            "| variant | measured MB | mgt-plan MB | ratio |",
            "|---|---|---|---|",
        ]
        for name, r in res["variants"].items():
            lines.append(f"| {name} | {_fmt(r['measured_mb_per_block'])} | {r['plan_mb_per_block']:.1f} | {_fmt(r['ratio'])} |")
    if "result" in sec.get("deep", {}):
        r = sec["deep"]["result"]
        lines += [
            "",
            f"## Deep model ({r['shape']['n_layers']} layers, d {r['shape']['d_model']}, {r['precision']}, checkpointing every block)",
            "",
            f"{r['steps_run']} steps in {r['seconds']:.0f} s ({r['tokens_per_s']:.0f} tokens/s): loss {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
            f"(uniform {r['loss_uniform']:.3f}), max grad norm {r['max_grad_norm']:.3g}, finite {r['finite']}, peak {_fmt(r.get('peak_mem_gib', '-'))} GiB.",
        ]
    if "result" in sec.get("engines", {}):
        res = sec["engines"]["result"]
        lines += [
            "",
            f"## Single vs FSDP (world size 1, {res['backend']})",
            "",
            "| precision | max abs loss diff | tolerance | ok |",
            "|---|---|---|---|",
        ]
        for name, r in res["runs"].items():
            lines.append(f"| {name} | {r['max_abs_diff']:.3g} | {r['tolerance']:g} | {r['ok']} |")
    if "result" in sec.get("telemetry", {}):
        res = sec["telemetry"]["result"]
        sh = res["shape"]
        lines += ["", f"## Telemetry spectrum per layer ([{sh['batch']}, {sh['seq_len']}, {sh['d_model']}], float64, centred erank)", "",
                  f"| eval.spectrum | s per layer | s per {sh['n_layers']}-layer snapshot (one rank) | erank |", "|---|---|---|---|"]
        for name, r in res["spectra"].items():
            lines.append(f"| {name} | {r['seconds_per_layer']:.3g} | {r['seconds_per_snapshot']:.3g} | {r['erank']:.6f} |")
        lines.append(f"\ngram / svd speed-up {res['gram_speedup']:.2f}x, erank difference {res['erank_abs_diff']:.2g}.")
    if "result" in sec.get("fused", {}):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_fused

        lines += ["", "## MGT at the cost of its FLOPs: eager, fused, recomputed, compiled (bench/bench_fused.py)", "",
                  bench_fused.format_table(sec["fused"]["result"]).strip()]
    for name, s in sec.items():
        if "error" in s:
            lines += ["", f"## {name}: {s['status']}", "", "```", s["error"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="output folder (default: $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, fp32: the same code path in under a minute")
    ap.add_argument("--only", default="", help="comma list of sections to run (default: all)")
    ap.add_argument("--deep-budget-s", type=float, default=150.0, help="stop the deep run after this many seconds")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    else:
        print("gpu_check: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    report: dict = {"dry_run": args.dry_run, "argv": sys.argv[1:], "sections": {}, "seconds": 0.0}
    t_start = time.perf_counter()

    def write() -> None:
        report["seconds"] = time.perf_counter() - t_start
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu_check.md").write_text(markdown(report))

    peak = None
    sections = {
        "env": lambda: check_env(device, args.dry_run),
        "attention": lambda: check_attention(device, args.dry_run),
        "throughput": lambda: check_throughput(device, args.dry_run, peak),
        "activation_memory": lambda: check_activation_memory(device, args.dry_run),
        "deep": lambda: check_deep(device, args.dry_run, args.deep_budget_s),
        "engines": lambda: check_engines(device, args.dry_run),
        "telemetry": lambda: check_telemetry(device, args.dry_run),
        "fused": lambda: check_fused(device, args.dry_run),
    }
    only = {s for s in args.only.split(",") if s} or set(sections)
    for name, run in sections.items():
        if name not in only and name != "env":
            continue
        t0 = time.perf_counter()
        try:
            result = run()
            status = "ok" if result.get("ok", True) else "mismatch"
            report["sections"][name] = {"status": status, "seconds": time.perf_counter() - t0, "result": result}
        except Exception as err:  # recorded, the next section still runs
            report["sections"][name] = {"status": "failed", "seconds": time.perf_counter() - t0, "error": traceback.format_exc(limit=6)}
            print(f"gpu_check: {name} failed: {err}", file=sys.stderr)
        if name == "env" and report["sections"][name]["status"] == "ok":
            peak = report["sections"]["env"]["result"]["peak_flops"]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write()
        print(f"gpu_check: {name}: {report['sections'][name]['status']} ({report['sections'][name]['seconds']:.1f} s)", flush=True)
    failed = [n for n, s in report["sections"].items() if s["status"] != "ok"]
    print(
        f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}; {'all ok' if not failed else 'not ok: ' + ', '.join(failed)}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
