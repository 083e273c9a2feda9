"""mgt-compare's comparison at stated points: valid perplexity at fixed epoch counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_mgt.compare import at_epochs, steps_per_epoch
from megatron_mgt.data.indexed import IndexedDatasetWriter


def test_valid_at_fixed_epochs_and_best_epoch():
    valid = [{"step": s, "loss": loss} for s, loss in ((50, 4.0), (100, 3.0), (150, 2.5), (200, 2.7), (250, 2.9))]
    out = at_epochs(valid, per_epoch=100.0)
    # epoch 1 = step 100, epoch 2 = step 200; epoch 4 (step 400) lies beyond the run and is not reported
    assert out["valid_ppl_epoch_1"] == pytest.approx(math.exp(3.0)) and out["valid_ppl_epoch_2"] == pytest.approx(math.exp(2.7))
    assert "valid_ppl_epoch_4" not in out and out["best_valid_epoch"] == pytest.approx(1.5)
    assert at_epochs(valid, None) == {} and at_epochs([], 10.0) == {}


def test_steps_per_epoch_from_the_train_shard(tmp_path):
    with IndexedDatasetWriter(tmp_path / "train", np.uint16) as writer:
        writer.add_document(np.arange(1000, dtype=np.uint16) % 7)
    config = {"data": {"train_prefix": str(tmp_path / "train"), "seq_len": 10}, "train": {"micro_batch_size": 4, "grad_accum_steps": 5}}
    assert steps_per_epoch(config) == pytest.approx(1000 / 200)
    assert steps_per_epoch({"data": {"train_prefix": str(tmp_path / "missing")}, "train": {}}) is None
