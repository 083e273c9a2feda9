"""mgt-plan: exact parameter counts, the bubble formula, stage splits, fit / no fit."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from megatron_mgt.config import load_config
from megatron_mgt.flops import matmul_params
from megatron_mgt.model import Transformer
from megatron_mgt.plan import Cluster, build_plan, main, pipeline_bubble

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "mgt_200l.yaml"
SMALL = ["model.n_layers=6", "model.d_model=64", "model.n_heads=4", "model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=64"]


@pytest.mark.parametrize("residual", ["mgt", "preln", "postln", "deepnorm", "mhc", "ddl"])
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_counts_equal_a_real_model(residual, tied):
    cfg = load_config(None, [*SMALL, f"model.residual={residual}", f"model.tie_embeddings={tied}"])
    real = Transformer(cfg.model)
    plan = build_plan(cfg, Cluster(nodes=1, gpus_per_node=2, pipeline_stages=2))
    assert plan.total_params == sum(p.numel() for p in real.parameters())  # parameters() yields a tied tensor once
    assert plan.matmul_params == matmul_params(real)
    # Every stage's parameters add up to the model; a tied matrix is held by both end stages.
    duplicate = cfg.model.vocab_size * cfg.model.d_model if tied else 0
    assert sum(s.params for s in plan.stages) == plan.total_params + duplicate


def test_stage_split_is_the_pipeline_engines():
    from megatron_mgt.engine.partition import layer_costs, partition_balanced

    cfg = load_config(PRESET)
    plan = build_plan(cfg, Cluster(nodes=2, gpus_per_node=8, pipeline_stages=8))
    bounds = partition_balanced(layer_costs(cfg.model, cfg.data.seq_len, cfg.parallel.embed_cost), 8)
    assert [len(s.items) for s in plan.stages] == [b - a for a, b in itertools.pairwise(bounds)]
    assert plan.stages[0].items[0] == "embed" and plan.stages[-1].items[-1] == "head"
    assert sum(1 for s in plan.stages for it in s.items if it.startswith("layers.")) == 200
    assert "engine.partition" in plan.partition


def test_bubble_formula():
    assert pipeline_bubble(1, 16) == 0.0
    assert pipeline_bubble(8, 64) == pytest.approx(7 / 71)
    assert pipeline_bubble(2, 1) == pytest.approx(1 / 2)
    for p, m in itertools.product([2, 4, 8], [1, 8, 64]):
        # idle slots of p stages over the m + p - 1 time slots of a 1F1B (or GPipe) pass
        assert pipeline_bubble(p, m) == pytest.approx((p - 1) * p / ((m + p - 1) * p))
    cfg = load_config(PRESET)
    plan = build_plan(cfg, Cluster(nodes=2, gpus_per_node=8, pipeline_stages=8, micro_batches=32))
    assert plan.micro_batches == 32 and plan.bubble == pytest.approx(7 / 39)


def test_activation_memory_follows_the_1f1b_schedule():
    cfg = load_config(None, [*SMALL, "model.n_layers=8", "train.grad_accum_steps=16"])
    full = build_plan(cfg, Cluster(nodes=1, gpus_per_node=4, pipeline_stages=4))
    assert [s.in_flight for s in full.stages] == [4, 3, 2, 1]  # stage s holds p - s micro-batches
    ckpt = build_plan(cfg, Cluster(nodes=1, gpus_per_node=4, pipeline_stages=4, activation_checkpoint_interval=1))
    assert all(c.activations_gb < f.activations_gb for c, f in zip(ckpt.stages, full.stages, strict=True))
    # micro-batch 8 x T 64 x d 64 in bf16 (precision auto plans for a GPU)
    assert full.layer_input_mb == pytest.approx(8 * 64 * 64 * 2 / 1e6)
    double = build_plan(cfg, Cluster(nodes=1, gpus_per_node=4, pipeline_stages=4, micro_batch_size=16))
    assert double.layer_activation_mb == pytest.approx(2 * full.layer_activation_mb, rel=0.05)
    few = build_plan(cfg, Cluster(nodes=1, gpus_per_node=4, pipeline_stages=4, micro_batches=2))
    assert [s.in_flight for s in few.stages] == [2, 2, 2, 1]


def test_shipped_200_layer_preset_fits_its_cluster(capsys):
    assert main([str(PRESET), "--nodes", "2", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "pipeline 8 x data parallel 2" in out and "7/71 = 9.9%" in out and "FITS" in out
    assert len([line for line in out.splitlines() if line.strip().endswith("yes")]) == 8


def test_too_big_a_config_is_reported_as_not_fitting(capsys):
    # The 13.5 B-parameter model on one 80 GB GPU: weights, gradients and AdamW alone need ~240 GB.
    assert main([str(PRESET), "--nodes", "1", "--gpus-per-node", "1", "--pp", "1"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and out.rstrip().splitlines()[-1].startswith("            (try")
    cfg = load_config(PRESET)
    plan = build_plan(cfg, Cluster(nodes=1, gpus_per_node=1, pipeline_stages=1))
    assert not plan.fits and plan.stages[0].total_gb > 200
    # More GPUs than the cluster has is a problem too, not a silent plan.
    assert not build_plan(cfg, Cluster(nodes=1, gpus_per_node=8, pipeline_stages=8, data_parallel=2)).fits


def test_cli_reads_overrides_and_reports_errors(capsys):
    assert main([str(PRESET), "model.n_layers=16", "parallel.pipeline_stages=4", "--nodes", "1", "--gpus-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "16 layers" in out and "pipeline 4 x data parallel 1" in out
    assert main([str(PRESET), "model.n_layer=16"]) == 2
    assert "did you mean 'n_layers'" in capsys.readouterr().err


def test_meta_build_allocates_no_parameter_memory():
    import resource

    cfg = load_config(PRESET)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    plan = build_plan(cfg, Cluster(nodes=2, gpus_per_node=8, pipeline_stages=8))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert plan.total_params > 13e9 and grown < 1e9  # 13.5 B parameters counted without 54 GB of fp32
