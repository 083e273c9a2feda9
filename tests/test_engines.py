"""Distributed engines on CPU (gloo, 2 processes via torchrun): the same loss sequence as
the single engine at the same seed and global batch, exact resume, config rules, and the
pipeline's initialisation replay.

Measured on this CPU (fp32, 6 steps, 3 layers, d=32, 2 micro-batches of 4 sequences):
max |loss - single| = 4.8e-7 for pipe / FSDP2 / ZeRO-2 (one float32 ulp at loss 5.5),
max |grad_norm - single| = 2.4e-7 (also for ZeRO-3, and for an untied 2-stage pipeline that
recomputes every layer, against the untied single engine). The tolerance below leaves a
few ulps of room."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_mgt.config import ConfigError, load_config
from megatron_mgt.engine.ds_common import deepspeed_config
from megatron_mgt.engine.pipeline import pipe_prefix
from megatron_mgt.engine.replay import replay_init
from megatron_mgt.model import Transformer
from tests.engine_runs import REFERENCE, REPO, SPLIT, STEPS, geometry_records, split, straight, train_records, valid_records

LOSS_TOL = 2e-6  # absolute, nats (fp32; measured 4.8e-7)
NORM_TOL = 2e-6


def _series(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(REFERENCE))
def test_same_loss_sequence_as_single(engine):
    ref, got = train_records(straight(REFERENCE[engine])), train_records(straight(engine))
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    d_loss = max(abs(a - b) for a, b in zip(_series(got, "loss"), _series(ref, "loss"), strict=True))
    d_norm = max(abs(a - b) for a, b in zip(_series(got, "grad_norm"), _series(ref, "grad_norm"), strict=True))
    ref_valid, got_valid = valid_records(straight(REFERENCE[engine])), valid_records(straight(engine))
    d_valid = max(abs(a["loss"] - b["loss"]) for a, b in zip(got_valid, ref_valid, strict=True))
    print(
        f"\n{engine} vs {REFERENCE[engine]} over {STEPS} steps: max|dloss| {d_loss:.2e}  max|dgrad_norm| {d_norm:.2e}  max|dvalid| {d_valid:.2e}"
    )
    assert d_loss <= LOSS_TOL and d_norm <= NORM_TOL and d_valid <= LOSS_TOL
    assert len(got_valid) == len(ref_valid) == 2
    assert _series(got, "lr") == pytest.approx(_series(ref, "lr"), rel=1e-12)
    # |update| from each engine's AdamW state (ZeRO partitions, FSDP shards, pipeline stages)
    assert _series(got, "update_norm") == pytest.approx(_series(ref, "update_norm"), rel=1e-4)
    # the loss really moved: the comparison is not between two flat lines
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.1


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(REFERENCE))
def test_same_geometry_telemetry_as_single(engine):
    """Live telemetry under every engine: the pipeline's record is assembled from what each
    stage measured of its own layers, and equals the whole model's."""
    ref, got = geometry_records(straight(REFERENCE[engine])), geometry_records(straight(engine))
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [0, SPLIT, STEPS]
    for a, b in zip(got, ref, strict=True):
        assert len(a["erank"]) == len(b["erank"]) == 4 and a["sublayers"] == b["sublayers"]
        for key in (
            "erank",
            "token_cosine",
            "relative_residual",
            "update_ratio",
            "beta_mean",
            "beta_q95",
            "beta_frac_negative",
            "erase_mean",
        ):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["pipe", "pipe_dp2", "fsdp", "zero2"])
def test_exact_resume(engine):
    whole, parts = straight(engine), split(engine)
    a, b = train_records(whole), train_records(parts)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert _series(a, "loss") == _series(b, "loss")  # bit for bit
    assert _series(a, "grad_norm") == _series(b, "grad_norm")
    assert [r["loss"] for r in valid_records(whole)] == [r["loss"] for r in valid_records(parts)]
    events = [json.loads(line) for line in (parts / "metrics.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == SPLIT and resumed[0]["rank_state"] == "own"
    ckpt = parts / "checkpoints" / f"step_{STEPS:08d}"
    assert (ckpt / "rank_00000.pt").is_file() and (ckpt / "rank_00001.pt").is_file()
    assert (parts / "checkpoints" / "latest").read_text().strip() == ckpt.name


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["single", "pipe", "fsdp", "zero2"])
def test_same_metrics_for_every_engine(engine):
    records = train_records(straight(engine))
    assert len(records) == STEPS  # the main rank alone writes metrics
    for r in records:
        assert {"loss", "grad_norm", "update_norm", "lr", "tokens_per_s", "mfu", "peak_mem_gib"} <= set(r)
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_gib"] > 0


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("residual", ["mgt", "preln", "deepnorm"])
def test_pipeline_init_replays_single_engine_init(tie, residual):
    cfg = load_config(
        None,
        [
            "model.n_layers=3",
            "model.d_model=32",
            "model.n_heads=2",
            "model.vocab_size=64",
            f"model.tie_embeddings={tie}",
            f"model.residual={residual}",
        ],
    ).model
    torch.manual_seed(7)
    reference = Transformer(cfg).state_dict()
    keep = set(range(cfg.n_layers + 3))
    replay = replay_init(cfg, 7, keep)
    rebuilt = {pipe_prefix(cfg, layer) + k: v for layer, state in replay.items() for k, v in state.items()}
    assert rebuilt.keys() == reference.keys()
    assert all(torch.equal(rebuilt[k], reference[k]) for k in reference)
    # a stage that keeps only some layers gets the same tensors, and the caller's RNG is left alone
    before = torch.get_rng_state()
    part = replay_init(cfg, 7, {2, cfg.n_layers + 2})
    assert torch.equal(torch.get_rng_state(), before)
    assert set(part) == {2, cfg.n_layers + 2}
    assert all(torch.equal(v, replay[2][k]) for k, v in part[2].items())


def test_pipeline_with_zero2_or_3_is_a_config_error():
    for stage in (2, 3):
        with pytest.raises(ConfigError, match="incompatible with pipeline parallelism"):
            load_config(None, ["parallel.engine=deepspeed_pipe", "parallel.pipeline_stages=2", f"parallel.zero_stage={stage}"])
    load_config(None, ["parallel.engine=deepspeed_pipe", "parallel.pipeline_stages=2", "parallel.zero_stage=1"])
    load_config(None, ["parallel.engine=deepspeed_zero", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="needs parallel.engine=deepspeed_pipe"):
        load_config(None, ["parallel.engine=fsdp", "parallel.pipeline_stages=2"])


def test_deepspeed_config_takes_training_knobs_from_the_yaml(tmp_path):
    cfg = load_config(
        None,
        [
            "parallel.engine=deepspeed_zero",
            "parallel.zero_stage=2",
            "parallel.deepspeed_config=configs/deepspeed/zero2.json",
            "train.micro_batch_size=3",
            "train.grad_accum_steps=5",
            "train.grad_clip=0.5",
        ],
    )
    ds = deepspeed_config(cfg, dp_size=4, bf16=False)
    assert ds["train_batch_size"] == 60 and ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["bf16"] == {"enabled": False}
    assert ds["checkpoint"]["parallel_write"] == {"pipeline_stage": True}  # the pipeline's replicas split the layer files
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"checkpoint": {"parallel_write": {"pipeline_stage": False}, "tag_validation": "Fail"}}))
    cfg.parallel.deepspeed_config = str(own)
    assert deepspeed_config(cfg, 1, False)["checkpoint"] == {"parallel_write": {"pipeline_stage": False}, "tag_validation": "Fail"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 64}))
    cfg.parallel.deepspeed_config = str(bad)
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        deepspeed_config(cfg, 1, False)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="parallel.zero_stage=2"):
        deepspeed_config(cfg, 1, False)


@pytest.mark.slow
def test_sharded_builds_never_hold_the_whole_model(tmp_path):
    """ZeRO-3 builds the model partitioned (deepspeed.zero.Init), FSDP on meta then its shards,
    and both replay the init one layer at a time: a rank's peak is its shard plus a few
    layers, where building the whole model costs all of it (48 blocks, d 512, 2 ranks;
    tests/sharded_init_memory.py)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_="65536", PROBE_OUT=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "tests" / "sharded_init_memory.py")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["shard_bytes"] * 2 >= r["full_bytes"] and r["full_bytes"] > 40 * r["block_bytes"]
        assert r["partitioned_kib"] * 1024 <= r["shard_bytes"] + 8 * r["block_bytes"], r  # its shard and a few layers in flight
        assert r["fsdp_kib"] * 1024 <= r["shard_bytes"] + 8 * r["block_bytes"], r
        assert min(r["partitioned_kib"], r["fsdp_kib"]) * 1024 >= 0.85 * r["shard_bytes"], r  # the shards themselves are seen
        assert r["whole_kib"] * 1024 >= 0.85 * r["full_bytes"], r  # the measure sees a whole model where one is built
        assert r["param_dtypes"] == ["torch.bfloat16"] and r["alpha_dtypes"] == ["torch.float32"] and r["alpha_values"] == [torch.tensor(0.1).item()], r  # fp32 0.1, not bf16 0.10009765625


def test_checkpoint_blocks_keeps_block_inputs_and_the_same_gradients():
    """parallel.activation_checkpoint_interval=1 outside the pipeline: every block saves only
    its input for backward (autograd's saved tensors, plan.saved_tensor_bytes), recomputes in
    backward, and the gradients are the eager ones; names and state dict are unchanged."""
    from megatron_mgt.engine.single import checkpoint_blocks
    from megatron_mgt.model import lm_loss
    from megatron_mgt.plan import saved_tensor_bytes

    cfg = load_config(None, ["model.n_layers=4", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64"]).model
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    grads, saved = {}, {}
    for interval in (0, 1):
        torch.manual_seed(3)
        model = Transformer(cfg)
        keys = list(model.state_dict())
        checkpoint_blocks(model, interval)
        assert list(model.state_dict()) == keys
        losses = []
        saved[interval] = saved_tensor_bytes(lambda m=model, out=losses: out.append(lm_loss(m(tokens[:, :-1]), tokens[:, 1:])))
        losses[0].backward()
        grads[interval] = {k: p.grad.clone() for k, p in model.named_parameters()}
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=0, atol=1e-6)
    import copy

    copied = copy.deepcopy(model)  # the checkpointed forward is bound to its own block
    for p in copied.parameters():
        p.data.zero_()
    assert not torch.equal(copied(tokens), model(tokens))
    stream = 2 * 16 * cfg.d_model * 4  # one block's input, fp32
    assert saved[1] < saved[0] / 3 and saved[0] - saved[1] > cfg.n_layers * 4 * stream
