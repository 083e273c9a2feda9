"""The model's normalisation layer, one rule for every norm (`model.norm`):

    layernorm  LN(x)      = (x - mean(x)) / sqrt(var(x) + eps) * w + b
    rmsnorm    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w

over the last dimension, eps = `model.norm_eps`, w = 1 and b = 0 at init (no random draw, so
the choice leaves the RNG order of construction alone). Every pre-norm, post-norm, gate norm
and final norm of the model, and the pipeline's final-norm stage, are built here.
"""

from __future__ import annotations

from torch import nn

from megatron_mgt.config import ModelConfig

NORM_CLASSES: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


def norm_class(cfg: ModelConfig) -> type[nn.Module]:
    """The module type of `model.norm` (nn.LayerNorm or nn.RMSNorm)."""
    return NORM_CLASSES[cfg.norm]


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """A `model.norm` layer over the last `dim` channels with eps = `model.norm_eps`."""
    return norm_class(cfg)(dim, eps=cfg.norm_eps)
