"""mgt-plan: exact parameter counts, the bubble formula, stage splits, fit / no fit."""

from __future__ import annotations

import itertools
from dataclasses import replace
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
    assert "DOES NOT FIT" in out and "over        stage(s) above 80 GB: 0 (" in out
    assert out.rstrip().splitlines()[-1].startswith("advice      --activation-checkpoint-interval") and "still does not fit" in out
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


def test_activations_are_linear_in_seq_len_when_d_model_equals_it():
    # A fused kernel keeps nothing T x T, so every saved tensor grows linearly with T. At
    # d_model = seq_len a [B, T, d] activation has the attention matrix's last two dims;
    # it must still be counted (mgt-plan once dropped them all, 141.6 MB per mgt_200l block).
    for residual in ("preln", "mgt"):
        base = [*SMALL, f"model.residual={residual}", "model.max_seq_len=128"]
        at64, at128 = (build_plan(load_config(None, [*base, f"data.seq_len={t}"]), Cluster(nodes=1, gpus_per_node=1)) for t in (64, 128))
        assert at128.layer_activation_mb == pytest.approx(2 * at64.layer_activation_mb, abs=1e-5)  # up to fp32 copies of scalar alphas
        math_path = build_plan(load_config(None, [*base, "data.seq_len=64"]), Cluster(nodes=1, gpus_per_node=1, flash_attention=False))
        assert math_path.layer_activation_mb > at64.layer_activation_mb + 8 * 4 * 64 * 64 * 2 / 1e6  # + the [B, H, T, T] softmax


def test_fused_attention_saves_q_k_v_out_and_lse():
    import torch

    from megatron_mgt.plan import _FusedAttention, saved_bytes

    q, k, v = (torch.empty(2, 16, 4, 8, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    assert saved_bytes(lambda: _FusedAttention.apply(q, k, v), True) == 4 * q.numel() * 2 + 2 * 4 * 16 * 4


def test_200_layer_preset_per_block_figures():
    # d 2048 = T 2048, bf16, micro-batch 1, flash: the numbers docs/LAUNCH.md quotes
    mgt = build_plan(load_config(PRESET), Cluster(nodes=2, gpus_per_node=8, pipeline_stages=8))
    preln = build_plan(load_config(PRESET, ["model.residual=preln"]), Cluster(nodes=2, gpus_per_node=8, pipeline_stages=8))
    # measured: 393.4 MB (mgt: gate, beta and update in fp32 on the bf16 stream) and 175.3 MB (preln)
    assert 380 < mgt.layer_activation_mb < 410 and 165 < preln.layer_activation_mb < 185
    assert mgt.layer_input_mb == pytest.approx(2048 * 2048 * 2 / 1e6)


def test_a_stage_over_memory_gets_a_checkpointing_interval(capsys):
    cfg = load_config(PRESET, ["parallel.activation_checkpoint_interval=0"])
    plan = build_plan(cfg, Cluster(nodes=2, gpus_per_node=8, pipeline_stages=8))
    assert plan.stages[0].in_flight == 8 and plan.stages[-1].in_flight == 1
    assert plan.over and plan.over[0] == 0 and not plan.fits
    assert plan.advice_interval >= 1 and plan.advice_total_gb < 80
    fixed = build_plan(cfg, Cluster(nodes=2, gpus_per_node=8, pipeline_stages=8, activation_checkpoint_interval=plan.advice_interval))
    assert fixed.fits and max(s.total_gb for s in fixed.stages) == pytest.approx(plan.advice_total_gb)
    assert main([str(PRESET), "parallel.activation_checkpoint_interval=0", "--nodes", "2"]) == 1
    out = capsys.readouterr().out
    assert f"advice      --activation-checkpoint-interval {plan.advice_interval} " in out and ", fits" in out


def test_checkpoint_size_and_write_time(capsys):
    cfg = load_config(PRESET)
    plan = build_plan(cfg, Cluster(nodes=2, gpus_per_node=8, pipeline_stages=8, ckpt_write_gbps=4.0))
    assert plan.checkpoint_gb == pytest.approx(plan.total_params * (2 + 12) / 1e9)  # bf16 weights + fp32 master, m, v
    assert plan.checkpoint_write_s == pytest.approx(plan.checkpoint_gb / 4.0)
    assert main([str(PRESET), "--nodes", "2", "--ckpt-write-gbps", "4"]) == 0
    assert f"checkpoint  {plan.checkpoint_gb:.1f} GB" in capsys.readouterr().out


MEASURED_MODES = [(r, False, False) for r in ("preln", "postln", "deepnorm", "mhc", "ddl", "mgt", "ddl_rank1", "mhc_nstream")] + [
    (r, True, rec) for r in ("mhc", "ddl", "mgt") for rec in (False, True)
]


@pytest.mark.parametrize(("residual", "fused", "recompute"), MEASURED_MODES)
def test_planned_activation_bytes_are_what_autograd_saves_on_cpu(residual, fused, recompute):
    """The plan's per-block and head bytes (meta tensors, the fused-attention stand-in) equal
    the storages autograd really keeps for a CPU block and head (SDPA's CPU flash kernel), for
    every rule and every fused mode: the planner measures each variant, it does not assume."""
    import torch

    from megatron_mgt.plan import block_and_head_bytes, meta_model

    over = [*SMALL, f"model.residual={residual}", f"model.fused_residual={fused}", f"model.fused_recompute_projections={recompute}"]
    cfg = load_config(None, over)
    planned = block_and_head_bytes(meta_model(cfg, torch.float32), 2, 64, torch.float32, fused_attention=True)
    torch.manual_seed(0)
    measured = block_and_head_bytes(Transformer(cfg.model), 2, 64, torch.float32, fused_attention=False)
    assert planned == measured


def test_fused_modes_cut_mgt_block_activations_at_the_200_layer_preset():
    # bf16, d 2048, T 2048, flash (measured: eager 393.4, fused tail 225.6, recomputed projections 192.1, preln 175.3 MB)
    plans = {
        name: build_plan(load_config(PRESET, over), Cluster(nodes=2, gpus_per_node=8, pipeline_stages=8)).layer_activation_mb
        for name, over in {
            "eager": [],
            "tail": ["model.fused_residual=true"],
            "recompute": ["model.fused_residual=true", "model.fused_recompute_projections=true"],
            "preln": ["model.residual=preln"],
        }.items()
    }
    assert plans["preln"] < plans["recompute"] < plans["tail"] < plans["eager"]
    assert plans["recompute"] <= 1.15 * plans["preln"]  # issue 12's target


def test_sharded_engines_plan_their_own_states(capsys, tmp_path):
    """FSDP and ZeRO-2/3 keep other states per GPU than the pipeline's ZeRO-1 (state_layout),
    one stage holds a tied matrix once, and activation checkpointing is planned only where an
    engine does it."""
    base = [*SMALL, "parallel.pipeline_stages=1", "train.grad_accum_steps=4"]
    cluster = Cluster(nodes=1, gpus_per_node=4, pipeline_stages=1, activation_checkpoint_interval=2)  # as main() reads the preset's
    pipe = build_plan(load_config(None, base), cluster)
    n, dp = pipe.total_params, 4
    assert pipe.stages[0].params == n  # embedding and tied head on one stage: counted once
    block = sum(p.numel() for p in Transformer(load_config(None, SMALL).model).layers["0"].parameters())
    reuse_json = tmp_path / "zero3_reuse.json"
    reuse_json.write_text('{"zero_optimization": {"stage3_max_reuse_distance": 1000}}')
    rows = {
        "zero2": (["parallel.engine=deepspeed_zero", "parallel.zero_stage=2"], n * 2, n * 4 / dp, n * 12 / dp),
        # stage3_max_reuse_distance (1e9 parameters by default) keeps a model this small gathered whole
        "zero3": (["parallel.engine=deepspeed_zero", "parallel.zero_stage=3"], n * 2 / dp + n * 2, n * 4 / dp, n * 12 / dp),
        "zero3_reuse": (["parallel.engine=deepspeed_zero", "parallel.zero_stage=3", "parallel.deepspeed_config=" + str(reuse_json)], n * 2 / dp + (2 * block + 1000) * 2, n * 4 / dp, n * 12 / dp),
        # 4 micro-batches accumulate unsharded fp32 gradients by default
        "fsdp": (["parallel.engine=fsdp", "parallel.zero_stage=0"], n * 4 / dp + 2 * block * 2, n * 4, n * 8 / dp),
        "fsdp_rs": (["parallel.engine=fsdp", "parallel.zero_stage=0", "parallel.fsdp_reduce_every_micro_batch=true"], n * 4 / dp + 2 * block * 2, n * 4 / dp, n * 8 / dp),
        "fsdp_keep": (["parallel.engine=fsdp", "parallel.zero_stage=0", "parallel.fsdp_reshard_after_forward=false"], n * 4 / dp + cfg_layers(base) * block * 2, n * 4, n * 8 / dp),
    }
    for name, (extra, weights, grads, optim) in rows.items():
        plan = build_plan(load_config(None, [*base, "train.precision=bf16", *extra]), cluster)
        st = plan.stages[0]
        assert (st.weights_gb, st.grads_gb, st.optimizer_gb) == pytest.approx((weights / 1e9, grads / 1e9, optim / 1e9)), name
        assert plan.fits and plan.notes == [f"parallel.engine={plan.layout.engine.split()[0]} checkpoints every block or none (engine/single.checkpoint_blocks): planned with interval 1"], name
        every_block = build_plan(load_config(None, [*base, "train.precision=bf16"]), replace(cluster, activation_checkpoint_interval=1))
        assert st.activations_gb == pytest.approx(every_block.stages[0].activations_gb), name
        assert st.activations_gb < pipe.stages[0].activations_gb, name  # one block's inputs each, where the pipeline keeps every other
    assert pipe.cluster.activation_checkpoint_interval == 2 and not pipe.notes
    # the 200-layer model on FSDP over 16 GPUs without checkpointing: no fit; the advice says what would help
    fsdp_200 = [str(PRESET), "parallel.engine=fsdp", "parallel.pipeline_stages=1", "parallel.activation_checkpoint_interval=0", "parallel.zero_stage=0", "parallel.deepspeed_config=", "--nodes", "2", "--gpus-per-node", "8", "--pp", "1"]
    assert main([*fsdp_200, "--activation-checkpoint-interval", "0"]) == 1
    out = capsys.readouterr().out
    assert "states      fsdp (FSDP2), B/parameter per GPU: weights 4 / dp 16, grads 4 whole" in out and "fsdp_reduce_every_micro_batch=true shards the gradients" in out
    assert "advice      --activation-checkpoint-interval 1 (parallel.activation_checkpoint_interval)" in out


def cfg_layers(overrides: list[str]) -> int:
    return load_config(None, overrides).model.n_layers
