"""Decoder-only language model: embedding -> L blocks -> final norm -> LM head.

Blocks live in a ModuleDict keyed by layer index, so parameter names stay stable when a
pipeline engine cuts the stack into stages; forward skips a missing embedding, norm or
head (a stage holds only its part).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from megatron_mgt.config import ModelConfig
from megatron_mgt.model.attention import KVCache
from megatron_mgt.model.block import Block
from megatron_mgt.model.norm import make_norm
from megatron_mgt.model.residual import ResidualRule, rule_type


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.rule_type = rule_type(cfg)  # its expand/collapse hooks shape the residual stream
        self.embed: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm: nn.Module | None = make_norm(cfg, cfg.d_model) if cfg.final_norm else nn.Identity()
        self.head: nn.Linear | None = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=cfg.init_std)

    def forward(self, tokens: torch.Tensor, hidden: list[torch.Tensor] | None = None, cache: list[KVCache] | None = None) -> torch.Tensor:
        """tokens [B, T] (or the residual stream when this stage has no embedding) -> logits
        [B, T, V] (or the residual stream when it has no final norm). The stream is [B, T, d],
        or wider for a multi-stream rule: the embedding stage expands it, the final-norm
        stage collapses it. If `hidden` is a list, the (collapsed, [B, T, d]) stream after
        the embedding and after every block is appended. With `cache` (generation: one
        KVCache per block, `new_cache()`), tokens are the positions after those cached and
        their keys/values are appended; the residual rules act per token and need nothing."""
        hooks = self.rule_type
        x = hooks.expand(self.embed(tokens), self.cfg) if self.embed is not None else tokens
        if hidden is not None:
            hidden.append(hooks.collapse(x, self.cfg).detach())
        for i, block in enumerate(self.layers.values()):
            x = block(x) if cache is None else block(x, cache[i])
            if hidden is not None:
                hidden.append(hooks.collapse(x, self.cfg).detach())
        if self.norm is not None:
            x = self.norm(hooks.collapse(x, self.cfg))
        if self.head is not None:
            x = self.head(x)
        return x

    def new_cache(self) -> list[KVCache]:
        """An empty key/value cache, one per block, for `forward(..., cache=)`."""
        return [KVCache() for _ in self.layers]

    def residual_rules(self) -> Iterator[tuple[str, ResidualRule]]:
        """(name, rule) for every sublayer, in depth order: 'layers.3.attn', 'layers.3.mlp'."""
        for i, block in self.layers.items():
            yield f"layers.{i}.attn", block.attn_residual
            yield f"layers.{i}.mlp", block.mlp_residual


@contextlib.contextmanager
def capturing(model: Transformer) -> Iterator[None]:
    """Within the block, every residual rule keeps its last beta/alpha/update ratio."""
    rules = [rule for _, rule in model.residual_rules()]
    for rule in rules:
        rule.capture = True
    try:
        yield
    finally:
        for rule in rules:
            rule.capture = False
            rule.captured = {}


@torch.no_grad()
def capture_geometry(model: Transformer, tokens: torch.Tensor) -> dict:
    """One forward pass on `tokens` that returns what geometry needs:
    {'hidden': [L+1 tensors B x T x d], 'logits': ..., 'sublayers': {name: {beta, alpha,
    update_ratio}}} (beta/alpha only for rules that have them)."""
    hidden: list[torch.Tensor] = []
    with capturing(model):
        logits = model(tokens, hidden=hidden)
        sublayers = {name: dict(rule.captured) for name, rule in model.residual_rules()}
    return {"hidden": hidden, "logits": logits, "sublayers": sublayers}
