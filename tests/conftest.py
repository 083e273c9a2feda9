"""Shared fixtures: small token shards written to disk with the real writer."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_mgt.data.indexed import IndexedDatasetWriter

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_zipf_shard(prefix, n_docs: int, doc_len: int, vocab: int, seed: int) -> None:
    """Documents of Zipf-distributed token ids (a learnable, non-uniform distribution)."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(n_docs):
            writer.add_document((rng.zipf(1.3, size=doc_len) % vocab).astype(np.uint16))


@pytest.fixture(scope="session")
def zipf_shards(tmp_path_factory):
    """(train_prefix, valid_prefix) of a 256-token-vocabulary synthetic corpus."""
    root = tmp_path_factory.mktemp("zipf")
    write_zipf_shard(root / "train", n_docs=64, doc_len=300, vocab=256, seed=0)
    write_zipf_shard(root / "valid", n_docs=8, doc_len=300, vocab=256, seed=1)
    return str(root / "train"), str(root / "valid")


def tiny_overrides(train_prefix: str, valid_prefix: str, run_dir, **extra) -> list[str]:
    """Dotted overrides for a seconds-long CPU run."""
    base = {
        "data.train_prefix": train_prefix,
        "data.valid_prefix": valid_prefix,
        "data.seq_len": 32,
        "model.vocab_size": 256,
        "model.n_layers": 3,
        "model.d_model": 32,
        "model.n_heads": 2,
        "train.micro_batch_size": 4,
        "train.max_steps": 8,
        "train.warmup_steps": 2,
        "train.eval_every": 4,
        "train.eval_batches": 2,
        "train.save_every": 4,
        "train.run_dir": str(run_dir),
        "log.every": 1,
        "log.wandb": "disabled",
        "log.progress": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
