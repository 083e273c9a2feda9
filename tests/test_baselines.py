"""Count-based baselines (megatron_mgt.baselines) against hand-computed values."""

from __future__ import annotations

import math
from fractions import Fraction as F

import numpy as np
import pytest

from megatron_mgt import baselines
from megatron_mgt.data.indexed import IndexedDatasetWriter

# V = 4, D = 1/2. Train bigrams: (0,1) x2, (1,0), (1,2), (2,0): N1+(.,.) = 4 distinct.
TRAIN = np.array([0, 1, 0, 1, 2, 0])
EVAL = np.array([3, 0, 1, 2, 0])
V = 4
D = 0.5


def _p_cont() -> list[F]:
    # N1+(., w) = (2, 1, 1, 0) distinct predecessors, K = 3 words seen as successors:
    # P_cont(w) = (max(N1+(., w) - 1/2, 0) + (1/2) * 3 / 4) / 4
    n1 = [2, 1, 1, 0]
    return [(max(F(n) - F(1, 2), F(0)) + F(1, 2) * 3 * F(1, 4)) / 4 for n in n1]


def test_kn_continuation_hand_values() -> None:
    assert _p_cont() == [F(15, 32), F(7, 32), F(7, 32), F(3, 32)]
    probs = baselines.bigram_kn_prob(TRAIN, np.full(4, -1), np.arange(4), V, D)
    assert probs == pytest.approx([15 / 32, 7 / 32, 7 / 32, 3 / 32], abs=1e-15)


def test_kn_bigram_hand_values() -> None:
    pc = _p_cont()
    # c(v) = (2, 2, 1, 0) as predecessor, N1+(v, .) = (1, 2, 1, 0)
    # P(1|0) = (2 - 1/2) / 2 + (1/2) 1 / 2 * 7/32 = 103/128;  P(3|0) = 0 + (1/4) 3/32 = 3/128
    # P(2|1) = (1 - 1/2) / 2 + (1/2) 2 / 2 * 7/32 = 23/64;    P(0|2) = (1 - 1/2) / 1 + (1/2) * 15/32 = 47/64
    # context 3 never precedes anything in train: P(0|3) = P_cont(0) = 15/32
    expected = {(0, 1): F(103, 128), (0, 3): F(3, 128), (1, 2): F(23, 64), (2, 0): F(47, 64), (3, 0): F(15, 32)}
    assert expected[(0, 1)] == F(3, 4) + F(1, 4) * pc[1]
    prev, nxt = zip(*expected, strict=True)
    probs = baselines.bigram_kn_prob(TRAIN, np.array(prev), np.array(nxt), V, D)
    assert probs == pytest.approx([float(p) for p in expected.values()], abs=1e-15)
    # eval [3, 0, 1, 2, 0]: the first token has no context and gets P_cont(3) = 3/32
    nll = -(math.log(3 / 32) + math.log(15 / 32) + math.log(103 / 128) + math.log(23 / 64) + math.log(47 / 64)) / 5
    assert baselines.bigram_kn_nll(TRAIN, EVAL, V, D) == pytest.approx(nll, abs=1e-12)


def test_unigram_hand_value() -> None:
    # train counts (3, 2, 1, 0) of 6 tokens, add-one: (4, 3, 2, 1) / 10; eval [3, 0, 1, 2, 0]
    nll = -(math.log(1 / 10) + math.log(4 / 10) + math.log(3 / 10) + math.log(2 / 10) + math.log(4 / 10)) / 5
    assert baselines.unigram_nll(TRAIN, EVAL, V) == pytest.approx(nll, abs=1e-12)


@pytest.mark.parametrize("discount", [0.1, 0.75, 1.0])
def test_kn_rows_sum_to_one(discount: float) -> None:
    rng = np.random.default_rng(0)
    vocab = 12
    train = rng.integers(0, vocab - 2, size=300)  # the two top ids never occur: contexts and words unseen
    prev = np.repeat(np.arange(-1, vocab), vocab)
    nxt = np.tile(np.arange(vocab), vocab + 1)
    probs = baselines.bigram_kn_prob(train, prev, nxt, vocab, discount).reshape(vocab + 1, vocab)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert (probs > 0).all()


def test_bigram_beats_unigram_on_a_cycle() -> None:
    train, evals = np.tile(np.arange(8), 500), np.tile(np.arange(8), 50)
    unigram = baselines.unigram_nll(train, evals, 8)
    assert unigram == pytest.approx(math.log(8), abs=1e-3)
    assert baselines.bigram_kn_nll(train, evals, 8) < 0.01


def test_bigram_no_better_than_unigram_on_iid_tokens() -> None:
    rng = np.random.default_rng(1)
    train, evals = rng.integers(0, 16, size=50_000), rng.integers(0, 16, size=20_000)
    unigram = baselines.unigram_nll(train, evals, 16)
    bigram = baselines.bigram_kn_nll(train, evals, 16)
    assert unigram - 0.005 < bigram < unigram + 0.02


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="token id 7"):
        baselines.unigram_nll(TRAIN, np.array([7]), V)
    with pytest.raises(ValueError, match="token id -1"):
        baselines.bigram_kn_nll(np.array([0, -1, 2]), EVAL, V)
    with pytest.raises(ValueError, match="discount"):
        baselines.bigram_kn_nll(TRAIN, EVAL, V, discount=0.0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        baselines.bigram_kn_nll(np.array([1]), EVAL, V)
    with pytest.raises(ValueError, match="1-D integer"):
        baselines.unigram_nll(TRAIN.astype(float), EVAL, V)
    with pytest.raises(ValueError, match="prev"):
        baselines.bigram_kn_prob(TRAIN, np.array([-2]), np.array([0]), V)


def _write(prefix, docs: list[list[int]]) -> np.ndarray:
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in docs:
            writer.add_document(np.array(doc, dtype=np.uint16))
    return np.concatenate([np.array(doc) for doc in docs])


def test_ngram_baselines_on_shards(tmp_path) -> None:
    eos, vocab = 5, 6
    train = _write(tmp_path / "train", [[0, 1, 2, 3] * 6 + [eos] for _ in range(3)])
    valid = _write(tmp_path / "valid", [[0, 1, 2, 3, 0, 4, eos], [2, 3, 0, eos]])
    out = baselines.ngram_baselines(str(tmp_path / "train"), str(tmp_path / "valid"), vocab)
    assert out["train_tokens"] == 75 and out["valid_tokens"] == 11 and out["discount"] == 0.75
    assert out["unigram"] == pytest.approx(baselines.unigram_nll(train, valid, vocab), abs=1e-12)
    assert out["bigram_kn"] == pytest.approx(baselines.bigram_kn_nll(train, valid, vocab), abs=1e-12)
    assert out["bigram_kn"] < out["unigram"]
    # train unigram: 18 of each of 0..3 and 3 EOS in 75 tokens
    entropy = -(4 * (18 / 75) * math.log(18 / 75) + (3 / 75) * math.log(3 / 75))
    assert out["unigram_entropy"] == pytest.approx(entropy, abs=1e-12)
    head = baselines.ngram_baselines(str(tmp_path / "train"), str(tmp_path / "valid"), vocab, max_train_tokens=10)
    assert head["train_tokens"] == 10
    assert head["unigram"] == pytest.approx(baselines.unigram_nll(train[:10], valid, vocab), abs=1e-12)
    with pytest.raises(ValueError, match="token id 5"):
        baselines.ngram_baselines(str(tmp_path / "train"), str(tmp_path / "valid"), vocab_size=5)
    with pytest.raises(ValueError, match="max_train_tokens"):
        baselines.ngram_baselines(str(tmp_path / "train"), str(tmp_path / "valid"), vocab, max_train_tokens=1)


def test_context_label_names_the_seeds_that_do_not_beat_the_bigram() -> None:
    from megatron_mgt.experiments.arms import context_label

    b = {"unigram": 5.0, "bigram_kn": 3.5}
    assert context_label(3.6, b, {1: 3.0, 2: 4.2}) == "seed 2: no context learned"  # a bad mean from one seed
    assert context_label(3.7, b, {1: 3.5, 2: 3.9}) == "no context learned"
    assert context_label(3.6, b) == "no context learned"
    assert context_label(3.2, b, {1: 2.8, 2: 2.9, 3: 3.9}) == "seed 3: no context learned"
    assert context_label(3.4, b, {1: 3.5, 2: 3.5, 3: 3.2}) == "seeds 1, 2: no context learned"  # equal is not better
    assert context_label(3.0, b, {1: 3.0, 2: 3.1}) == ""
    assert context_label(3.0, b) == ""
    nan = float("nan")  # a diverged seed is named as diverged, not as a seed that learnt no context
    assert context_label(3.0, b, {1: 3.0, 2: nan}) == "seed 2: diverged"
    assert context_label(3.6, b, {1: 3.6, 2: nan, 3: nan}) == "seed 1: no context learned; seeds 2, 3: diverged"
    assert context_label(nan, b, {1: nan, 2: nan}) == "diverged" and context_label(nan, b) == "diverged"
