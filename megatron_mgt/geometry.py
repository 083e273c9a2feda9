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


def effective_rank(x: Tensor, center: bool) -> Tensor:
    """Normalised effective rank erank(X) / min(T, d), in [0, 1].

    erank = exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j over the singular values of X
    (Roy & Vetterli 2007); with center=True, of X - 1 xbar^T. Singular values at or below
    max(T, d) * eps64 * |X|_F (uncentred X) count as zero, so exact rank deficiency,
    including centring round-off, is honoured; rounding already present in a float32 X is
    measured as (tiny) rank. A zero matrix gives 0. Returns [...].
    """
    _check_tokens(x)
    x64 = _as_f64(x)
    t, d = x64.shape[-2:]
    tol = max(t, d) * torch.finfo(_F64).eps * torch.linalg.matrix_norm(x64)
    s = torch.linalg.svdvals(_center(x64) if center else x64)
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
    stats.update({name: q.item() for name, q in zip(_QUANTILES, qs)})
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


def layer_geometry(hidden: list[Tensor], center: bool) -> dict[str, list[float] | bool]:
    """Per-layer batch means of effective_rank(X_l, center), token_cosine(X_l), relative_residual(X_l).

    hidden[l] is X_l of shape [B, T, d]. Returns {"erank": [L], "token_cosine": [L],
    "relative_residual": [L], "centered": center}.
    """
    return {
        "erank": [effective_rank(h, center).mean().item() for h in hidden],
        "token_cosine": [token_cosine(h).mean().item() for h in hidden],
        "relative_residual": [relative_residual(h).mean().item() for h in hidden],
        "centered": center,
    }


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
