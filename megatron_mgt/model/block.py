"""One Transformer block: an attention sublayer and an MLP sublayer, each written into
the residual stream by its own residual rule. Self-contained: forward(x) -> x."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from megatron_mgt.config import ModelConfig
from megatron_mgt.model.attention import CausalSelfAttention, KVCache
from megatron_mgt.model.mlp import MLPS
from megatron_mgt.model.residual import build_rule


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.rope_theta, cfg.attention_kernel)
        self.mlp = MLPS[cfg.mlp](cfg.d_model, cfg.ffn_dim)
        self.attn_residual = build_rule(cfg)
        self.mlp_residual = build_rule(cfg)
        std = cfg.init_std
        depth_scaled = cfg.scale_init_by_depth and self.attn_residual.depth_scaled_init
        out_std = std / math.sqrt(2 * cfg.n_layers) if depth_scaled else std
        self.attn.init_weights(std, out_std, self.attn_residual.init_gain)
        self.mlp.init_weights(std, out_std, self.mlp_residual.init_gain)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x -> x after both sublayers; with `cache` the attention also reads and extends it."""
        attn = self.attn if cache is None else functools.partial(self.attn, cache=cache)
        x = self.attn_residual(x, attn)
        return self.mlp_residual(x, self.mlp)
