"""The single engine's initialisation, one layer at a time, for engines that never hold the
whole model: the pipeline (each stage keeps its layers), ZeRO-3 and FSDP (each rank keeps
a shard of every parameter; rank 0 replays and sends each layer out as it is built).

`torch.manual_seed(seed); Transformer(cfg)` draws from the CPU generator in construction
order: the embedding (nn.Embedding's normal init), the blocks in order, the final norm, the
head (nn.Linear's kaiming init), then normal_ on the embedding and, when untied, on the
head. `replayed_layers` re-runs that order building one module at a time, so a layer's
tensors are bit-equal to the full model's while only the embedding, the layer being
yielded and (at the end) the head exist (tests/test_engines.py checks it against `Transformer`). Layers are numbered as the pipeline
numbers them: 0 embedding, 1..L blocks, L+1 final norm, L+2 head.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from megatron_mgt.config import ModelConfig
from megatron_mgt.model import Transformer
from megatron_mgt.model.block import Block
from megatron_mgt.model.norm import make_norm


def replay_order(cfg: ModelConfig) -> list[int]:
    """The layers in the order `replayed_layers` yields them: the blocks and the final norm
    as they are built, then the embedding and head once their final normal_ init is drawn."""
    n = cfg.n_layers
    return [*range(1, n + 2), 0, n + 2]


def holds_own_tensors(cfg: ModelConfig, layer: int) -> bool:
    """Whether a layer has tensors of its own to write: not the tied head (the embedding's
    weight) nor the final norm of a model without one (nn.Identity)."""
    n = cfg.n_layers
    return not ((layer == n + 2 and cfg.tie_embeddings) or (layer == n + 1 and not cfg.final_norm))


def replayed_layers(cfg: ModelConfig, seed: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(layer, state dict) in `replay_order`, as `torch.manual_seed(seed); Transformer(cfg)`
    would initialise them: the final norm's is empty without `final_norm` (nn.Identity),
    the head of a tied model is the embedding's weight. Each yielded tensor belongs to a
    module nothing else holds (no copies). The caller's RNG state is left alone, also when
    the caller stops early (`close()` the generator, or let it be collected)."""
    n = cfg.n_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        for i in range(n):
            yield i + 1, Block(cfg).state_dict()
        yield n + 1, make_norm(cfg, cfg.d_model).state_dict() if cfg.final_norm else {}  # norms draw no random numbers
        head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(embed.weight, std=cfg.init_std)
        if not cfg.tie_embeddings:
            nn.init.normal_(head.weight, std=cfg.init_std)
        yield 0, {"weight": embed.weight.detach()}
        yield n + 2, {"weight": (embed.weight if cfg.tie_embeddings else head.weight).detach()}


def replay_init(cfg: ModelConfig, seed: int, keep: set[int]) -> dict[int, dict[str, torch.Tensor]]:
    """The state dicts of the layers in `keep` (a pipeline stage's), from `replayed_layers`;
    the layers it does not keep are dropped as they are built."""
    return {layer: state for layer, state in replayed_layers(cfg, seed) if layer in keep}


def model_layer(model: Transformer, layer: int) -> nn.Module:
    """The module of `model` that holds layer `layer` (numbered as in `replayed_layers`)."""
    n = model.cfg.n_layers
    if layer == 0:
        return model.embed
    if layer <= n:
        return model.layers[str(layer - 1)]
    return model.norm if layer == n + 1 else model.head
