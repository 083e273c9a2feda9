"""Pipeline partitioning: 200 blocks over 2/4/8/16 stages, optimality on small cases."""

from __future__ import annotations

import itertools
import random
from itertools import pairwise

import pytest

from megatron_mgt.config import ModelConfig
from megatron_mgt.engine.partition import describe, imbalance, layer_costs, partition_balanced, stage_costs


@pytest.mark.parametrize("stages", [2, 4, 8, 16])
def test_200_blocks_balance(stages):
    cfg = ModelConfig(n_layers=200, d_model=256, vocab_size=8000)
    costs = layer_costs(cfg, 256)
    parts = partition_balanced(costs, stages)
    print("\n" + describe(cfg, 256, stages))
    assert parts[0] == 0 and parts[-1] == len(costs) and len(parts) == stages + 1
    assert all(b > a for a, b in pairwise(parts))
    per_stage = stage_costs(costs, parts)
    # the bottleneck is within one block of the ideal (blocks are indivisible)
    assert max(per_stage) <= sum(costs) / stages + 1.0
    assert imbalance(costs, parts) < {2: 1.01, 4: 1.01, 8: 1.03, 16: 1.05}[stages]
    blocks = [sum(1 for i in range(a, b) if 1 <= i <= 200) for a, b in pairwise(parts)]
    assert sum(blocks) == 200
    # first and last stages carry embedding / head and get no more blocks than the middle ones
    assert blocks[0] <= min(blocks[1:-1] or blocks) and blocks[-1] <= min(blocks[1:-1] or blocks)


def test_heavy_head_takes_blocks_off_the_last_stage():
    cfg = ModelConfig(n_layers=200, d_model=256, vocab_size=256_000)  # head ~ 55 blocks of FLOPs
    costs = layer_costs(cfg, 256)
    assert costs[-1] > 40
    parts = partition_balanced(costs, 4)
    blocks = [sum(1 for i in range(a, b) if 1 <= i <= 200) for a, b in pairwise(parts)]
    assert blocks[-1] < blocks[1] - 30
    print(f"\nvocab 256k, 4 stages: blocks per stage {blocks}, imbalance {imbalance(costs, parts):.4f}")


def test_exact_on_small_cases_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n, p = rng.randint(1, 9), rng.randint(1, 4)
        if p > n:
            continue
        costs = [rng.choice([0.0, 0.5, 1.0, 2.0, 3.5]) for _ in range(n)]
        best = min(max(stage_costs(costs, [0, *cuts, n])) for cuts in itertools.combinations(range(1, n), p - 1))
        assert max(stage_costs(costs, partition_balanced(costs, p))) == pytest.approx(best)


def test_too_many_stages_is_an_error():
    with pytest.raises(ValueError, match="non-empty"):
        partition_balanced([1.0, 1.0], 3)


def test_partition_minimises_the_heaviest_stage_by_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        weights = [rng.randint(1, 9) for _ in range(rng.randint(3, 9))]
        parts = rng.randint(1, len(weights))
        bounds = partition_balanced(weights, parts)
        assert bounds[0] == 0 and bounds[-1] == len(weights) and len(bounds) == parts + 1
        assert all(a < b for a, b in itertools.pairwise(bounds))
        got = max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds))
        best = min(
            max(sum(weights[a:b]) for a, b in itertools.pairwise((0, *cuts, len(weights))))
            for cuts in itertools.combinations(range(1, len(weights)), parts - 1)
        )
        assert got == best
    with pytest.raises(ValueError):
        partition_balanced([1, 2], 3)
