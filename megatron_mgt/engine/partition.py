"""Pipeline stage partitioning: a cost per layer, then contiguous stages with the
smallest possible bottleneck. Plain Python, so it can be tested and printed without
processes (`python -m megatron_mgt.engine.partition 200 16`).

The pipeline's layer list is [embedding, block 0 .. block L-1, final norm, head]. Costs are
in units of one block's training FLOPs per token (fwd + bwd, the PaLM count of flops.py):

    block      1
    head       6 d V / block FLOPs (the LM head matmul; > 1 block at small d)
    embedding  `embed_cost` blocks (default 1, Megatron-LM's convention of counting the
               embedding as one layer: the lookup is cheap but its gradient, the tied-grad
               all-reduce and the V x d optimizer state land on the first stage)
    norm       0

The stage time of 1F1B is set by the slowest stage, so the partition minimises the
maximum stage cost (exact dynamic programme over contiguous splits).
"""

from __future__ import annotations

import sys
from functools import cache
from itertools import pairwise

from megatron_mgt.config import ModelConfig


def block_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of one block: 6 x (its matmul weights) + attention products.
    Weights are counted from a meta-device block, so every residual rule is priced right."""
    import torch
    from torch import nn

    from megatron_mgt.model.block import Block

    with torch.device("meta"):
        block = Block(cfg)
    matmul = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
    return 6.0 * matmul + 12.0 * cfg.d_model * seq_len


def layer_costs(cfg: ModelConfig, seq_len: int, embed_cost: float = 1.0) -> list[float]:
    """Cost of every pipeline layer [embedding, blocks..., norm, head] in block units."""
    head = 6.0 * cfg.d_model * cfg.vocab_size / block_flops(cfg, seq_len)
    return [embed_cost] + [1.0] * cfg.n_layers + [0.0, head]


def partition_balanced(costs: list[float], num_stages: int) -> list[int]:
    """Boundaries [0, b1, ..., len(costs)] of `num_stages` contiguous, non-empty stages that
    minimise the largest stage cost; among equal bottlenecks the earliest split wins."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot cut {n} layers into {num_stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @cache
    def best(start: int, stages: int) -> tuple[float, float, tuple[int, ...]]:
        """(bottleneck, sum of squared stage costs, cut points) for layers[start:] in
        `stages` stages; the squares break ties between equal bottlenecks towards even
        stages (else the first stage would be left light)."""
        if stages == 1:
            cost = prefix[n] - prefix[start]
            return cost, cost * cost, ()
        result = (float("inf"), float("inf"), ())
        for stop in range(start + 1, n - stages + 2):
            head = prefix[stop] - prefix[start]
            if head > result[0] + 1e-9:
                break  # stage costs only grow with stop
            rest, squares, cuts = best(stop, stages - 1)
            cand = (max(head, rest), head * head + squares)
            if cand[0] < result[0] - 1e-9 or (abs(cand[0] - result[0]) <= 1e-9 and cand[1] < result[1] - 1e-9):
                result = (*cand, (stop, *cuts))
        return result

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * num_stages + 100))
    cuts = best(0, num_stages)[2]
    best.cache_clear()
    return [0, *cuts, n]


def stage_costs(costs: list[float], parts: list[int]) -> list[float]:
    return [sum(costs[a:b]) for a, b in pairwise(parts)]


def imbalance(costs: list[float], parts: list[int]) -> float:
    """max stage cost / mean stage cost (1.0 is perfect)."""
    per_stage = stage_costs(costs, parts)
    return max(per_stage) / (sum(per_stage) / len(per_stage))


def describe(cfg: ModelConfig, seq_len: int, num_stages: int, embed_cost: float = 1.0) -> str:
    costs = layer_costs(cfg, seq_len, embed_cost)
    parts = partition_balanced(costs, num_stages)
    lines = [f"{cfg.n_layers} blocks, {num_stages} stages, head = {costs[-1]:.2f} blocks, embedding = {costs[0]:.2f}: imbalance {imbalance(costs, parts):.4f}"]
    for s, (a, b) in enumerate(pairwise(parts)):
        blocks = [i - 1 for i in range(a, b) if 1 <= i <= cfg.n_layers]
        extra = [name for i, name in ((0, "embed"), (cfg.n_layers + 1, "norm"), (cfg.n_layers + 2, "head")) if a <= i < b]
        span = f"blocks {blocks[0]}-{blocks[-1]}" if blocks else "no blocks"
        lines.append(f"  stage {s}: {span} ({len(blocks)}) {' '.join(extra)}  cost {sum(costs[a:b]):.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    n_layers = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    for p in [int(a) for a in sys.argv[2:]] or [2, 4, 8, 16]:
        print(describe(ModelConfig(n_layers=n_layers), 256, p))
