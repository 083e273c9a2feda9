"""Token-geometry diagnostics of the residual stream (MGT spec, section 3).

All functions are pure, take token matrices X of shape [..., T, d] batched over the
leading dims, detach their inputs (except ``gradient_exponent``) and compute in float64.
Per-sequence metrics are returned as float64 tensors of shape [...].
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from megatron_mgt.model.transformer import Transformer, capture_geometry
from megatron_mgt.stats import t_interval

RANK_REL_TOL = 1e-4  # erank_tol, stable rank, participation ratio: singular values <= RANK_REL_TOL * s_max are dropped

_F64 = torch.float64
_QUANTILES = {"q05": 0.05, "q25": 0.25, "q50": 0.50, "q75": 0.75, "q95": 0.95}


def _as_f64(x: Tensor) -> Tensor:
    """Detached float64 copy-or-view of x."""
    return x.detach().to(_F64)


def _center(x: Tensor) -> Tensor:
    """X - 1 xbar^T, with xbar = (1/T) sum_i x_i the token mean (dim -2)."""
    return x - x.mean(dim=-2, keepdim=True)


def _check_tokens(x: Tensor, min_tokens: int = 1) -> None:
    """Require a token matrix [..., T, d] with T >= min_tokens."""
    if x.dim() < 2 or x.shape[-2] < min_tokens:
        raise ValueError(f"expected [..., T>={min_tokens}, d], got shape {tuple(x.shape)}")


SPECTRA = ("svd", "gram")


def gram_singular_values(x: Tensor) -> Tensor:
    """Singular values of X [..., T, d] from its k x k Gram matrix, k = min(T, d), in float64:
    s_i = sqrt(lambda_i(X^T X)) (or of X X^T when T < d), descending.

    One matmul and a symmetric eigensolve instead of an SVD of [T, d] (what GPUs do fast).
    Forming the product (inner dimension max(T, d)) and the eigensolve make lambda exact to
    about n eps64 lambda_max, n = max(T, d), so s_i below sqrt(n eps64) s_max (about 1.2e-7
    s_max at n = 64, 6.7e-7 at 2048) are unresolved and returned as 0: exact rank deficiency
    still reads as such. Above that floor s_i equals svdvals to about n eps64 s_max^2 / s_i.
    """
    x64 = _as_f64(x)
    t, d = x64.shape[-2:]
    gram = x64.mT @ x64 if t >= d else x64 @ x64.mT
    lam = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)
    floor = max(t, d) * torch.finfo(_F64).eps * lam[..., :1]
    return torch.where(lam > floor, lam, torch.zeros_like(lam)).sqrt()


def singular_values(x: Tensor, spectrum: str = "svd") -> Tensor:
    """Singular values of X, descending: torch.linalg.svdvals in float64 (spectrum="svd", the
    reference) or gram_singular_values (spectrum="gram", for large d on GPUs). Returns [..., min(T, d)]."""
    if spectrum == "svd":
        return torch.linalg.svdvals(_as_f64(x))
    if spectrum == "gram":
        return gram_singular_values(x)
    raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")


def effective_rank(x: Tensor, center: bool, spectrum: str = "svd") -> Tensor:
    """Normalised effective rank erank(X) / min(T, d), in [0, 1].

    erank = exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j over the singular values of X
    (Roy & Vetterli 2007); with center=True, of X - 1 xbar^T. Singular values at or below
    max(T, d) * eps64 * |X|_F (uncentred X) count as zero, so exact rank deficiency,
    including centring round-off, is honoured; rounding already present in a float32 X is
    measured as (tiny) rank. A zero matrix gives 0. `spectrum` picks singular_values' method
    ("gram" also drops what its eigensolve cannot resolve). Returns [...].
    """
    _check_tokens(x)
    x64 = _as_f64(x)
    t, d = x64.shape[-2:]
    tol = max(t, d) * torch.finfo(_F64).eps * torch.linalg.matrix_norm(x64)
    s = singular_values(_center(x64) if center else x64, spectrum)
    s = torch.where(s > tol.unsqueeze(-1), s, torch.zeros_like(s))
    total = s.sum(dim=-1)
    p = s / total.clamp_min(torch.finfo(_F64).tiny).unsqueeze(-1)
    erank = torch.exp(-torch.xlogy(p, p).sum(dim=-1))
    return torch.where(total > 0, erank / min(t, d), torch.zeros_like(erank))


def token_cosine(x: Tensor) -> Tensor:
    """Mean pairwise cosine over distinct tokens, (1/(T(T-1))) sum_{i != j} cos(x_i, x_j).

    Uses sum_{i != j} u_i.u_j = |sum_i u_i|^2 - sum_i |u_i|^2 with u_i = x_i / |x_i|;
    a zero token has cosine 0 with every other token. Requires T >= 2. Returns [...].
    """
    _check_tokens(x, min_tokens=2)
    x64 = _as_f64(x)
    t = x64.shape[-2]
    norms = torch.linalg.vector_norm(x64, dim=-1, keepdim=True)
    u = x64 / norms.clamp_min(torch.finfo(_F64).tiny)
    pair_sum = u.sum(dim=-2).pow(2).sum(dim=-1) - u.pow(2).sum(dim=(-2, -1))
    return pair_sum / (t * (t - 1))


def relative_residual(x: Tensor) -> Tensor:
    """|X - 1 xbar^T|_F / |X|_F (Dong et al. 2021); 0 for a zero matrix. Returns [...]."""
    _check_tokens(x)
    x64 = _as_f64(x)
    num = torch.linalg.matrix_norm(_center(x64))
    den = torch.linalg.matrix_norm(x64)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(_F64).tiny), torch.zeros_like(den))


def beta_stats(beta: Tensor, max_exact: int = 1 << 20) -> dict[str, float]:
    """Distribution summary of all entries of beta.

    Keys: mean, std (population, correction 0), min, max, q05, q25, q50, q75, q95
    (linear interpolation) and frac_negative = #(beta < 0) / numel. Moments, extremes and
    frac_negative use every entry; quantiles are exact up to max_exact entries (at most
    2^24, torch.quantile's limit), beyond that estimated from max_exact entries drawn
    uniformly with replacement by a fixed-seed generator (deterministic).
    """
    if beta.numel() == 0:
        raise ValueError("beta_stats of an empty tensor")
    if not 0 < max_exact <= 1 << 24:
        raise ValueError(f"max_exact must be in [1, 2^24], got {max_exact}")
    flat = _as_f64(beta).flatten()
    sample = flat
    if flat.numel() > max_exact:
        gen = torch.Generator(device=flat.device).manual_seed(0)
        idx = torch.randint(flat.numel(), (max_exact,), generator=gen, device=flat.device)
        sample = flat[idx]
    qs = torch.quantile(sample, torch.tensor(list(_QUANTILES.values()), dtype=_F64, device=flat.device))
    stats = {
        "mean": flat.mean().item(),
        "std": flat.std(correction=0).item(),
        "min": flat.min().item(),
        "max": flat.max().item(),
    }
    stats.update({name: q.item() for name, q in zip(_QUANTILES, qs, strict=True)})
    stats["frac_negative"] = (flat < 0).to(_F64).mean().item()
    return stats


def erase_strength(alpha: Tensor | float, beta: Tensor) -> dict[str, float]:
    """beta_stats of the erasure coefficient alpha * beta (broadcast), the X-shrink in (1 - alpha beta) X."""
    return beta_stats(_as_f64(torch.as_tensor(alpha, device=beta.device)) * _as_f64(beta))


def update_ratio(update: Tensor, x: Tensor) -> Tensor:
    """|U|_F / |X|_F per sequence over the last two dims; 0 if both vanish, inf if only X does. Returns [...]."""
    num = torch.linalg.matrix_norm(_as_f64(update))
    den = torch.linalg.matrix_norm(_as_f64(x))
    ratio = torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num))
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(_F64).tiny), ratio)


LAYER_METRICS = ("erank", "token_cosine", "relative_residual")


def layer_metrics(h: Tensor, center: bool, spectrum: str = "svd") -> dict[str, float]:
    """Batch means of effective_rank(X, center, spectrum), token_cosine(X), relative_residual(X) for one X [B, T, d]."""
    return {
        "erank": effective_rank(h, center, spectrum).mean().item(),
        "token_cosine": token_cosine(h).mean().item(),
        "relative_residual": relative_residual(h).mean().item(),
    }


def layer_geometry(hidden: list[Tensor], center: bool, spectrum: str = "svd") -> dict[str, list[float] | bool]:
    """Per-layer layer_metrics of X_l, hidden[l] of shape [B, T, d]. Returns {"erank": [L],
    "token_cosine": [L], "relative_residual": [L], "centered": center}."""
    rows = [layer_metrics(h, center, spectrum) for h in hidden]
    return {**{key: [row[key] for row in rows] for key in LAYER_METRICS}, "centered": center}


def sublayer_geometry(captured: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict]:
    """Per sublayer, from what its residual rule captured: the update ratio, beta statistics
    and erase strength (rules with beta), and for mhc_nstream the mean diagonal of H_res and
    its worst column-sum error."""
    out = {}
    for name, values in captured.items():
        entry = {"update_ratio": values["update_ratio"].mean().item()}
        if "beta" in values:
            entry["beta"] = beta_stats(values["beta"])
            entry["erase"] = erase_strength(values["alpha"], values["beta"])
        if "h_res" in values:  # mhc_nstream: how close H_res stays to identity and to doubly stochastic
            h_res = values["h_res"].double()
            entry["h_res_diag"] = h_res.diagonal(dim1=-2, dim2=-1).mean().item()
            entry["h_res_col_err"] = (h_res.sum(dim=-2) - 1).abs().max().item()
        out[name] = entry
    return out


def geometry_snapshot(model: Transformer, tokens: torch.Tensor, center: bool, spectrum: str = "svd") -> dict:
    """Per-layer erank / token cosine / relative residual and per-sublayer statistics
    (sublayer_geometry) of one forward pass of the whole model on `tokens`."""
    captured = capture_geometry(model, tokens)
    snap = layer_geometry(captured["hidden"], center, spectrum)
    snap["sublayers"] = sublayer_geometry(captured["sublayers"])
    return snap


def collapsed_tokens(B: int, T: int, d: int, rho: float, generator: torch.Generator) -> Tensor:
    """X = sqrt(rho) g + sqrt(1 - rho) Z, g ~ N(0, I_d) shared by the T tokens of a sequence, Z iid N(0, 1).

    Expected token cosine is rho (Cowsik et al. 2024). Returns float32 [B, T, d] on generator's device.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    dev = generator.device
    g = torch.randn(B, 1, d, generator=generator, device=dev)
    z = torch.randn(B, T, d, generator=generator, device=dev)
    return math.sqrt(rho) * g + math.sqrt(1.0 - rho) * z


def _gram_q_p(x: Tensor) -> tuple[Tensor, Tensor]:
    """q = mean_i (X X^T)_ii and p = mean_{i != j} (X X^T)_ij per sequence, averaged over the batch."""
    _check_tokens(x, min_tokens=2)
    x64 = _as_f64(x)
    t = x64.shape[-2]
    diag = x64.pow(2).sum(dim=(-2, -1))
    total = x64.sum(dim=-2).pow(2).sum(dim=-1)
    return (diag / t).mean(), ((total - diag) / (t * (t - 1))).mean()


def angle_exponent(block_fn: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """lambda_a = log[(1 - p'/q') / (1 - p/q)], primes after X' = block_fn(X) (Cowsik et al. 2024).

    q, p as in _gram_q_p. block_fn runs under no_grad; put modules in eval mode first.
    """
    with torch.no_grad():
        y = block_fn(x)
    q, p = _gram_q_p(x)
    q1, p1 = _gram_q_p(y)
    return torch.log((1 - p1 / q1) / (1 - p / q)).item()


def gradient_exponent(
    stack_fn: Callable[[Tensor], Tensor], x0: Tensor, n_layers: int, generator: torch.Generator
) -> float:
    """lambda_g = (1/L) log(|d(X_L . R)/dX_0|_F^2 / |R|_F^2), X_L = stack_fn(X_0), R ~ N(0, 1) iid, L = n_layers.

    d(X_L . R)/dX_0 = J^T R; dividing by |R|_F^2 makes an identity stack give exactly 0 and
    X_L = c^L X_0 give 2 log|c| (Cowsik et al.'s per-layer growth rate of a random
    backpropagated signal). The norms run over the whole tensor (all sequences); R is drawn
    from generator with X_L's dtype and device.
    """
    x = x0.detach().clone().requires_grad_(True)
    y = stack_fn(x)
    r = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
    (grad,) = torch.autograd.grad((y * r).sum(), x)
    ratio = torch.linalg.vector_norm(_as_f64(grad)) / torch.linalg.vector_norm(_as_f64(r))
    return (2 * torch.log(ratio) / n_layers).item()


# ------------------------------------------- rank metrics that tell collapse from round-off


def singular_spectrum(x: Tensor, center: bool) -> Tensor:
    """Singular values s_1 >= ... >= s_k, k = min(T, d), of X, or with center=True of X - 1 xbar^T. Returns [..., k]."""
    _check_tokens(x)
    x64 = _as_f64(x)
    return singular_values(_center(x64) if center else x64)


def _kept_spectrum(x: Tensor, center: bool, rel_tol: float) -> Tensor:
    """singular_spectrum(x, center) with every s_i <= rel_tol * s_max(X) set to 0.

    The threshold is relative to the largest singular value of the *uncentred* X, the scale
    of the stream: a stream whose tokens agree up to round-off has a centred spectrum of pure
    round-off, which this drops entirely. A zero X keeps nothing.
    """
    if not 0.0 <= rel_tol < 1.0:
        raise ValueError(f"rel_tol must be in [0, 1), got {rel_tol}")
    s = singular_spectrum(x, center)
    scale = singular_spectrum(x, center=False)[..., :1] if center else s[..., :1]
    return torch.where(s > rel_tol * scale, s, torch.zeros_like(s))


def _erank_of(s: Tensor, k: int) -> Tensor:
    """exp(-sum_i p_i log p_i) / k, p_i = s_i / sum_j s_j; 0 for an all-zero spectrum."""
    total = s.sum(dim=-1)
    p = s / total.clamp_min(torch.finfo(_F64).tiny).unsqueeze(-1)
    erank = torch.exp(-torch.xlogy(p, p).sum(dim=-1))
    return torch.where(total > 0, erank / k, torch.zeros_like(erank))


def _stable_rank_of(s: Tensor, k: int) -> Tensor:
    """(sum_i s_i^2) / s_1^2 / k; 0 for an all-zero spectrum."""
    top = s.amax(dim=-1).pow(2)
    return torch.where(top > 0, s.pow(2).sum(dim=-1) / top.clamp_min(torch.finfo(_F64).tiny) / k, torch.zeros_like(top))


def _participation_ratio_of(s: Tensor, k: int) -> Tensor:
    """(sum_i s_i^2)^2 / (sum_i s_i^4) / k; 0 for an all-zero spectrum."""
    s2 = s.pow(2)
    quartic = s2.pow(2).sum(dim=-1)
    ratio = s2.sum(dim=-1).pow(2) / quartic.clamp_min(torch.finfo(_F64).tiny) / k
    return torch.where(quartic > 0, ratio, torch.zeros_like(quartic))


def effective_rank_tol(x: Tensor, center: bool, rel_tol: float = RANK_REL_TOL) -> Tensor:
    """Normalised effective rank exp(-sum_i p_i log p_i) / min(T, d), p_i = s_i / sum_j s_j, in [0, 1].

    Unlike effective_rank, singular values s_i <= rel_tol * s_max(X) are dropped (s_max of
    the uncentred X), so a stream collapsed up to float round-off reads ~0 (centred) or
    1 / min(T, d) (uncentred), not the erank of its round-off. 0 when nothing is kept. Returns [...].
    """
    s = _kept_spectrum(x, center, rel_tol)
    return _erank_of(s, min(x.shape[-2:]))


def stable_rank(x: Tensor, center: bool, rel_tol: float = RANK_REL_TOL) -> Tensor:
    """Normalised stable rank |X|_F^2 / s_max^2 / min(T, d) = (sum_i s_i^2) / s_1^2 / min(T, d), in (0, 1].

    Over the spectrum kept by effective_rank_tol's rule (which changes |X|_F^2 by at most a
    relative min(T, d) rel_tol^2 unless X is collapsed); 0 when nothing is kept. Returns [...].
    """
    s = _kept_spectrum(x, center, rel_tol)
    return _stable_rank_of(s, min(x.shape[-2:]))


def participation_ratio(x: Tensor, center: bool, rel_tol: float = RANK_REL_TOL) -> Tensor:
    """Normalised participation ratio (sum_i s_i^2)^2 / (sum_i s_i^4) / min(T, d), in (0, 1].

    Over the spectrum kept by effective_rank_tol's rule; 0 when nothing is kept. Returns [...].
    """
    s = _kept_spectrum(x, center, rel_tol)
    return _participation_ratio_of(s, min(x.shape[-2:]))


def layer_norm_rows(x: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm without affine over d: (x_i - mu_i) / sqrt(sigma_i^2 + eps), mu_i, sigma_i^2 the mean and
    biased variance of token x_i. What the next pre-LN sublayer sees. Returns float64 [..., T, d]."""
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    _check_tokens(x)
    x64 = _as_f64(x)
    mu = x64.mean(dim=-1, keepdim=True)
    var = x64.var(dim=-1, correction=0, keepdim=True)
    return (x64 - mu) / torch.sqrt(var + eps)


def _window_metrics(x: Tensor, center: bool, rel_tol: float) -> dict[str, Tensor]:
    """Per window of x [..., T, d]: erank_tol, stable_rank, participation_ratio, token_cosine and
    relative_residual of X, and erank_tol, stable_rank, participation_ratio of LN(X) (prefix ln_)."""
    k = min(x.shape[-2:])
    out = {"token_cosine": token_cosine(x), "relative_residual": relative_residual(x)}
    for prefix, m in (("", x), ("ln_", layer_norm_rows(x))):
        s = _kept_spectrum(m, center, rel_tol)
        out[f"{prefix}erank_tol"] = _erank_of(s, k)
        out[f"{prefix}stable_rank"] = _stable_rank_of(s, k)
        out[f"{prefix}participation_ratio"] = _participation_ratio_of(s, k)
    return out


def rank_profile(
    hidden: list[Tensor],
    center: bool = True,
    rel_tol: float = RANK_REL_TOL,
    collapse_cosine: float = 0.99,
    collapse_residual: float = 1e-3,
    level: float = 0.95,
) -> dict:
    """Per layer, the mean over windows and the t confidence interval (stats.t_interval) of each _window_metrics metric.

    hidden[l] is X_l of shape [..., T, d]; every leading index is one window (batch row).
    A layer is collapsed when its mean token cosine >= collapse_cosine or its mean relative
    residual <= collapse_residual. Returns {"metrics": {name: {"mean": [L], "ci_low": [L],
    "ci_high": [L]}}, "collapsed": [L], "windows": [L], "centered", "rel_tol",
    "collapse_cosine", "collapse_residual", "level"}; CIs are NaN for a single window.
    """
    if not hidden:
        raise ValueError("rank_profile needs at least one layer, got an empty list")
    metrics: dict[str, dict[str, list[float]]] = {}
    collapsed, windows = [], []
    for h in hidden:
        _check_tokens(h, min_tokens=2)
        per_window = _window_metrics(h.reshape(-1, *h.shape[-2:]), center, rel_tol)
        for name, values in per_window.items():
            summary = t_interval(values.tolist(), level)
            entry = metrics.setdefault(name, {"mean": [], "ci_low": [], "ci_high": []})
            entry["mean"].append(summary["mean"])
            entry["ci_low"].append(summary["ci"][0])
            entry["ci_high"].append(summary["ci"][1])
        collapsed.append(bool(metrics["token_cosine"]["mean"][-1] >= collapse_cosine or metrics["relative_residual"]["mean"][-1] <= collapse_residual))
        windows.append(per_window["token_cosine"].numel())
    return {
        "metrics": metrics,
        "collapsed": collapsed,
        "windows": windows,
        "centered": center,
        "rel_tol": rel_tol,
        "collapse_cosine": collapse_cosine,
        "collapse_residual": collapse_residual,
        "level": level,
    }


def gaussian_reference(T: int, d: int, center: bool = True, samples: int = 16, seed: int = 0, rel_tol: float = RANK_REL_TOL) -> dict:
    """Means over `samples` iid N(0, 1) float64 matrices of shape [T, d] (torch generator seeded with seed)
    of every _window_metrics metric: the no-structure reference line of a rank profile.

    Returns {name: float} plus "T", "d", "samples", "centered".
    """
    if T < 2 or d < 1 or samples < 1:
        raise ValueError(f"gaussian_reference needs T >= 2, d >= 1, samples >= 1, got T={T}, d={d}, samples={samples}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, T, d, generator=gen, dtype=_F64)
    ref = {name: values.mean().item() for name, values in _window_metrics(x, center, rel_tol).items()}
    return {**ref, "T": T, "d": d, "samples": samples, "centered": center}
