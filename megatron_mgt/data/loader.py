"""Deterministic, resumable token batches from a ``.bin/.idx`` shard.

The shard's token stream (documents already end with EOS) is cut into
non-overlapping windows of ``seq_len + 1`` tokens with stride ``seq_len``;
window ``w`` covers tokens ``[w * seq_len, w * seq_len + seq_len]``, so inputs
and targets of neighbouring windows tile the stream exactly once.

Sample ``s`` (a global counter over all ranks) is window ``perm_e[s % W]`` of
epoch ``e = s // W``, where ``perm_e`` is a permutation drawn from a numpy
Generator seeded with ``(seed, e)``. A global step takes ``batch_size *
world_size`` consecutive samples and rank ``r`` keeps the ``r``-th slice of
``batch_size``. The resume state is just ``consumed_samples``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from megatron_mgt.data.indexed import IndexedDataset


def _window_count(dataset: IndexedDataset, seq_len: int) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    count = (dataset.num_tokens - 1) // seq_len
    if count < 1:
        raise ValueError(
            f"shard {dataset.path_prefix} has {dataset.num_tokens} tokens, fewer than one window of seq_len + 1 = {seq_len + 1} tokens"
        )
    return count


def _gather(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows ``[B, seq_len + 1]`` as int64 (inputs, targets) tensors."""
    offsets = windows.astype(np.int64)[:, None] * seq_len + np.arange(seq_len + 1, dtype=np.int64)
    block = torch.from_numpy(np.asarray(tokens[offsets], dtype=np.int64))
    return block[:, :-1].contiguous(), block[:, 1:].contiguous()


class TokenBatchLoader:
    """Shuffled (or sequential) training batches; see the module docstring for the sample order."""

    def __init__(
        self,
        path_prefix: str | os.PathLike,
        seq_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.dataset = IndexedDataset(path_prefix)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.num_windows = _window_count(self.dataset, seq_len)
        self.consumed_samples = 0
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be drawn."""
        return self.consumed_samples // self.num_windows

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if set(state) != {"consumed_samples"}:
            raise KeyError(f"loader state must have exactly the key 'consumed_samples', got {sorted(state)}")
        consumed = state["consumed_samples"]
        if isinstance(consumed, bool) or not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"consumed_samples must be a non-negative int, got {consumed!r}")
        self.consumed_samples = consumed

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = {epoch: rng.permutation(self.num_windows)}
        return self._perm_cache[epoch]

    def _windows(self, samples: np.ndarray) -> np.ndarray:
        if not self.shuffle:
            return samples % self.num_windows
        epochs = samples // self.num_windows
        positions = samples % self.num_windows
        windows = np.empty_like(samples)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            windows[mask] = self._permutation(int(epoch))[positions[mask]]
        return windows

    def skip(self, steps: int = 1) -> None:
        """Leave out the next `steps` global batches (the data order of the rest is unchanged)."""
        self.consumed_samples += steps * self.global_batch_size

    def batch_windows(self, position: int) -> np.ndarray:
        """Window indices of this rank's batch of the global step that starts at sample `position`."""
        start = position + self.rank * self.batch_size
        return self._windows(np.arange(start, start + self.batch_size, dtype=np.int64))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(inputs, targets)``, each int64 ``[batch_size, seq_len]``; advances one global step."""
        batch = _gather(self.dataset.tokens, self.batch_windows(self.consumed_samples), self.seq_len)
        self.consumed_samples += self.global_batch_size
        return batch


def check_token_ids(tokens: torch.Tensor, vocab_size: int, source: str | os.PathLike) -> None:
    """Every id in `tokens` must index the model's embedding: max(tokens) < vocab_size."""
    top = int(tokens.max()) if tokens.numel() else -1
    if top >= vocab_size:
        raise ValueError(f"{source}: token id {top} does not fit model.vocab_size={vocab_size} (was the shard made with another tokenizer?)")


def eval_batches(
    path_prefix: str | os.PathLike, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential, unshuffled ``(inputs, targets)`` windows; the last batch may be smaller.

    Arguments and the shard are validated on call, before iteration starts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 or None, got {max_batches}")
    dataset = IndexedDataset(path_prefix)
    num_windows = _window_count(dataset, seq_len)
    starts = range(0, num_windows, batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    return (_gather(dataset.tokens, np.arange(start, min(start + batch_size, num_windows)), seq_len) for start in starts)


def spread_windows(path_prefix: str | os.PathLike, seq_len: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` windows spread evenly over the whole shard (window i starts at window index
    floor(i * N / count) of its N non-overlapping windows): a probe of the whole split, not
    of its first pages. Fewer when the shard has fewer windows."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    dataset = IndexedDataset(path_prefix)
    n = _window_count(dataset, seq_len)
    return _gather(dataset.tokens, np.unique(np.arange(count, dtype=np.int64) * n // count), seq_len)


def scoring_windows(
    path_prefix: str | os.PathLike, seq_len: int, batch_size: int, stride: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(inputs, targets)`` [B, seq_len] that score every token of a shard exactly once.

    The stream is ``[EOS] + tokens`` (every document ends with EOS, so the shard's last token
    is the EOS id, and the first token gets the same context a document start has). Windows
    start every ``stride`` tokens (0: ``seq_len``, non-overlapping); a window scores only the
    targets the previous one did not, so with ``stride < seq_len`` every scored token after
    the first window has at least ``seq_len - stride`` tokens of context. Unscored targets
    and the padding of a short last window are -100 (``ignore_index``)."""
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}] (or 0 for seq_len), got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens = IndexedDataset(path_prefix).tokens
    if tokens.size == 0:
        raise ValueError(f"shard {path_prefix} has no tokens")
    n = int(tokens.size)
    stream = np.concatenate([np.asarray(tokens[-1:], dtype=np.int64), np.asarray(tokens, dtype=np.int64)])  # [n + 1]
    rows_in: list[np.ndarray] = []
    rows_tg: list[np.ndarray] = []
    begin, scored_until = 0, 0  # targets stream[1 .. scored_until] are done
    while scored_until < n:
        end = min(begin + seq_len, n)  # inputs stream[begin:end], targets stream[begin + 1:end + 1]
        inputs = np.zeros(seq_len, dtype=np.int64)
        targets = np.full(seq_len, -100, dtype=np.int64)
        inputs[: end - begin] = stream[begin:end]
        first_new = scored_until - begin  # offset of the first target not yet scored
        targets[first_new : end - begin] = stream[begin + 1 + first_new : end + 1]
        rows_in.append(inputs)
        rows_tg.append(targets)
        scored_until = end
        begin += stride
        if len(rows_in) == batch_size or scored_until >= n:
            yield torch.from_numpy(np.stack(rows_in)), torch.from_numpy(np.stack(rows_tg))
            rows_in, rows_tg = [], []
