"""Shared fixtures and helpers: small token shards written to disk with the real writer, the
tiny model of the model-level tests (V, D, HEADS, T, B; `tiny_config`, `tokens`), random
parameters and sublayers for hand-written equations, and a model cut into pipeline stages.

Test modules import the helpers as `from conftest import tiny_config, ...` (pytest puts
tests/ on sys.path for this rootdir conftest)."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch

from megatron_mgt.config import ModelConfig
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


@pytest.fixture(autouse=True, scope="session")
def private_cache_home(tmp_path_factory):
    """Training runs remember the CPU peak under $XDG_CACHE_HOME (flops.remembered_cpu_peak):
    the suite's runs, subprocesses included, keep theirs out of the user's cache."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache_home"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


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


# --- the tiny model of the model-level tests ------------------------------------------

V, D, HEADS, T, B = 64, 32, 2, 16, 2  # vocabulary, width, heads, positions, batch


def tiny_config(residual: str, n_layers: int, **kw) -> ModelConfig:
    """A V-token, D-wide, HEADS-head model over T positions; depth and knobs from the caller."""
    return ModelConfig(vocab_size=V, d_model=D, n_layers=n_layers, n_heads=HEADS, max_seq_len=T, residual=residual, **kw)


def tokens(seed: int = 0, batch: int = B) -> torch.Tensor:
    """[batch, T + 1] token ids below V: inputs [:, :-1], targets [:, 1:]."""
    return torch.randint(0, V, (batch, T + 1), generator=torch.Generator().manual_seed(seed))


def randomise_(tensor: torch.Tensor, gen: torch.Generator, scale: float = 1.0, shift: float = 0.0) -> None:
    """Overwrite a parameter in place with N(shift, scale^2) draws from `gen`."""
    with torch.no_grad():
        tensor.copy_(torch.randn(tensor.shape, generator=gen) * scale + shift)


def make_sublayer(gen: torch.Generator):
    """A fixed nonlinear F: R^D -> R^D and the list of the inputs it was called with."""
    w1 = torch.randn(D, 2 * D, generator=gen) / math.sqrt(D)
    w2 = torch.randn(2 * D, D, generator=gen) / math.sqrt(2 * D)
    seen: list[torch.Tensor] = []

    def sublayer(h: torch.Tensor) -> torch.Tensor:
        seen.append(h)
        return torch.tanh(h @ w1) @ w2

    return sublayer, seen


def pipeline_stages(model, cut: int):
    """`model` as two pipeline stages, deep copies cut before block `cut`: the first holds the
    embedding and blocks [0, cut), the last blocks [cut, n_layers), the final norm and the head.
    last(first(x)) is the full model's forward."""
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    for i in range(cut, len(model.layers)):
        del first.layers[str(i)]
    first.norm = first.head = None
    for i in range(cut):
        del last.layers[str(i)]
    last.embed = None
    return first, last
