"""The residual family: how a sublayer F writes into the residual stream X.

Every rule is a small module with one job, `update(x, sublayer) -> new x`, behind the
registry `RESIDUAL_RULES`; the block never asks which rule it holds. Spec section 1-2:

    preln     X + F(LN(X))
    postln    LN(X + F(X))
    deepnorm  LN(a X + F(X)),  a = (2M)^(1/4), F's V/O/FFN init scaled by b = (8M)^(-1/4)
    mhc       X + V_mHC,                     V_mHC = F(LN(X)) * sigmoid(LN(X W_gate))
    ddl       X + beta * (F(LN(X)) - alpha X),  beta = lam tanh(X W_beta + b_beta) + eps
    mgt       X + beta * (V_mHC - alpha X)

With `capture = True` a rule keeps, for the last call, the ratio |X_new - X| / |X| per
sequence and (where it has them) beta and alpha, for geometry telemetry; otherwise it
keeps nothing.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from megatron_mgt.config import MGTConfig, ModelConfig

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

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        out = self.update(x, sublayer)
        if self.capture:
            delta = (out - x).detach().flatten(1).norm(dim=1)
            self.captured["update_ratio"] = delta / x.detach().flatten(1).norm(dim=1).clamp_min(1e-12)
        return out

    def record(self, **tensors: torch.Tensor) -> None:
        if self.capture:
            self.captured.update({k: v.detach() for k, v in tensors.items()})


class PreLN(ResidualRule):
    """X + F(LN(X))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def update(self, x, sublayer):
        return x + sublayer(self.norm(x))


class PostLN(ResidualRule):
    """LN(X + F(X))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def update(self, x, sublayer):
        return self.norm(x + sublayer(x))


class DeepNorm(ResidualRule):
    """LN(a X + F(X)) with a = (2M)^(1/4) and F's init scaled by b = (8M)^(-1/4),
    M = number of layers (DeepNet, decoder-only)."""

    depth_scaled_init = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.alpha = (2 * cfg.n_layers) ** 0.25
        self.init_gain = (8 * cfg.n_layers) ** -0.25

    def update(self, x, sublayer):
        return self.norm(self.alpha * x + sublayer(x))


class DirectionGate(nn.Module):
    """mHC rectification: V_mHC = V_raw * sigmoid(LN(X W_gate))."""

    def __init__(self, d_model: int, norm_eps: float, std: float):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm = nn.LayerNorm(d_model, eps=norm_eps)
        nn.init.normal_(self.proj.weight, std=std)

    def forward(self, v_raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v_raw * torch.sigmoid(self.norm(self.proj(x)))


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
        return self.lam * torch.tanh(self.proj(x)) + self.eps


class GeometricResidual(ResidualRule):
    """X + beta * (V - alpha X) with optional parts: the mHC gate makes V = V_mHC
    (else V = V_raw = F(LN X)); the DDL controller gives beta, alpha (else beta = 1,
    alpha = 0). Gate and controller read X or LN(X) (`controller_input`)."""

    def __init__(self, cfg: ModelConfig, gate: bool, delta: bool):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.read_normed = cfg.mgt.controller_input == "ln"
        self.gate = DirectionGate(cfg.d_model, cfg.norm_eps, cfg.init_std) if gate else None
        self.delta = DeltaController(cfg.d_model, cfg.mgt) if delta else None

    def update(self, x, sublayer):
        h = self.norm(x)
        v = sublayer(h)
        c = h if self.read_normed else x
        if self.gate is not None:
            v = self.gate(v, c)
        if self.delta is None:
            return x + v
        beta, alpha = self.delta.beta(c), self.delta.alpha
        self.record(beta=beta, alpha=alpha)
        return x + beta * (v - alpha * x)


RESIDUAL_RULES: dict[str, Callable[[ModelConfig], ResidualRule]] = {
    "preln": PreLN,
    "postln": PostLN,
    "deepnorm": DeepNorm,
    "mhc": lambda cfg: GeometricResidual(cfg, gate=True, delta=False),
    "ddl": lambda cfg: GeometricResidual(cfg, gate=False, delta=True),
    "mgt": lambda cfg: GeometricResidual(cfg, gate=True, delta=True),
}


def build_rule(cfg: ModelConfig) -> ResidualRule:
    return RESIDUAL_RULES[cfg.residual](cfg)
