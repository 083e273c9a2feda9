"""The residual family: how a sublayer F writes into the residual stream X.

Every rule is a small module with one job, `update(x, sublayer) -> new x`, behind the
registry `RESIDUAL_RULES`; the block never asks which rule it holds. Spec section 1-2:

    preln     X + F(LN(X))
    postln    LN(X + F(X))
    deepnorm  LN(a X + F(X)),  a = (2M)^(1/4), F's V/O/FFN init scaled by b = (8M)^(-1/4)
    mhc       X + V_mHC,                     V_mHC = F(LN(X)) * sigmoid(LN(X W_gate))
    ddl       X + beta * (F(LN(X)) - alpha X),  beta = lam tanh(X W_beta + b_beta) + eps
    mgt       X + beta * (V_mHC - alpha X)

and the original mechanisms as comparators (docs/RESIDUALS.md):

    ddl_rank1    x + beta k (v - k.x) per token,  k = F(LN x) normalised, beta in (0, 2)
    mhc_nstream  x <- H_res x + H_post^T F(LN(H_pre x)) on n streams [B, T, n*d]

A rule whose stream is wider than d (mhc_nstream) says so through two class-level hooks
that the model calls: `expand(x, cfg)` after the embedding and `collapse(x, cfg)` before
the final norm (and for every hidden state it reports); both are the identity otherwise.

LN is `model.norm` (model/norm.py): LayerNorm as the spec writes it, or RMSNorm for every
norm of the model, the mHC gate's included (mhc_nstream's own RMSNorm of the mappings is the
paper's and stays).

With `capture = True` a rule keeps, for the last call, the ratio |X_new - X| / |X| per
sequence and (where it has them) beta and alpha, for geometry telemetry; otherwise it
keeps nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mgt.config import MGTConfig, ModelConfig
from megatron_mgt.model.fused import beta_of, fused_tail, fused_update
from megatron_mgt.model.norm import make_norm

Sublayer = Callable[[torch.Tensor], torch.Tensor]


class ResidualRule(nn.Module):
    """Base of the family. Subclasses implement `update`."""

    init_gain: float = 1.0  # multiplies the init std of F's value/output/FFN weights
    depth_scaled_init: bool = True  # whether F's output projection gets std / sqrt(2L)

    def __init__(self) -> None:
        super().__init__()
        self.capture = False
        self.captured: dict[str, torch.Tensor] = {}

    def update(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def expand(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        """Embedding output [B, T, d] -> the residual stream this rule updates."""
        return x

    @staticmethod
    def collapse(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        """Residual stream -> [B, T, d] (final norm input, reported hidden states)."""
        return x

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        out = self.update(x, sublayer)
        if self.capture:
            delta = (out - x).detach().flatten(1).norm(dim=1)
            self.captured["update_ratio"] = delta / x.detach().flatten(1).norm(dim=1).clamp_min(1e-12)
        return out

    def record(self, **tensors: torch.Tensor) -> None:
        """Keep copies: a recorded parameter (alpha) must not alias storage that an optimizer
        step updates in place or that FSDP frees after the forward (reading it then crashes)."""
        if self.capture:
            self.captured.update({k: v.detach().clone() for k, v in tensors.items()})


class PreLN(ResidualRule):
    """X + F(LN(X))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg, cfg.d_model)

    def update(self, x, sublayer):
        return x + sublayer(self.norm(x))


class PostLN(ResidualRule):
    """LN(X + F(X))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg, cfg.d_model)

    def update(self, x, sublayer):
        return self.norm(x + sublayer(x))


class DeepNorm(ResidualRule):
    """LN(a X + F(X)) with a = (2M)^(1/4) and F's init scaled by b = (8M)^(-1/4),
    M = number of layers (DeepNet, decoder-only)."""

    depth_scaled_init = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg, cfg.d_model)
        self.alpha = (2 * cfg.n_layers) ** 0.25
        self.init_gain = (8 * cfg.n_layers) ** -0.25

    def update(self, x, sublayer):
        return self.norm(self.alpha * x + sublayer(x))


class DirectionGate(nn.Module):
    """mHC rectification: V_mHC = V_raw * sigmoid(LN(X W_gate)). LN is `model.norm`: the spec's
    LayerNorm by default, RMSNorm with model.norm=rmsnorm (one norm type in the whole model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm = make_norm(cfg, cfg.d_model)
        nn.init.normal_(self.proj.weight, std=cfg.init_std)

    def forward(self, v_raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v_raw.float() * torch.sigmoid(self.norm(self.proj(x)).float())  # fp32 under a bf16 stream


class DeltaController(nn.Module):
    """DDL: beta = lam * tanh(X W_beta + b_beta) + eps, and the erasure alpha.

    W_beta starts at 0 and b_beta at atanh((beta_init - eps) / lam), so every token
    starts with beta = beta_init. alpha is fixed, one learned scalar, or learned per
    channel, starting at alpha_init.
    """

    def __init__(self, d_model: int, knobs: MGTConfig):
        super().__init__()
        self.lam, self.eps = knobs.lam, knobs.eps
        width = d_model if knobs.beta_granularity == "channel" else 1
        self.proj = nn.Linear(d_model, width, bias=True)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, math.atanh((knobs.beta_init - knobs.eps) / knobs.lam))
        alpha = torch.full((d_model if knobs.alpha_mode == "channel" else 1,), knobs.alpha_init)
        if knobs.alpha_mode == "fixed":
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = nn.Parameter(alpha)

    def beta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lam * torch.tanh(self.proj(x).float()) + self.eps  # fp32 under a bf16 stream


class GeometricResidual(ResidualRule):
    """X + beta * (V - alpha X) with optional parts: the mHC gate makes V = V_mHC
    (else V = V_raw = F(LN X)); the DDL controller gives beta, alpha (else beta = 1,
    alpha = 0). Gate and controller read X or LN(X) (`controller_input`).

    Precision: matmuls run in the stream dtype; on a bf16 stream the gate's sigmoid, beta
    and the update X + beta (V - alpha X) run in fp32 (alpha may be an fp32 buffer) and are
    rounded once to bf16; LN statistics are fp32 inside the norm kernel. On an fp32 stream
    every cast is a no-op (the same ops, bit for bit)."""

    def __init__(self, cfg: ModelConfig, gate: bool, delta: bool):
        super().__init__()
        self.norm = make_norm(cfg, cfg.d_model)
        self.read_normed = cfg.mgt.controller_input == "ln"
        self.gate = DirectionGate(cfg) if gate else None
        self.delta = DeltaController(cfg.d_model, cfg.mgt) if delta else None
        self.fused = cfg.fused_residual
        self.recompute_projections = cfg.fused_recompute_projections

    def update(self, x, sublayer):
        h = self.norm(x)
        v = sublayer(h)
        c = h if self.read_normed else x
        if self.fused and self.recompute_projections:  # the same update, saving only x, v and c (model/fused.py)
            d = self.delta
            if d is not None and self.capture:
                with torch.no_grad():
                    self.record(beta=d.beta(c), alpha=d.alpha)
            gate_norm = self.gate.norm if self.gate is not None else None
            return fused_update(x, v, c, self.gate.proj if self.gate is not None else None, d.proj if d is not None else None,
                                gate_norm, d.lam if d is not None else 0.0, d.eps if d is not None else 0.0, d.alpha if d is not None else None)
        if self.fused:  # the same update; the elementwise tail saves only x, v, gate_pre, beta_pre (model/fused.py)
            gate_pre = self.gate.proj(c) if self.gate is not None else None
            if self.delta is None:
                return fused_tail(x, v, gate_pre, None, self.gate.norm, 0.0, 0.0, None)
            beta_pre, d = self.delta.proj(c), self.delta
            if self.capture:
                with torch.no_grad():
                    self.record(beta=beta_of(beta_pre, d.lam, d.eps), alpha=d.alpha)
            return fused_tail(x, v, gate_pre, beta_pre, self.gate.norm if self.gate is not None else None, d.lam, d.eps, d.alpha)
        if self.gate is not None:
            v = self.gate(v, c)
        if self.delta is None:
            return (x.float() + v).to(x.dtype)
        beta, alpha = self.delta.beta(c), self.delta.alpha
        self.record(beta=beta, alpha=alpha)
        # in fp32, rounded once to the stream dtype (a no-op on an fp32 stream)
        return (x.float() + beta * (v.float() - alpha.float() * x.float())).to(x.dtype)


class GateOnly(GeometricResidual):
    """`mhc` ablation: X + V_mHC."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, gate=True, delta=False)


class DeltaOnly(GeometricResidual):
    """`ddl` ablation: X + beta (V_raw - alpha X)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, gate=False, delta=True)


class FullMGT(GeometricResidual):
    """`mgt`: X + beta (V_mHC - alpha X)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, gate=True, delta=True)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class Rank1Delta(ResidualRule):
    """Deep Delta Learning, rank 1 with a scalar value (d_v = 1; Zhang et al. 2601.00417).

    Per token x (a d-vector) and sublayer F:
        k    = f / sqrt(|f|^2 + k_eps^2),  f = F(LN x)           direction (unit norm)
        beta = 2 sigmoid(w_beta . c + b_beta),  c = LN x          gate in (0, 2), fp32
        v    = w_v . C + b_v,  C = x (value_input=x) or LN x      scalar value
        x'   = x + beta k (v - k . x) = (I - beta k k^T) x + beta v k
    w_beta = 0, b_beta = logit(beta_init / 2): beta = beta_init at init; w_v = 0, b_v = 0:
    v = 0 at init, so the update is the pure erasure -beta k (k . x) and
    |x' - x| / |x| = beta_init |cos(k, x)| <= beta_init per token.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        knobs = cfg.ddl_rank1
        self.norm = make_norm(cfg, cfg.d_model)
        self.k_eps, self.value_reads_x = knobs.k_eps, knobs.value_input == "x"
        self.gate = nn.Linear(cfg.d_model, 1)
        self.value = nn.Linear(cfg.d_model, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, _logit(knobs.beta_init / 2))
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def beta(self, c: torch.Tensor) -> torch.Tensor:
        """2 sigmoid(w . c + b) in fp32, [..., 1]."""
        return 2 * torch.sigmoid(F.linear(c.float(), self.gate.weight.float(), self.gate.bias.float()))

    def update(self, x, sublayer):
        h = self.norm(x)
        f = sublayer(h).float()
        k = f * torch.rsqrt(f.pow(2).sum(-1, keepdim=True) + self.k_eps**2)
        beta = self.beta(h)
        v = self.value(x if self.value_reads_x else h).float()
        kx = (k * x.float()).sum(-1, keepdim=True)
        self.record(beta=beta, alpha=torch.ones(1, device=x.device))  # erasure along k is beta (alpha = 1)
        return x + (beta * (v - kx) * k).to(x.dtype)


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp on exp(logits) [..., n, n] in fp32: `iters` rounds of (divide every
    column by its sum, then every row by its sum). Rows sum to 1 exactly, columns to 1 up
    to the convergence left after `iters` rounds."""
    m = logits.float()
    m = torch.exp(m - m.amax(dim=(-2, -1), keepdim=True))  # a common scale: same result, no overflow
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


class NStreamMHC(ResidualRule):
    """DeepSeek mHC with n residual streams (arXiv 2512.24880). The stream is x [B, T, n*d],
    n rows x_i of width d per token; with x' = RMSNorm(vec x) (no affine) in fp32:
        H_pre  = sigmoid(a_pre x' phi_pre + b_pre)                     [n]
        H_post = 2 sigmoid(a_post x' phi_post + b_post)                [n]
        H_res  = Sinkhorn(exp(a_res mat(x' phi_res) + b_res))          [n, n], doubly stochastic
        x'' = H_res x + H_post^T F(LN(H_pre x))
    F keeps its pre-norm LN (as in preln). phi ~ N(0, 1/(n d)) so x' phi is O(1); a_* start
    at `gate_init`. b_pre = logit(1/n) (the input starts as the stream mean), b_post = 0
    (H_post = 1), b_res = log of a doubly stochastic matrix with diagonal `res_diag_init`,
    so H_res starts near identity; a, b are 0-/1-dim parameters (no weight decay). expand replicates the embedding n times; collapse is
    the mean of the streams. With a = 0 the model is exactly preln (up to LN eps).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        knobs, n, d = cfg.mhc_nstream, cfg.mhc_streams, cfg.d_model
        self.n, self.d, self.iters, self.rms_eps = n, d, knobs.sinkhorn_iters, cfg.norm_eps
        self.norm = make_norm(cfg, d)
        self.phi = nn.Linear(n * d, 2 * n + n * n, bias=False)
        nn.init.normal_(self.phi.weight, std=(n * d) ** -0.5)
        self.a_pre, self.a_post, self.a_res = (nn.Parameter(torch.tensor(float(knobs.gate_init))) for _ in range(3))
        self.b_pre = nn.Parameter(torch.full((n,), _logit(1 / n) if n > 1 else 0.0))
        self.b_post = nn.Parameter(torch.zeros(n))
        p = knobs.res_diag_init if n > 1 else 1.0
        off = math.log((1 - p) / (n - 1)) if n > 1 else 0.0
        # stored flat ([n*n], viewed as n x n) so it is a no-weight-decay parameter like every bias:
        # decay would pull H_res from identity toward the uniform 1/n mixing
        self.b_res = nn.Parameter(torch.full((n, n), off).fill_diagonal_(math.log(p)).flatten())

    @staticmethod
    def expand(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        return x.repeat(1, 1, cfg.mhc_streams)

    @staticmethod
    def collapse(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        return x.unflatten(-1, (cfg.mhc_streams, cfg.d_model)).mean(dim=-2)

    def mappings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H_pre [..., n], H_post [..., n], H_res [..., n, n]) in fp32 for x [..., n*d]."""
        n = self.n
        xn = F.rms_norm(x.float(), (n * self.d,), eps=self.rms_eps)
        p_pre, p_post, p_res = F.linear(xn, self.phi.weight.float()).split([n, n, n * n], dim=-1)
        h_pre = torch.sigmoid(self.a_pre * p_pre + self.b_pre)
        h_post = 2 * torch.sigmoid(self.a_post * p_post + self.b_post)
        h_res = sinkhorn(self.a_res * p_res.unflatten(-1, (n, n)) + self.b_res.view(n, n), self.iters)
        return h_pre, h_post, h_res

    def update(self, x, sublayer):
        xs = x.unflatten(-1, (self.n, self.d))  # [B, T, n, d]
        h_pre, h_post, h_res = self.mappings(x)
        self.record(h_res=h_res)
        h_pre, h_post, h_res = (h.to(x.dtype) for h in (h_pre, h_post, h_res))
        u = sublayer(self.norm(torch.einsum("...i,...id->...d", h_pre, xs)))
        out = torch.einsum("...ij,...jd->...id", h_res, xs) + h_post.unsqueeze(-1) * u.unsqueeze(-2)
        return out.flatten(-2)


RESIDUAL_RULES: dict[str, type[ResidualRule]] = {
    "preln": PreLN,
    "postln": PostLN,
    "deepnorm": DeepNorm,
    "mhc": GateOnly,
    "ddl": DeltaOnly,
    "mgt": FullMGT,
    "ddl_rank1": Rank1Delta,
    "mhc_nstream": NStreamMHC,
}


def build_rule(cfg: ModelConfig) -> ResidualRule:
    return RESIDUAL_RULES[cfg.residual](cfg)


def rule_type(cfg: ModelConfig) -> type[ResidualRule]:
    """The class of the configured rule, for its stream hooks (expand / collapse)."""
    return RESIDUAL_RULES[cfg.residual]
