"""Analytic tests of megatron_mgt.geometry and smoke tests of megatron_mgt.plots."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_mgt import geometry as geo
from megatron_mgt import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """rows x cols matrix with orthonormal columns (rows >= cols)."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=_gen(seed), dtype=torch.float64))
    return q


# ---------------------------------------------------------------- effective rank


@pytest.mark.parametrize("t,d", [(5, 8), (8, 8)])
def test_erank_orthonormal_tokens_is_one(t: int, d: int) -> None:
    x = _orthonormal(d, d)[:t]  # t orthonormal rows: all singular values 1
    assert geo.effective_rank(x, center=False).item() == pytest.approx(1.0, abs=1e-12)
    assert geo.effective_rank(torch.eye(d)[:t], center=False).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("t,d", [(6, 10), (10, 6)])
def test_erank_rank_one(t: int, d: int) -> None:
    a = torch.randn(t, 1, generator=_gen(1), dtype=torch.float64)
    b = torch.randn(1, d, generator=_gen(2), dtype=torch.float64)
    x = a @ b
    assert geo.effective_rank(x, center=False).item() == pytest.approx(1 / min(t, d), rel=1e-9)
    # centring a b^T leaves (a - abar) b^T, still rank 1
    assert geo.effective_rank(x, center=True).item() == pytest.approx(1 / min(t, d), rel=1e-9)
    # float32 rounding of the product is measured as (tiny) extra rank, not thresholded away
    erank32 = geo.effective_rank(x.float(), center=False).item()
    assert erank32 == pytest.approx(1 / min(t, d), rel=1e-5) and erank32 >= 1 / min(t, d)


def test_erank_identical_tokens_centred_is_zero() -> None:
    # 0.1 is inexact in binary, so the float mean differs from the tokens by round-off
    for row in (torch.full((16,), 0.1), torch.randn(16, generator=_gen(3))):
        x = row.expand(7, 16)
        assert geo.effective_rank(x, center=True).item() == 0.0
        assert geo.effective_rank(x, center=False).item() == pytest.approx(1 / 7, rel=1e-9)


def test_erank_zero_matrix_is_zero_not_nan() -> None:
    x = torch.zeros(3, 4, 5)
    for center in (False, True):
        out = geo.effective_rank(x, center=center)
        assert out.shape == (3,)
        assert torch.equal(out, torch.zeros(3, dtype=torch.float64))


def test_erank_known_spectrum() -> None:
    t, d = 6, 8
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    x = _orthonormal(t, 4, seed=4) @ torch.diag(s) @ _orthonormal(d, 4, seed=5).T
    p = s / s.sum()
    expected = math.exp(-sum(pi * math.log(pi) for pi in p.tolist())) / min(t, d)
    assert geo.effective_rank(x, center=False).item() == pytest.approx(expected, rel=1e-10)


def test_erank_batching_matches_per_sample() -> None:
    x = torch.randn(2, 3, 9, 5, generator=_gen(6))
    for center in (False, True):
        batched = geo.effective_rank(x, center=center)
        assert batched.shape == (2, 3)
        for i in range(2):
            for j in range(3):
                single = geo.effective_rank(x[i, j], center=center)
                assert batched[i, j].item() == pytest.approx(single.item(), rel=1e-12)
        assert bool(((batched > 0) & (batched <= 1)).all())


@pytest.mark.parametrize("t,d", [(9, 5), (5, 9), (64, 64)])
def test_gram_spectrum_matches_svd(t: int, d: int) -> None:
    """eval.spectrum=gram: the Gram matrix's eigenvalues give svdvals (above its floor) and the same erank."""
    x = torch.randn(3, t, d, generator=_gen(7)) * torch.logspace(0, -3, d)  # a spread spectrum, float32 like the stream
    s_svd, s_gram = geo.singular_values(x, "svd"), geo.singular_values(x, "gram")
    assert s_gram.shape == s_svd.shape == (3, min(t, d))
    assert torch.allclose(s_gram, s_svd, rtol=1e-9, atol=1e-12 * s_svd.max().item())
    for center in (False, True):
        assert torch.allclose(geo.effective_rank(x, center, "gram"), geo.effective_rank(x, center, "svd"), rtol=1e-10, atol=0)


def test_gram_spectrum_honours_exact_rank_and_zero() -> None:
    """Below sqrt(max(T, d) eps64) s_max the Gram eigensolve cannot resolve s_i: returned as 0, so a
    rank-2 matrix reads erank 2/k exactly (float64 SVD: the same) and a zero matrix 0."""
    t, d = 12, 8
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)
    x = _orthonormal(t, 2, seed=8) @ torch.diag(s) @ _orthonormal(d, 2, seed=9).T
    p = s / s.sum()
    expected = math.exp(-sum(pi * math.log(pi) for pi in p.tolist())) / min(t, d)
    assert geo.effective_rank(x, False, "gram").item() == pytest.approx(expected, rel=1e-12)
    assert int((geo.singular_values(x, "gram") > 0).sum()) == 2
    assert geo.effective_rank(torch.zeros(2, t, d), True, "gram").tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="spectrum must be one of"):
        geo.singular_values(x, "qr")


# ---------------------------------------------------------------- cosine / residual


def test_token_cosine_identical_orthogonal_antipodal() -> None:
    row = torch.randn(12, generator=_gen(7))
    assert geo.token_cosine(row.expand(5, 12)).item() == pytest.approx(1.0, abs=1e-12)
    assert geo.token_cosine(torch.eye(6)[:4]).item() == pytest.approx(0.0, abs=1e-12)
    assert geo.token_cosine(torch.stack([row, -3 * row])).item() == pytest.approx(-1.0, abs=1e-12)


def test_token_cosine_matches_pairwise_loop_and_batches() -> None:
    x = torch.randn(3, 5, 7, generator=_gen(8), dtype=torch.float64)
    out = geo.token_cosine(x)
    assert out.shape == (3,)
    for b in range(3):
        cos = [
            torch.nn.functional.cosine_similarity(x[b, i], x[b, j], dim=0).item()
            for i in range(5)
            for j in range(5)
            if i != j
        ]
        assert out[b].item() == pytest.approx(sum(cos) / len(cos), rel=1e-10)


def test_token_cosine_needs_two_tokens() -> None:
    with pytest.raises(ValueError):
        geo.token_cosine(torch.randn(1, 4))


def test_relative_residual_cases() -> None:
    row = torch.randn(9, generator=_gen(9))
    assert geo.relative_residual(row.expand(4, 9)).item() == pytest.approx(0.0, abs=1e-7)
    assert geo.relative_residual(torch.zeros(2, 4, 9)).tolist() == [0.0, 0.0]
    # zero token mean: X - 1 xbar^T = X
    assert geo.relative_residual(torch.stack([row, -row])).item() == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- beta statistics


def test_beta_stats_known_tensor() -> None:
    beta = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    st = geo.beta_stats(beta)
    assert set(st) == {"mean", "std", "min", "max", "q05", "q25", "q50", "q75", "q95", "frac_negative"}
    assert st["frac_negative"] == 0.25  # 0 is not negative
    assert st["mean"] == pytest.approx(1.5)
    assert st["std"] == pytest.approx(math.sqrt(5.25))  # population std
    assert (st["min"], st["max"]) == (-2.0, 5.0)
    assert st["q50"] == pytest.approx(1.5)
    assert st["q05"] == pytest.approx(-2.0 + 0.05 * 7)  # linear interpolation at rank 0.35
    assert all(isinstance(v, float) for v in st.values())


def test_beta_stats_subsampled_quantiles() -> None:
    n = 200_000
    beta = torch.arange(n, dtype=torch.float32) - n / 4
    st = geo.beta_stats(beta, max_exact=20_000)
    assert st == geo.beta_stats(beta, max_exact=20_000)  # deterministic
    assert st["frac_negative"] == 0.25  # exact, full tensor
    assert (st["min"], st["max"]) == (-n / 4, 3 * n / 4 - 1)
    for key, q in [("q05", 0.05), ("q50", 0.5), ("q95", 0.95)]:
        assert st[key] == pytest.approx(q * (n - 1) - n / 4, abs=0.02 * n)
    with pytest.raises(ValueError):
        geo.beta_stats(beta, max_exact=(1 << 24) + 1)


def test_erase_strength_broadcasts_alpha() -> None:
    beta = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    assert geo.erase_strength(0.5, beta) == geo.beta_stats(0.5 * beta)
    alpha = torch.tensor([1.0, -1.0])  # per channel
    st = geo.erase_strength(alpha, beta)
    assert st["frac_negative"] == 0.25  # alpha*beta = [[1, 2], [3, -4]]
    assert st["min"] == -4.0


def test_update_ratio() -> None:
    x = torch.randn(3, 4, 5, generator=_gen(10))
    ratio = geo.update_ratio(2 * x, x)
    assert ratio.shape == (3,)
    assert torch.allclose(ratio, torch.full((3,), 2.0, dtype=torch.float64))
    z = torch.zeros(4, 5)
    assert geo.update_ratio(z, z).item() == 0.0
    assert geo.update_ratio(x[0], z).item() == math.inf


def test_layer_geometry_records_centering() -> None:
    hidden = [torch.randn(2, 6, 4, generator=_gen(11 + layer)) for layer in range(3)]
    for center in (False, True):
        out = geo.layer_geometry(hidden, center=center)
        assert out["centered"] is center
        assert {k: len(v) for k, v in out.items() if k != "centered"} == {
            "erank": 3,
            "token_cosine": 3,
            "relative_residual": 3,
        }
        assert out["erank"][1] == pytest.approx(geo.effective_rank(hidden[1], center).mean().item())
        assert out["token_cosine"][2] == pytest.approx(geo.token_cosine(hidden[2]).mean().item())


# ---------------------------------------------------------------- signal propagation


def test_collapsed_tokens() -> None:
    x = geo.collapsed_tokens(2, 6, 4096, 0.99, _gen(12))
    assert x.shape == (2, 6, 4096) and x.dtype == torch.float32
    assert torch.equal(x, geo.collapsed_tokens(2, 6, 4096, 0.99, _gen(12)))
    assert geo.token_cosine(x).mean().item() == pytest.approx(0.99, abs=0.01)
    with pytest.raises(ValueError):
        geo.collapsed_tokens(1, 2, 3, 1.5, _gen(0))


def test_angle_exponent_identity_and_rescaling_are_zero() -> None:
    x = geo.collapsed_tokens(3, 8, 32, 0.99, _gen(13)).double()
    assert geo.angle_exponent(lambda h: h, x) == 0.0
    # 1 - p/q is scale invariant
    assert geo.angle_exponent(lambda h: 3.0 * h, x) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_angle_exponent_contraction_toward_mean(c: float) -> None:
    """Block x_i -> xbar + c (x_i - xbar).

    Write x_i = xbar + d_i with sum_i d_i = 0, m = |xbar|^2, v = (1/T) sum_i |d_i|^2.
    Then q = (1/T) tr(X X^T) = m + v and sum_{ij} (X X^T)_ij = |sum_i x_i|^2 = T^2 m, so
    p = (T^2 m - T q) / (T (T - 1)) and 1 - p/q = (q - p)/q = T v / ((T - 1)(m + v)).
    The block keeps m and maps v -> c^2 v, hence
    lambda_a = log[c^2 (m + v) / (m + c^2 v)]. q and p are batch means, so m, v are too.
    """
    x = geo.collapsed_tokens(4, 8, 32, 0.99, _gen(14)).double()
    xbar = x.mean(dim=-2, keepdim=True)
    m = xbar.pow(2).sum(dim=(-2, -1)).mean().item()
    v = (x - xbar).pow(2).sum(dim=(-2, -1)).mean().item() / x.shape[-2]
    expected = math.log(c**2 * (m + v) / (m + c**2 * v))
    got = geo.angle_exponent(lambda h: h.mean(dim=-2, keepdim=True) + c * (h - h.mean(dim=-2, keepdim=True)), x)
    assert got == pytest.approx(expected, rel=1e-9)
    assert (got < 0) == (c < 1)
    if c == 0.5:  # nearly collapsed tokens: m >> v, so lambda_a is close to log(0.25)
        assert got == pytest.approx(math.log(0.25), abs=0.05)


@pytest.mark.parametrize("c", [1.5, 0.7, -1.2])
def test_gradient_exponent_linear_stack(c: float) -> None:
    """X_L = c^L X_0, so d(X_L . R)/dX_0 = c^L R and lambda_g = 2 log|c| (R's norm divides out)."""
    n_layers = 6
    x0 = torch.randn(2, 5, 8, generator=_gen(15), dtype=torch.float64)

    def stack(x: torch.Tensor) -> torch.Tensor:
        for _ in range(n_layers):
            x = c * x
        return x

    expected = 2 * math.log(abs(c))
    assert geo.gradient_exponent(stack, x0, n_layers, _gen(16)) == pytest.approx(expected, rel=1e-10)


def test_gradient_exponent_orthogonal_stack_uses_jacobian_transpose() -> None:
    """x -> x Q with Q orthogonal: the gradient R (Q^T)^L keeps |R|, so lambda_g = 0; x -> x A with a
    non-orthogonal A gives lambda_g = (1/L) log(|R (A^T)^L|^2 / |R|^2), R drawn from the same generator."""
    n_layers, d = 3, 8
    q = _orthonormal(d, d, seed=17)
    x0 = torch.randn(2, 4, d, generator=_gen(18), dtype=torch.float64)

    def stack(x: torch.Tensor, m: torch.Tensor = q) -> torch.Tensor:
        for _ in range(n_layers):
            x = x @ m
        return x

    assert geo.gradient_exponent(stack, x0, n_layers, _gen(19)) == pytest.approx(0.0, abs=1e-12)
    a = q * torch.linspace(0.5, 1.5, d, dtype=torch.float64)  # scales the columns of Q
    r = torch.randn(x0.shape, generator=_gen(19), dtype=torch.float64)
    grad = r
    for _ in range(n_layers):
        grad = grad @ a.T
    expected = math.log(grad.pow(2).sum().item() / r.pow(2).sum().item()) / n_layers
    assert geo.gradient_exponent(lambda x: stack(x, a), x0, n_layers, _gen(19)) == pytest.approx(expected, rel=1e-10)


def test_gradient_exponent_identity_stack_is_zero() -> None:
    x0 = torch.randn(2, 4, 8, generator=_gen(20))
    assert geo.gradient_exponent(lambda x: x, x0, 5, _gen(21)) == 0.0


# ---------------------------------------------------------------- plots


def _assert_single_png(directory: Path, name: str) -> None:
    assert sorted(p.name for p in directory.iterdir()) == [name]  # no temp file left
    assert (directory / name).stat().st_mode & 0o777 == 0o644
    data = (directory / name).read_bytes()
    assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC)


def test_plot_loss_curves(tmp_path: Path) -> None:
    train = [(s, 5.0 * math.exp(-s / 300)) for s in range(0, 1000, 10)]
    valid = [(s, 5.2 * math.exp(-s / 300)) for s in range(0, 1000, 250)]
    plots.plot_loss_curves({"train": train, "valid": valid, "empty": []}, tmp_path / "loss.png", "preln L=12")
    _assert_single_png(tmp_path, "loss.png")


def test_plot_erank_vs_depth(tmp_path: Path) -> None:
    curves = {"preln": list(np.linspace(0.9, 0.05, 24)), "mgt": list(np.linspace(0.9, 0.6, 48))}
    plots.plot_erank_vs_depth(curves, tmp_path / "erank.png", "erank at init")
    _assert_single_png(tmp_path, "erank.png")


def test_plot_series_panels_many_series_fit(tmp_path: Path) -> None:
    """A protocol's 10 arms x 3 depths: one panel per depth and the legend beside them; before,
    30 series in one axes left matplotlib's layout no room (a warning and an unreadable plot)."""
    import warnings

    arms = ["preln", "mgt", "embed_only", "preln_matched", "mhc", "ddl", "postln", "deepnorm", "ddl_rank1", "mhc_nstream"]
    panels = {f"{d} layers": {a: [(t, 5.0 - 0.1 * i - 0.5 * math.log10(t), 0.0) for t in (1e4, 1e5, 1e6)] for i, a in enumerate(arms)} for d in (12, 48, 96)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.plot_series_panels(panels, tmp_path / "panels.png", "valid loss vs tokens", "tokens", "loss", logx=True)
        plots.plot_series_vs_x(panels["12 layers"], tmp_path / "one" / "single.png", "12 layers", "tokens", "loss", logx=True)
    _assert_single_png(tmp_path / "one", "single.png")
    (tmp_path / "one" / "single.png").unlink()
    (tmp_path / "one").rmdir()
    _assert_single_png(tmp_path, "panels.png")


def test_plot_beta_by_layer(tmp_path: Path) -> None:
    stats = [geo.beta_stats(torch.randn(256, generator=_gen(20 + i)) * 0.1 + 0.5 - 0.05 * i) for i in range(16)]
    plots.plot_beta_by_layer(stats, tmp_path / "beta.png")
    _assert_single_png(tmp_path, "beta.png")


def test_plot_heatmap_with_nan(tmp_path: Path) -> None:
    matrix = np.random.default_rng(0).random((12, 30))
    matrix[3, 5] = np.nan
    plots.plot_heatmap(matrix, list(range(0, 3000, 100)), tmp_path / "heat.png", "erank", "erank / min(T, d)")
    _assert_single_png(tmp_path, "heat.png")
    with pytest.raises(ValueError):
        plots.plot_heatmap(matrix, [0, 1], tmp_path / "bad.png", "x", "y")


def test_plot_failed_replace_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "occupied.png"
    target.mkdir()  # os.replace(file, directory) fails
    with pytest.raises(OSError):
        plots.plot_erank_vs_depth({"a": [0.5, 0.4]}, target, "t")
    assert [p.name for p in tmp_path.iterdir()] == ["occupied.png"]
