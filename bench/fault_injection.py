"""Kill -9 campaign: a run killed again and again, many kills inside checkpoint writes, must
resume every time and end bit for bit where an uninterrupted run ends.

A tiny single-engine model (3 layers, d 32, vocab 256, 1 thread) on a synthetic Zipf shard,
checkpointing every step (`train.save_every=1`, keep 2) so that a large share of the run is
spent writing checkpoints. First an uninterrupted reference run, then the campaign on a second
run dir: start `python -m megatron_mgt.train`, wait until this process has moved the `latest`
pointer (it is past start-up and resume), then either sleep a random 0-0.4 s ("random") or
poll until a checkpoint temp dir exists ("in checkpoint"), and SIGKILL it; repeat `--kills`
times, then let the last process finish. Checks, all required to pass:

    every restart resumed (no trainer failed on its own), the final exit status is 0;
    the training and validation losses per step equal the reference's exactly, each step once;
    the final model.pt equals the reference's tensor for tensor;
    every checkpoint left verifies against its manifest; no temp dir or torn line is left.

    python bench/fault_injection.py --kills 40                  # docs/ROBUSTNESS.md has a result
    python bench/fault_injection.py --kills 200 --steps 1500 --out fi.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_mgt.checkpoint import find_checkpoint, verify_checkpoint  # noqa: E402
from megatron_mgt.data.indexed import IndexedDatasetWriter  # noqa: E402
from megatron_mgt.metrics import read_metrics  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled", OMP_NUM_THREADS="1")


def write_shard(prefix: Path, n_docs: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(n_docs):
            writer.add_document((rng.zipf(1.3, size=300) % 256).astype(np.uint16))


def overrides(data: Path, run_dir: Path, steps: int) -> list[str]:
    values = {
        "data.train_prefix": data / "train",
        "data.valid_prefix": data / "valid",
        "data.seq_len": 32,
        "model.vocab_size": 256,
        "model.n_layers": 3,
        "model.d_model": 32,
        "model.n_heads": 2,
        "train.micro_batch_size": 4,
        "train.max_steps": steps,
        "train.warmup_steps": 5,
        "train.eval_every": 25,
        "train.eval_batches": 2,
        "train.save_every": 1,
        "train.keep_checkpoints": 2,
        "train.threads": 1,
        "train.run_dir": run_dir,
        "log.every": 1,
        "log.wandb": "disabled",
        "log.progress": False,
        "log.geometry_every": 0,
    }
    return [f"{k}={v}" for k, v in values.items()]


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "megatron_mgt.train", *args], env=ENV, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def pointer(root: Path) -> str:
    try:
        return (root / "latest").read_text()
    except OSError:
        return ""


def temps(root: Path) -> list[str]:
    return [p.name for p in root.glob(".*.tmp")] if root.is_dir() else []


def campaign(args: list[str], run_dir: Path, kills: int, in_checkpoint_share: float, rng: random.Random) -> dict:
    """Kill the trainer `kills` times, then let it finish; the kill log and the final status."""
    root, log = run_dir / "checkpoints", run_dir.parent / f"{run_dir.name}.log"
    record = []
    while len(record) < kills:
        before = pointer(root)
        proc = start(args, log)
        while proc.poll() is None and pointer(root) == before:
            time.sleep(0.005)
        if proc.poll() is not None:
            if proc.returncode != 0:
                return {"kills": record, "failed": f"a trainer exited with {proc.returncode} on its own; see {log}"}
            break  # finished before the last kill
        mode = "in_checkpoint" if rng.random() < in_checkpoint_share else "random"
        if mode == "random":
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            deadline = time.monotonic() + 5
            while not temps(root) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.0005)
        proc.kill()
        proc.wait()
        record.append({"mode": mode, "temps_at_kill": temps(root), "latest": pointer(root).strip()})
    proc = start(args, log)
    return {"kills": record, "final_returncode": proc.wait()}


def compare(reference: Path, run_dir: Path) -> dict:
    """What the campaign's run dir holds against the reference's."""
    metrics = run_dir / "metrics.jsonl"
    out = {}
    for kind in ("train", "valid"):
        ref = [(r["step"], r["loss"]) for r in read_metrics(reference / "metrics.jsonl", kind)]
        got = [(r["step"], r["loss"]) for r in read_metrics(metrics, kind)]
        out[f"{kind}_losses_equal"] = ref == got
    a = torch.load(find_checkpoint(reference / "checkpoints", "auto") / "model.pt")
    b = torch.load(find_checkpoint(run_dir / "checkpoints", "auto") / "model.pt")
    out["final_weights_equal"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out["checkpoints_verify"] = all(verify_checkpoint(p) is None for p in (run_dir / "checkpoints").glob("step_*"))
    out["no_temps_left"] = not temps(run_dir / "checkpoints")
    out["metrics_end_whole"] = metrics.read_bytes().endswith(b"\n")
    events = read_metrics(metrics, "event")
    out["resumes"] = sum(e["event"] == "resumed" for e in events)
    out["stale_temps_removed"] = sum(len(e.get("removed_temps", [])) for e in events)
    out["damaged_checkpoints_passed_over"] = sum(len(e.get("rejected_checkpoints", [])) for e in events)
    out["torn_bytes_dropped"] = sum(e.get("torn_bytes_dropped", 0) for e in events)
    out["records_superseded"] = sum(e.get("records_superseded", 0) for e in events)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--steps", type=int, default=400, help="train.max_steps (enough that the kills come before the end)")
    parser.add_argument("--in-checkpoint", type=float, default=0.5, help="share of kills aimed inside a checkpoint write (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mgt-fault-") as tmp:
        work = Path(tmp)
        write_shard(work / "train", 64, seed=0)
        write_shard(work / "valid", 8, seed=1)
        reference = subprocess.run([sys.executable, "-m", "megatron_mgt.train", *overrides(work, work / "reference", args.steps)], env=ENV, cwd=REPO, capture_output=True, text=True)
        if reference.returncode != 0:
            print(reference.stderr, file=sys.stderr)
            return 1
        run_dir = work / "killed"
        result = campaign(overrides(work, run_dir, args.steps), run_dir, args.kills, args.in_checkpoint, random.Random(args.seed))
        kills = result.pop("kills")
        summary = {
            "kills": len(kills),
            "kills_inside_checkpoint_writes": sum(bool(k["temps_at_kill"]) for k in kills),
            "kills_by_mode": {m: sum(k["mode"] == m for k in kills) for m in ("random", "in_checkpoint")},
            **result,
        }
        if "failed" not in result:
            summary.update(compare(work / "reference", run_dir))
        checks = ("train_losses_equal", "valid_losses_equal", "final_weights_equal", "checkpoints_verify", "no_temps_left", "metrics_end_whole")
        summary["passed"] = result.get("final_returncode") == 0 and all(summary.get(c) for c in checks)
        summary["kills_survived"] = len(kills) if summary["passed"] else None
        summary["seconds"] = round(time.monotonic() - t0, 1)
        summary["command"] = " ".join(["python bench/fault_injection.py", *sys.argv[1:]])
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
