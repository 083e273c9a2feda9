"""Rank metrics that tell collapse from round-off (megatron_mgt.geometry, issue 14) on constructed matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_mgt import geometry as geo

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _known_spectrum(t: int, d: int, s: list[float], seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with U's columns orthonormal and orthogonal to the all-ones vector (centring is a no-op)."""
    k = len(s)
    q, _ = torch.linalg.qr(torch.cat([torch.ones(t, 1, dtype=F64), torch.randn(t, k, generator=_gen(seed), dtype=F64)], dim=1))
    u = q[:, 1 : k + 1]
    v, _ = torch.linalg.qr(torch.randn(d, k, generator=_gen(seed + 1), dtype=F64))
    return u @ torch.diag(torch.tensor(s, dtype=F64)) @ v.T


def _collapsed_float32(windows: int, t: int, d: int, seed: int = 0) -> torch.Tensor:
    """Every token of a window equal to one g up to float32 round-off: (g (1 + 1e-7 z)) rounded to float32."""
    g = torch.randn(windows, 1, d, generator=_gen(seed), dtype=F64)
    z = torch.randn(windows, t, d, generator=_gen(seed + 1), dtype=F64)
    return (g * (1 + 1e-7 * z)).to(torch.float32)


def test_known_singular_values_hand_computed() -> None:
    # s = (4, 2, 1, 1), T = 6, d = 4, min(T, d) = 4.
    # erank: p = (1/2, 1/4, 1/8, 1/8), H = (1/2) ln 2 + (1/4) ln 4 + 2 (1/8) ln 8 = (7/4) ln 2, erank = 2^(7/4).
    # stable rank: (16 + 4 + 1 + 1) / 16 = 22/16.  participation ratio: 22^2 / (256 + 16 + 1 + 1) = 484/274.
    x = _known_spectrum(6, 4, [4.0, 2.0, 1.0, 1.0])
    for center in (False, True):
        torch.testing.assert_close(geo.singular_spectrum(x, center), torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=F64))
        assert geo.effective_rank_tol(x, center).item() == pytest.approx(2 ** (7 / 4) / 4, abs=1e-12)
        assert geo.stable_rank(x, center).item() == pytest.approx(22 / 16 / 4, abs=1e-12)
        assert geo.participation_ratio(x, center).item() == pytest.approx(484 / 274 / 4, abs=1e-12)


def test_spectrum_shape_is_batched_min_t_d() -> None:
    x = torch.randn(3, 2, 7, 5, generator=_gen(0))
    assert geo.singular_spectrum(x, center=True).shape == (3, 2, 5)
    assert geo.effective_rank_tol(x, center=True).shape == (3, 2)
    assert geo.singular_spectrum(x, center=True).dtype == F64


def test_identical_tokens_exact_rank_one() -> None:
    g = torch.randn(1, 4, generator=_gen(0), dtype=F64)
    x = torch.ones(6, 1, dtype=F64) @ g  # T = 6 identical tokens, d = 4
    for fn in (geo.effective_rank_tol, geo.stable_rank, geo.participation_ratio):
        assert fn(x, center=True).item() == 0.0  # centred: nothing left
        assert fn(x, center=False).item() == pytest.approx(1 / 4, abs=1e-12)  # rank 1 of min(T, d) = 4


def test_rank_one_uncentred_is_one_over_min_t_d() -> None:
    a = torch.randn(10, 1, generator=_gen(1), dtype=F64)
    b = torch.randn(1, 6, generator=_gen(2), dtype=F64)
    for fn in (geo.effective_rank_tol, geo.stable_rank, geo.participation_ratio):
        assert fn(a @ b, center=False).item() == pytest.approx(1 / 6, abs=1e-12)


def test_rank_one_plus_noise_above_and_below_tolerance() -> None:
    t, d = 32, 16
    signal = torch.randn(t, 1, generator=_gen(3), dtype=F64) @ torch.randn(1, d, generator=_gen(4), dtype=F64)
    noise = torch.randn(t, d, generator=_gen(5), dtype=F64)
    scale = torch.linalg.matrix_norm(signal, ord=2).item()
    # noise singular values ~ eps sqrt(T): with eps = 1e-2 * s_max / sqrt(T d) about 1e-2 s_max / 4, far above rel_tol = 1e-4
    loud = signal + 1e-2 * scale / math.sqrt(t * d) * noise
    assert geo.stable_rank(loud, center=False).item() == pytest.approx(1 / d, rel=0.01)
    erank = geo.effective_rank_tol(loud, center=False).item()
    assert 1 / d + 0.005 < erank < 0.2  # the noise is counted, but the matrix reads nearly rank 1
    # noise at 1e-8 of s_max sits below rel_tol: exactly rank 1, where the old eps-based tolerance keeps it
    quiet = signal + 1e-8 * scale / math.sqrt(t * d) * noise
    assert geo.effective_rank_tol(quiet, center=False).item() == pytest.approx(1 / d, abs=1e-12)
    assert geo.effective_rank(quiet, center=False).item() > 1 / d + 1e-9  # kept, if tiny


def test_float32_collapsed_stream_reads_zero_not_round_off() -> None:
    x = _collapsed_float32(windows=4, t=64, d=32)
    assert (x != x[:, :1]).any()  # tokens differ, at round-off level
    old = geo.effective_rank(x, center=True)
    assert (old > 0.3).all()  # the eps-based tolerance measures the round-off as rank
    new = geo.effective_rank_tol(x, center=True)
    torch.testing.assert_close(new, torch.zeros(4, dtype=F64))
    torch.testing.assert_close(geo.stable_rank(x, center=True), torch.zeros(4, dtype=F64))
    torch.testing.assert_close(geo.participation_ratio(x, center=True), torch.zeros(4, dtype=F64))
    torch.testing.assert_close(geo.effective_rank_tol(x, center=False), torch.full((4,), 1 / 32, dtype=F64))


def test_rel_tol_validated() -> None:
    with pytest.raises(ValueError, match="rel_tol"):
        geo.effective_rank_tol(torch.ones(3, 3), center=True, rel_tol=1.5)


def test_layer_norm_rows_hand_values_and_invariance() -> None:
    # row [1, 2, 3]: mean 2, biased variance 2/3, so LN = [-1, 0, 1] / sqrt(2/3)
    out = geo.layer_norm_rows(torch.tensor([[1.0, 2.0, 3.0]]), eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 1.0]], dtype=F64) / math.sqrt(2 / 3))
    x = torch.randn(2, 5, 8, generator=_gen(6), dtype=F64)
    shifted = 3.0 * x + 7.0
    torch.testing.assert_close(geo.layer_norm_rows(shifted, eps=0.0), geo.layer_norm_rows(x, eps=0.0))
    ln = geo.layer_norm_rows(x)
    torch.testing.assert_close(ln.mean(dim=-1), torch.zeros(2, 5, dtype=F64))
    torch.testing.assert_close(ln.var(dim=-1, correction=0), x.var(dim=-1, correction=0) / (x.var(dim=-1, correction=0) + 1e-5))
    with pytest.raises(ValueError, match="eps"):
        geo.layer_norm_rows(x, eps=-1.0)


def test_rank_profile_flags_collapse_and_intervals() -> None:
    b, t, d = 5, 16, 8
    healthy = torch.randn(b, t, d, generator=_gen(7))
    collapsed = _collapsed_float32(b, t, d, seed=8)
    scales = 1 + 2 * torch.rand(b, t, 1, generator=_gen(9), dtype=F64)  # x_i = c_i g, c_i in [1, 3]: LN(X) collapses
    scaled = scales * torch.randn(b, 1, d, generator=_gen(10), dtype=F64)
    prof = geo.rank_profile([healthy, collapsed, scaled])
    assert prof["collapsed"] == [False, True, True]
    assert prof["windows"] == [5, 5, 5]
    assert prof["centered"] is True and prof["rel_tol"] == 1e-4
    names = {
        "erank_tol",
        "stable_rank",
        "participation_ratio",
        "token_cosine",
        "relative_residual",
        "ln_erank_tol",
        "ln_stable_rank",
        "ln_participation_ratio",
    }
    assert set(prof["metrics"]) == names
    m = prof["metrics"]
    assert m["erank_tol"]["mean"][1] == pytest.approx(0.0, abs=1e-12)
    assert m["erank_tol"]["mean"][2] == pytest.approx(1 / d, abs=1e-12)  # (c_i - cbar) g: rank 1
    assert m["ln_erank_tol"]["mean"][2] == pytest.approx(0.0, abs=1e-12)  # the next sublayer sees one token
    # interval over the 5 windows: mean -+ t_{0.975, 4} s / sqrt(5), t_{0.975, 4} = 2.7764
    per_window = geo.effective_rank_tol(healthy, center=True)
    half = 2.7764 * per_window.std().item() / math.sqrt(b)
    assert m["erank_tol"]["mean"][0] == pytest.approx(per_window.mean().item(), abs=1e-12)
    assert m["erank_tol"]["ci_low"][0] == pytest.approx(per_window.mean().item() - half, abs=1e-4)
    assert m["erank_tol"]["ci_high"][0] == pytest.approx(per_window.mean().item() + half, abs=1e-4)


def test_rank_profile_single_window_and_errors() -> None:
    prof = geo.rank_profile([torch.randn(6, 4, generator=_gen(11))])
    assert prof["windows"] == [1]
    assert math.isnan(prof["metrics"]["stable_rank"]["ci_low"][0])
    with pytest.raises(ValueError, match="at least one layer"):
        geo.rank_profile([])


def test_gaussian_reference_matches_marchenko_pastur() -> None:
    # Square iid N(0, 1): singular values / sqrt(T) follow the quarter circle sqrt(4 - s^2) / pi on [0, 2].
    # stable rank -> T d / (sqrt(T) + sqrt(d))^2 / T = 1/4; participation ratio: E tr X^T X = T d,
    # E tr (X^T X)^2 = T d (T + d + 1), so PR ~ T d / (T + d + 1) / min(T, d);
    # erank / T -> m exp(-E[s log s] / m) with m = E s = 8 / (3 pi), the expectations over the quarter circle.
    t = d = 128
    ref = geo.gaussian_reference(t, d, center=False, samples=8)
    n = 200_000
    s = (np.arange(n) + 0.5) * 2 / n
    w = np.sqrt(4 - s * s) / math.pi * (2 / n)
    m = 8 / (3 * math.pi)
    assert (s * w).sum() == pytest.approx(m, rel=1e-6)
    erank_limit = m * math.exp(-(s * np.log(s) * w).sum() / m)
    assert ref["erank_tol"] == pytest.approx(erank_limit, abs=0.01)
    assert ref["stable_rank"] == pytest.approx(0.25, abs=0.02)
    assert ref["participation_ratio"] == pytest.approx(t * d / (t + d + 1) / t, abs=0.01)
    assert ref["token_cosine"] == pytest.approx(0.0, abs=0.01)
    assert ref["relative_residual"] == pytest.approx(math.sqrt((t - 1) / t), abs=0.01)
    assert {"ln_erank_tol", "ln_stable_rank", "ln_participation_ratio"} <= set(ref)
    assert (ref["T"], ref["d"], ref["samples"], ref["centered"]) == (t, d, 8, False)
    assert geo.gaussian_reference(16, 8, samples=2, seed=3) == geo.gaussian_reference(16, 8, samples=2, seed=3)
    with pytest.raises(ValueError, match="T >= 2"):
        geo.gaussian_reference(1, 8)
