"""Count-based baselines of a language model's validation loss, in nats/token.

A model has learnt something beyond token frequencies only if it beats the unigram, and
something beyond adjacent-token statistics only if it beats the bigram. Token arrays are
1-D id arrays; every function treats each array as one token stream. The shards
concatenate documents with EOS tokens between them, so the bigrams that cross a document
boundary are (EOS, first token) pairs, which a model sees as well: no boundary handling is
needed. All counting is vectorised: a bigram (v, w) is the int64 code v * V + w.
"""

from __future__ import annotations

import os

import numpy as np

from data_prep.inspect_shards import token_counts, unigram_cross_entropy, unigram_entropy
from megatron_mgt.data.indexed import IndexedDataset

_MAX_VOCAB = 1 << 31  # keeps the pair code v * V + w inside int64


def _token_ids(tokens: np.ndarray, vocab_size: int, name: str, min_tokens: int = 1) -> np.ndarray:
    """tokens as int64 after checking: 1-D, integer, at least min_tokens, every id in [0, vocab_size)."""
    if not 1 <= vocab_size <= _MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [1, 2^31], got {vocab_size}")
    arr = np.asarray(tokens)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a 1-D integer token array, got shape {arr.shape} dtype {arr.dtype}")
    if arr.size < min_tokens:
        raise ValueError(f"{name} needs at least {min_tokens} tokens, got {arr.size}")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside [0, {vocab_size}) for vocab_size {vocab_size}")
    return arr.astype(np.int64, copy=False)


def unigram_nll(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """-(1/N) sum_i log P(w_i) over all N eval tokens, P(w) = (c(w) + 1) / (n + V) the add-one unigram of train."""
    train = _token_ids(train_tokens, vocab_size, "train_tokens")
    evals = _token_ids(eval_tokens, vocab_size, "eval_tokens")
    return unigram_cross_entropy(token_counts(train, vocab_size), token_counts(evals, vocab_size))


def bigram_kn_prob(train_tokens: np.ndarray, prev: np.ndarray, nxt: np.ndarray, vocab_size: int, discount: float = 0.75) -> np.ndarray:
    """P_KN(w | v) per (prev, nxt) pair under the interpolated Kneser-Ney bigram of train.

    With D = discount, c(v, w) the train bigram counts, c(v) = sum_w c(v, w), N1+(v, .) the
    distinct successors of v, N1+(., w) the distinct predecessors of w, N1+(., .) the
    distinct bigrams and K = #{w : N1+(., w) > 0}:

        P_KN(w | v) = max(c(v, w) - D, 0) / c(v) + D N1+(v, .) / c(v) * P_cont(w)
        P_cont(w)   = max(N1+(., w) - D, 0) / N1+(., .) + D K / N1+(., .) * 1 / V

    i.e. the continuation unigram is itself discounted by D and interpolated with the uniform
    1 / V with weight D K / N1+(., .), so a word never seen in train keeps a non-zero
    probability. A context v never seen in train (c(v) = 0), and prev = -1 (no context), get
    P_cont(w). Needs 0 < D <= 1; each context's probabilities sum to 1 over the vocabulary.
    """
    if not 0.0 < discount <= 1.0:
        raise ValueError(f"Kneser-Ney discount must be in (0, 1], got {discount}")
    train = _token_ids(train_tokens, vocab_size, "train_tokens", min_tokens=2)
    nxt = _token_ids(nxt, vocab_size, "nxt")
    prev = np.asarray(prev)
    if prev.shape != nxt.shape or prev.dtype.kind not in "iu" or int(prev.min()) < -1 or int(prev.max()) >= vocab_size:
        raise ValueError(
            f"prev must be integer ids in [-1, {vocab_size}) shaped like nxt {nxt.shape}, got shape {prev.shape} dtype {prev.dtype}"
        )
    prev = prev.astype(np.int64, copy=False)
    v = vocab_size
    codes, counts = np.unique(train[:-1] * v + train[1:], return_counts=True)
    context_count = np.bincount(codes // v, weights=counts, minlength=v)
    successors = np.bincount(codes // v, minlength=v)
    predecessors = np.bincount(codes % v, minlength=v)
    types = codes.size
    p_cont = (np.maximum(predecessors - discount, 0.0) + discount * np.count_nonzero(predecessors) / v) / types

    ctx = np.maximum(prev, 0)
    query = ctx * v + nxt
    pos = np.minimum(np.searchsorted(codes, query), types - 1)
    pair = np.where(codes[pos] == query, counts[pos], 0)
    seen = (prev >= 0) & (context_count[ctx] > 0)
    denom = np.where(seen, context_count[ctx], 1.0)
    p_seen = (np.maximum(pair - discount, 0.0) + discount * successors[ctx] * p_cont[nxt]) / denom
    return np.where(seen, p_seen, p_cont[nxt])


def bigram_kn_nll(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int, discount: float = 0.75) -> float:
    """-(1/N) sum_i log P_KN(w_i | w_{i-1}) over all N eval tokens (bigram_kn_prob).

    Every eval token is scored, like unigram_nll: the first has no predecessor and gets the
    no-context probability P_cont(w_1).
    """
    evals = _token_ids(eval_tokens, vocab_size, "eval_tokens")
    prev = np.concatenate([np.array([-1], dtype=np.int64), evals[:-1]])
    return float(-np.log(bigram_kn_prob(train_tokens, prev, evals, vocab_size, discount)).mean())


def ngram_baselines(
    train_prefix: str | os.PathLike,
    valid_prefix: str | os.PathLike,
    vocab_size: int,
    max_train_tokens: int | None = None,
    discount: float = 0.75,
) -> dict:
    """Unigram and Kneser-Ney bigram nats/token of the valid shard under models of the train shard.

    The first max_train_tokens train tokens are used (all if None); every valid token is
    scored. Returns {"unigram", "bigram_kn", "unigram_entropy" (of the train unigram, nats),
    "train_tokens", "valid_tokens", "discount"}.
    """
    if max_train_tokens is not None and max_train_tokens < 2:
        raise ValueError(f"max_train_tokens must be >= 2 or None, got {max_train_tokens}")
    train = IndexedDataset(train_prefix).tokens[:max_train_tokens]
    valid = IndexedDataset(valid_prefix).tokens
    train_ids = _token_ids(train, vocab_size, f"train shard {train_prefix}", min_tokens=2)
    valid_ids = _token_ids(valid, vocab_size, f"valid shard {valid_prefix}")
    return {
        "unigram": unigram_nll(train_ids, valid_ids, vocab_size),
        "bigram_kn": bigram_kn_nll(train_ids, valid_ids, vocab_size, discount),
        "unigram_entropy": unigram_entropy(token_counts(train_ids, vocab_size)),
        "train_tokens": int(train_ids.size),
        "valid_tokens": int(valid_ids.size),
        "discount": discount,
    }
