"""train.cpu_malloc A/B: bench/bench_model.py's round-robin with glibc malloc left alone
(`default`) and tuned (`keep`, engine/host_memory.py), each run in its own process, the two
modes alternating pair after pair (the order flipped every pair) so drift lands on both.

Per pair it prints each model's median step; at the end the seed-paired mean speed-up
default / keep per model and of mgt / preln tokens/s, with t intervals over the pairs
(megatron_mgt/stats.py), and writes them to --json.

    python bench/bench_host_malloc.py --pairs 3 --json docs/results/bench/bench_host_malloc_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_mgt.stats import t_interval  # noqa: E402

MODES = ("default", "keep")


def one_run(mode: str, variants: str, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(REPO / "bench" / "bench_model.py"), "--variants", variants, "--no-hf", "--steps", str(steps),
               "--warmup", "2", "--threads", str(threads), "--peak-seconds", "0.5", "--cpu-malloc", mode, "--json", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench_model failed ({mode}):\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--variants", default="preln,mgt")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    runs = []
    for pair in range(args.pairs):
        for mode in MODES if pair % 2 == 0 else MODES[::-1]:
            out = one_run(mode, args.variants, args.steps, args.threads)
            step = {v: out["results"][v]["step_s_median"] for v in variants}
            runs.append({"pair": pair, "mode": mode, "applied": out["cpu_malloc"], "step_s_median": step})
            print(f"pair {pair + 1}/{args.pairs} {mode:7s} ({out['cpu_malloc']}): " + ", ".join(f"{v} {s:.3f}s" for v, s in step.items()), flush=True)
    by = {(r["pair"], r["mode"]): r["step_s_median"] for r in runs}
    speedup = {v: t_interval([by[(p, "default")][v] / by[(p, "keep")][v] for p in range(args.pairs)]) for v in variants}
    summary = {"speedup_default_over_keep": speedup}
    if {"mgt", "preln"} <= set(variants):
        ratio = {m: [by[(p, m)]["preln"] / by[(p, m)]["mgt"] for p in range(args.pairs)] for m in MODES}
        summary["mgt_over_preln_tokens_per_s"] = {m: t_interval(v) for m, v in ratio.items()}
    for v, ci in speedup.items():
        print(f"{v}: step time default / keep {ci['mean']:.3f} [{ci['ci'][0]:.3f}, {ci['ci'][1]:.3f}] over {ci['n']} pairs")
    for m, ci in summary.get("mgt_over_preln_tokens_per_s", {}).items():
        print(f"mgt / preln tokens/s, {m}: {ci['mean']:.3f} [{ci['ci'][0]:.3f}, {ci['ci'][1]:.3f}]")
    result = {"args": vars(args), "runs": runs, **summary}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
