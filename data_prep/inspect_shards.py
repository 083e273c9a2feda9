"""Summarise a ``.bin/.idx`` shard: counts, sizes, token statistics and a decoded sample."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from data_prep.tokenizer import Tokenizer
from megatron_mgt.data.indexed import IndexedDataset, bin_path, idx_path

_COUNT_CHUNK = 1 << 24


def token_counts(tokens: np.ndarray, vocab_size: int | None = None) -> np.ndarray:
    """Occurrences of every token id (length ``max(vocab_size, max id + 1)``), counted in chunks."""
    counts = np.zeros(vocab_size or 0, dtype=np.int64)
    for start in range(0, tokens.size, _COUNT_CHUNK):
        chunk = np.bincount(np.asarray(tokens[start : start + _COUNT_CHUNK]), minlength=counts.size)
        if chunk.size > counts.size:
            counts = np.pad(counts, (0, chunk.size - counts.size))
        counts += chunk
    return counts


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats/token of the empirical unigram distribution given by ``counts``."""
    total = counts.sum()
    if total == 0:
        raise ValueError("cannot compute the entropy of zero tokens")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
    """Nats/token of ``eval`` tokens under the add-one smoothed unigram model of ``train``."""
    size = max(train_counts.size, eval_counts.size)
    train = np.pad(train_counts, (0, size - train_counts.size)) + 1.0
    evals = np.pad(eval_counts, (0, size - eval_counts.size))
    if evals.sum() == 0:
        raise ValueError("cannot compute the cross-entropy of zero tokens")
    log_p = np.log(train / train.sum())
    return float(-(evals * log_p).sum() / evals.sum())


@dataclass(frozen=True)
class ShardSummary:
    """Statistics of one shard; ``sample`` is the decoded sample document if a tokenizer was given."""

    prefix: str
    dtype: str
    documents: int
    sequences: int
    tokens: int
    bin_bytes: int
    idx_bytes: int
    doc_tokens_min: int
    doc_tokens_median: float
    doc_tokens_mean: float
    doc_tokens_max: int
    distinct_tokens: int
    unigram_entropy_nats: float
    sample_index: int
    sample: str | None


def inspect_shard(path_prefix: str | os.PathLike, tokenizer_model: str | os.PathLike | None = None, sample_index: int = 0) -> ShardSummary:
    """Summarise a shard, decoding sequence ``sample_index`` when ``tokenizer_model`` is given."""
    dataset = IndexedDataset(path_prefix)
    if dataset.num_tokens == 0:
        raise ValueError(f"shard {dataset.path_prefix} holds no tokens")
    if not 0 <= sample_index < len(dataset):
        raise ValueError(f"--sample {sample_index} is out of range: {path_prefix} holds {len(dataset)} sequences (0..{len(dataset) - 1})")
    counts = token_counts(dataset.tokens)
    sample = Tokenizer(tokenizer_model).decode(dataset[sample_index]) if tokenizer_model else None
    return ShardSummary(
        prefix=dataset.path_prefix,
        dtype=str(dataset.dtype),
        documents=dataset.num_documents,
        sequences=len(dataset),
        tokens=dataset.num_tokens,
        bin_bytes=bin_path(path_prefix).stat().st_size,
        idx_bytes=idx_path(path_prefix).stat().st_size,
        doc_tokens_min=int(dataset.sizes.min()),
        doc_tokens_median=float(np.median(dataset.sizes)),
        doc_tokens_mean=float(dataset.sizes.mean()),
        doc_tokens_max=int(dataset.sizes.max()),
        distinct_tokens=int(np.count_nonzero(counts)),
        unigram_entropy_nats=unigram_entropy(counts),
        sample_index=sample_index,
        sample=sample,
    )


def format_summary(summary: ShardSummary, max_sample_chars: int = 1000) -> str:
    """Human-readable report of a :class:`ShardSummary`."""
    lines = [
        f"shard:      {summary.prefix}",
        f"dtype:      {summary.dtype}",
        f"documents:  {summary.documents:,}  (sequences {summary.sequences:,})",
        f"tokens:     {summary.tokens:,}  (distinct {summary.distinct_tokens:,})",
        f"files:      .bin {summary.bin_bytes:,} B, .idx {summary.idx_bytes:,} B",
        f"doc tokens: min {summary.doc_tokens_min:,}, median {summary.doc_tokens_median:,.0f}, "
        f"mean {summary.doc_tokens_mean:,.1f}, max {summary.doc_tokens_max:,}",
        f"unigram entropy: {summary.unigram_entropy_nats:.4f} nats/token",
    ]
    if summary.sample is not None:
        text = summary.sample
        cut = f"\n... ({len(text) - max_sample_chars:,} more chars)" if len(text) > max_sample_chars else ""
        lines.append(f"--- document {summary.sample_index} (decoded) ---\n{text[:max_sample_chars]}{cut}")
    return "\n".join(lines)
