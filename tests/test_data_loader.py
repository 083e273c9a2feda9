"""Tests for the deterministic, resumable token batch loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_mgt.data.indexed import IndexedDatasetWriter
from megatron_mgt.data.loader import TokenBatchLoader, eval_batches

SEQ_LEN = 8


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    """A shard whose token stream is 0, 1, 2, ... so windows are easy to check."""
    prefix = tmp_path / "train"
    stream = np.arange(1001)
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        for doc in np.split(stream, [100, 350, 351, 800]):
            writer.add_document(doc)
    return prefix


def _batches(loader: TokenBatchLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def test_batch_shapes_and_shift(shard: Path) -> None:
    inputs, targets = TokenBatchLoader(shard, SEQ_LEN, 4, seed=0).next_batch()
    assert inputs.shape == targets.shape == (4, SEQ_LEN)
    assert inputs.dtype == targets.dtype == torch.int64
    torch.testing.assert_close(targets, inputs + 1)  # the stream is 0, 1, 2, ...
    assert torch.all(inputs[:, 0] % SEQ_LEN == 0)  # windows start at multiples of seq_len


def test_one_epoch_covers_every_window_once(shard: Path) -> None:
    loader = TokenBatchLoader(shard, SEQ_LEN, 5, seed=3)
    assert loader.num_windows == 1000 // SEQ_LEN == 125
    starts = torch.cat([loader.next_batch()[0][:, 0] for _ in range(25)])
    assert sorted(starts.tolist()) == list(range(0, 1000, SEQ_LEN))
    assert starts.tolist() != sorted(starts.tolist())  # shuffled
    assert loader.epoch == 1


def test_epochs_use_different_permutations(shard: Path) -> None:
    loader = TokenBatchLoader(shard, SEQ_LEN, 125, seed=3)
    first, second = loader.next_batch()[0], loader.next_batch()[0]
    assert sorted(first[:, 0].tolist()) == sorted(second[:, 0].tolist())
    assert not torch.equal(first, second)


def test_unshuffled_is_sequential(shard: Path) -> None:
    inputs, _ = TokenBatchLoader(shard, SEQ_LEN, 3, seed=0, shuffle=False).next_batch()
    assert inputs[:, 0].tolist() == [0, 8, 16]


def test_same_seed_same_batches_other_seed_differs(shard: Path) -> None:
    a = _batches(TokenBatchLoader(shard, SEQ_LEN, 4, seed=7), 5)
    b = _batches(TokenBatchLoader(shard, SEQ_LEN, 4, seed=7), 5)
    c = _batches(TokenBatchLoader(shard, SEQ_LEN, 4, seed=8), 5)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("k", [1, 30, 31, 40])  # 31 steps * 4 crosses the epoch boundary (125 windows)
def test_resume_matches_uninterrupted(shard: Path, k: int) -> None:
    reference = _batches(TokenBatchLoader(shard, SEQ_LEN, 4, seed=11), k + 5)
    interrupted = TokenBatchLoader(shard, SEQ_LEN, 4, seed=11)
    _batches(interrupted, k)
    state = interrupted.state_dict()
    assert state == {"consumed_samples": 4 * k}
    resumed = TokenBatchLoader(shard, SEQ_LEN, 4, seed=11)
    resumed.load_state_dict(state)
    for expected, got in zip(reference[k:], _batches(resumed, 5), strict=True):
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def test_rank_slices_partition_global_batch(shard: Path) -> None:
    world = 3
    single = TokenBatchLoader(shard, SEQ_LEN, 2 * world, seed=5)
    ranks = [TokenBatchLoader(shard, SEQ_LEN, 2, seed=5, rank=r, world_size=world) for r in range(world)]
    for _ in range(50):  # crosses epoch boundaries
        global_inputs, _ = single.next_batch()
        per_rank = torch.cat([loader.next_batch()[0] for loader in ranks])
        assert torch.equal(global_inputs, per_rank)
    assert all(loader.consumed_samples == single.consumed_samples == 300 for loader in ranks)


def test_bad_state_and_arguments(shard: Path) -> None:
    loader = TokenBatchLoader(shard, SEQ_LEN, 4, seed=0)
    with pytest.raises(KeyError, match="consumed_samples"):
        loader.load_state_dict({"consumed": 3})
    with pytest.raises(ValueError, match="non-negative"):
        loader.load_state_dict({"consumed_samples": -1})
    with pytest.raises(ValueError, match="rank"):
        TokenBatchLoader(shard, SEQ_LEN, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TokenBatchLoader(shard, SEQ_LEN, 0, seed=0)


def test_shard_shorter_than_one_window(tmp_path: Path) -> None:
    with IndexedDatasetWriter(tmp_path / "tiny", np.uint16) as writer:
        writer.add_document(np.arange(8))
    with pytest.raises(ValueError, match=r"tiny has 8 tokens, fewer than one window of seq_len \+ 1 = 9"):
        TokenBatchLoader(tmp_path / "tiny", 8, 1, seed=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_batches(tmp_path / "tiny", 8, 1)
    assert len(list(eval_batches(tmp_path / "tiny", 7, 1))) == 1


def test_eval_batches_sequential_and_complete(shard: Path) -> None:
    batches = list(eval_batches(shard, SEQ_LEN, 16))
    assert [b[0].shape[0] for b in batches] == [16] * 7 + [13]
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    torch.testing.assert_close(inputs.flatten(), torch.arange(1000))
    torch.testing.assert_close(targets.flatten(), torch.arange(1, 1001))
    assert len(list(eval_batches(shard, SEQ_LEN, 16, max_batches=2))) == 2
