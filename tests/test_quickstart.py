"""The README's first command, end to end at a tiny size: launch/quickstart.sh with the
real default corpus (downloaded once into the cache), tokenizer, shards, training, eval."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_end_to_end(tmp_path):
    env = dict(os.environ, MGT_VENV=sys.prefix, MGT_DATA=str(tmp_path / "data"), MGT_RUN=str(tmp_path / "run"), WANDB_MODE="disabled")
    tiny = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.seq_len=32", "train.max_steps=6",
            "train.eval_every=3", "train.eval_batches=2", "eval.batches=2", "log.every=1", "log.progress=false"]  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / "launch/quickstart.sh"), *tiny], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data, run = tmp_path / "data", tmp_path / "run"
    meta = json.loads((data / "meta.json").read_text())
    assert meta["train"]["tokens"] > 1_000_000 and meta["valid"]["tokens"] > 100_000
    assert "finished at step 6" in proc.stdout
    match = re.search(r"valid loss ([0-9.]+) nats/token", proc.stdout)
    assert match, proc.stdout
    assert "unigram entropy of the training tokens" in proc.stdout
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert abs(result["valid"]["loss"] - float(match.group(1))) < 1e-3
    assert len(result["geometry"]["erank"]) == 3  # embedding + 2 blocks
    for png in ("loss_curve.png", "erank_vs_depth.png", "beta_by_layer.png"):
        assert (run / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["libraries"]["torch"]
