"""Where one training step's time goes, per variant: torch.profiler's self CPU time of every
aten op, summed into categories (GEMM, attention kernel, norms, loss, optimizer, the rest:
elementwise and copies), side by side for every variant at the bench_model shape.

It answers what bench_model's tokens/s cannot: how much of a variant's step is work outside
the GEMMs (the part a fused or compiled region can cut), and so the most any such change could
gain. Each variant is built and profiled in turn in this process, after `--warmup` unprofiled
steps; the profiler's own overhead lands on every op alike.

    python bench/profile_step.py --variants preln,mgt,hf_llama --json docs/results/bench/profile_step_cpu.json
    python bench/profile_step.py --layers 2 --d-model 64 --vocab 256 --variants preln,mgt --steps 1 --warmup 1  # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import add_shape_arguments, bench_optimizer, build, check_in_process, check_variants  # noqa: E402

from megatron_mgt.config import ModelConfig  # noqa: E402
from megatron_mgt.model import lm_loss  # noqa: E402

# first matching rule wins; an op is matched by its aten name
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::_mkldnn")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("norm", ("layer_norm", "rms_norm", "_fused_rms_norm")),
    ("loss", ("cross_entropy", "CrossEntropy", "log_softmax", "nll_loss", "aten::_softmax", "aten::softmax")),
    ("copy/layout", ("aten::copy_", "aten::contiguous", "aten::clone", "aten::cat", "aten::_to_copy", "aten::to",
                     "aten::empty", "aten::zero_", "aten::fill_", "aten::zeros", "aten::ones", "aten::new_")),
]
OTHER = "elementwise/other"
PYTHON = "python"  # the self time of the phase markers themselves: Python and dispatch between ops
OPTIMIZER = "optimizer"  # every op under the optimizer step, whatever its name
PHASES = ("forward", "backward", OPTIMIZER)


def phase_of(event) -> str:
    """The step phase (a record_function label of PHASES) that encloses a profiler event."""
    while event is not None:
        if event.name in PHASES:
            return event.name
        event = event.cpu_parent
    return "unattributed"


def category(op: str) -> str:
    """The category of an aten op name (CATEGORIES, else elementwise/other)."""
    for name, patterns in CATEGORIES:
        if any(p in op for p in patterns):
            return name
    return OTHER


def profile_variant(variant: str, shape: ModelConfig, batch: int, steps: int, warmup: int, seed: int = 0) -> dict:
    """Self CPU seconds per category (mean over `steps` profiled training steps) and the top ops."""
    torch.manual_seed(seed)
    model, forward = build(variant, shape)
    model.train()
    optimizer = bench_optimizer(model)
    data = torch.randint(0, shape.vocab_size, (batch, shape.max_seq_len + 1), generator=torch.Generator().manual_seed(seed))
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def step() -> None:
        with record_function(PHASES[0]):
            loss = lm_loss(forward(inputs), targets)
        with record_function(PHASES[1]):
            loss.backward()
        with record_function(PHASES[2]):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    per_op: dict[str, float] = {}
    per_phase = dict.fromkeys(PHASES, 0.0)
    per_category = {name: 0.0 for name, _ in CATEGORIES} | {OTHER: 0.0, OPTIMIZER: 0.0, PYTHON: 0.0}
    for event in prof.events():  # self times partition the step: nothing is counted twice
        seconds = event.self_cpu_time_total / 1e6 / steps
        phase = phase_of(event)
        per_phase[phase] = per_phase.get(phase, 0.0) + seconds
        per_category[PYTHON if event.name in PHASES else OPTIMIZER if phase == PHASES[2] else category(event.name)] += seconds
        per_op[event.name] = per_op.get(event.name, 0.0) + seconds
    total = sum(per_category.values())
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    out = {"step_self_s": total, "phases_s": per_phase, "categories_s": per_category,
           "share": {k: v / total for k, v in per_category.items()}, "top_ops_s": dict(top)}
    return out


def format_table(results: dict[str, dict]) -> str:
    names = [name for name, _ in CATEGORIES] + [OTHER, OPTIMIZER, PYTHON]
    lines = ["| variant | step s (profiled) | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for variant, r in results.items():
        cells = [f"{r['categories_s'][n]:.3f} ({100 * r['share'][n]:.0f}%)" for n in names]
        lines.append(f"| {variant} | {r['step_self_s']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="preln,mgt,hf_llama", help="comma-separated: residual[+fused][+recompute][+compile] or hf_llama")
    add_shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0 keeps torch's default)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = check_in_process(parser, check_variants(parser, [v for v in args.variants.split(",") if v]))
    shape = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, max_seq_len=args.seq_len)
    results = {}
    for variant in variants:
        results[variant] = profile_variant(variant, shape, args.batch, args.steps, args.warmup)
        print(f"{variant}: {results[variant]['step_self_s']:.3f} s/step profiled; top ops: "
              + ", ".join(f"{k} {v:.3f}" for k, v in list(results[variant]["top_ops_s"].items())[:6]), flush=True)
    print(format_table(results))
    out = {"shape": vars(args) | {"ffn_dim": shape.ffn_dim}, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "load_avg_1min": os.getloadavg()[0], "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
