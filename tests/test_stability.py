"""Stability monitoring: the spike rule, and each response (record, skip, rollback) on a real
CPU run whose training shard has one batch corrupted on disk (a rare token repeated at the
windows the loader reads at a chosen step), plus the exact AdamW update norm."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_mgt.checkpoint import find_checkpoint
from megatron_mgt.config import ConfigError, StabilityConfig, load_config
from megatron_mgt.data.indexed import bin_path, idx_path
from megatron_mgt.data.loader import TokenBatchLoader
from megatron_mgt.engine.optim import adamw_update_sq_norm, scheduled_lrs
from megatron_mgt.engine.single import SingleEngine
from megatron_mgt.metrics import read_metrics
from megatron_mgt.stability import PRE_STEP_KINDS, Anomaly, StabilityMonitor
from megatron_mgt.train import train
from tests.conftest import tiny_overrides

SPIKE_STEP, STEPS, SEQ, BATCH, SEED = 14, 18, 32, 4, 1234
# act_on=any: on this tiny model the corrupted batch trips the gradient norm, not the loss
MONITOR = {"stability.window": 6, "stability.min_history": 6, "stability.z": 3.0, "stability.loss_rel": 0.15, "stability.act_on": "any"}


def test_spike_rule():
    monitor = StabilityMonitor(StabilityConfig(window=5, min_history=5, z=3.0, loss_rel=0.1))
    for value in (2.0, 2.1, 1.9, 2.0, 2.05):
        assert monitor.check({"loss": value}) == []  # too little history yet
        monitor.accept({"loss": value})
    assert monitor.check({"loss": 2.15}) == []  # inside mean + max(3 std, 10%)
    (spike,) = monitor.check({"loss": 2.6})
    assert spike.metric == "loss" and spike.threshold == pytest.approx(2.01 + max(3 * np.std([2.0, 2.1, 1.9, 2.0, 2.05]), 0.201))
    (bad,) = monitor.check({"loss": math.nan, "update_norm": 1.0})
    assert bad.metric == "non_finite"
    state = monitor.state_dict()
    other = StabilityMonitor(monitor.cfg)
    other.load_state_dict(state)
    assert other.state_dict() == state


def corrupted_shard(prefix: str, out: Path, step: int) -> str:
    """A copy of the shard whose windows of global step `step` (1-based) hold one rare token
    id over and over (a run of garbage, as a broken document would): a corrupted batch on
    disk, where the trainer's loader will read it."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / "train"
    shutil.copy(bin_path(prefix), bin_path(target))
    shutil.copy(idx_path(prefix), idx_path(target))
    loader = TokenBatchLoader(target, SEQ, BATCH, SEED)
    tokens = np.memmap(bin_path(target), dtype=np.uint16, mode="r+")
    for window in loader.batch_windows((step - 1) * BATCH):
        tokens[window * SEQ + 1 : window * SEQ + SEQ + 1] = 255  # the targets of that window
    tokens.flush()
    return str(target)


@pytest.fixture(scope="module")
def bad_shard(zipf_shards, tmp_path_factory):
    return corrupted_shard(zipf_shards[0], tmp_path_factory.mktemp("bad"), SPIKE_STEP), zipf_shards[1]


def run(shards, run_dir: Path, response: str, **extra):
    overrides = {
        "train.max_steps": STEPS,
        "train.save_every": 5,
        "train.keep_checkpoints": 0,
        "train.eval_every": 0,
        "train.lr": 3e-3,
        "stability.response": response,
        **MONITOR,
        **extra,
    }
    return train(load_config(None, tiny_overrides(*shards, run_dir, **overrides)))


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl", "train")]


def test_record_logs_the_spike_and_goes_on(bad_shard, zipf_shards, tmp_path):
    result = run(bad_shard, tmp_path / "bad", "record")
    assert result.status == "finished" and result.step == STEPS
    (spike,) = read_metrics(tmp_path / "bad" / "metrics.jsonl", "anomaly")
    # the rare token's gradient is what jumps (4x its mean here); the loss rises by ~5% only
    assert spike["step"] == SPIKE_STEP and spike["metric"] in PRE_STEP_KINDS and spike["response"] == "record" and spike["applied"]
    assert spike["value"] > spike["threshold"] and spike["size"] > 2
    assert read_metrics(tmp_path / "bad" / "anomalies.jsonl") == [spike]
    assert [s for s, _ in losses(tmp_path / "bad")] == list(range(1, STEPS + 1))
    run(zipf_shards, tmp_path / "clean", "record")  # the control: the same run on clean data has no anomaly
    assert read_metrics(tmp_path / "clean" / "metrics.jsonl", "anomaly") == []
    assert losses(tmp_path / "clean")[: SPIKE_STEP - 1] == losses(tmp_path / "bad")[: SPIKE_STEP - 1]


def test_skip_withholds_the_update(bad_shard, tmp_path):
    result = run(bad_shard, tmp_path / "run", "skip", **{"train.save_every": 1})
    assert result.status == "finished" and result.step == STEPS
    (spike,) = read_metrics(tmp_path / "run" / "metrics.jsonl", "anomaly")
    assert spike["step"] == SPIKE_STEP and spike["response"] == "skip" and not spike["applied"]
    ckpt = tmp_path / "run" / "checkpoints"
    before = torch.load(ckpt / f"step_{SPIKE_STEP - 1:08d}" / "model.pt")
    after = torch.load(ckpt / f"step_{SPIKE_STEP:08d}" / "model.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bad batch changed nothing
    later = torch.load(ckpt / f"step_{SPIKE_STEP + 1:08d}" / "model.pt")
    assert not all(torch.equal(after[k], later[k]) for k in after)  # the next one did


def test_rollback_replays_the_data_order_and_leaves_out_the_bad_batch(bad_shard, tmp_path):
    result = run(bad_shard, tmp_path / "a", "rollback")
    assert result.status == "finished" and result.step == STEPS
    metrics = tmp_path / "a" / "metrics.jsonl"
    (spike,) = read_metrics(metrics, "anomaly")
    assert spike["step"] == SPIKE_STEP and spike["response"] == "rollback"
    events = {e["event"]: e for e in read_metrics(metrics, "event")}
    assert events["rollback"]["checkpoint"].endswith("step_00000010") and events["rollback"]["skip_position"] == (SPIKE_STEP - 1) * BATCH
    assert events["skipped_batch"]["position"] == (SPIKE_STEP - 1) * BATCH and events["skipped_batch"]["step"] == SPIKE_STEP - 1
    seq = losses(tmp_path / "a")
    first, replay = seq[: SPIKE_STEP - 1], seq[SPIKE_STEP - 1 :]
    assert [s for s, _ in replay] == list(range(11, STEPS + 1))
    assert replay[: SPIKE_STEP - 11] == first[10:]  # steps 11-13 replayed bit for bit
    assert max(loss for _, loss in replay) < spike["value"]  # the bad batch never came back

    again = run(bad_shard, tmp_path / "b", "rollback")  # deterministic
    assert losses(tmp_path / "b") == seq and again.last_loss == result.last_loss
    # stop after the rollback, resume in a new trainer: the left-out position survives the checkpoint
    run(bad_shard, tmp_path / "c", "rollback", **{"train.exit_at_step": SPIKE_STEP + 1})
    run(bad_shard, tmp_path / "c", "rollback")
    assert [x for x in losses(tmp_path / "c") if x[0] > SPIKE_STEP + 1] == [x for x in replay if x[0] > SPIKE_STEP + 1]
    assert len(read_metrics(tmp_path / "c" / "metrics.jsonl", "anomaly")) == 1


def test_act_on_loss_records_norm_spikes_only(bad_shard, tmp_path):
    result = run(bad_shard, tmp_path / "run", "rollback", **{"stability.act_on": "loss"})
    assert result.status == "finished"
    (spike,) = read_metrics(tmp_path / "run" / "metrics.jsonl", "anomaly")
    assert spike["metric"] == "grad_norm" and spike["response"] == "record"  # not a loss spike: no rollback
    assert not [e for e in read_metrics(tmp_path / "run" / "metrics.jsonl", "event") if e["event"] == "rollback"]
    monitor = StabilityMonitor(StabilityConfig(act_on="loss"))
    assert [
        monitor.triggers(a)
        for a in (Anomaly("loss", 1, 0, 0, 0), Anomaly("non_finite", math.nan, 0, 0, 0), Anomaly("update_norm", 1, 0, 0, 0))
    ] == [True, True, False]


def test_too_many_actions_stop_the_run(bad_shard, tmp_path):
    from megatron_mgt.train import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="max_actions=0"):
        run(bad_shard, tmp_path / "run", "skip", **{"stability.max_actions": 0})


def test_skip_is_refused_where_deepspeed_steps_itself():
    with pytest.raises(ConfigError, match="stability.response=skip with parallel.engine=deepspeed_pipe"):
        load_config(None, ["stability.response=skip", "parallel.engine=deepspeed_pipe"])


def test_update_norm_is_the_applied_update(zipf_shards, tmp_path):
    """adamw_update_sq_norm from AdamW's state equals |theta_after - theta_before| measured."""
    cfg = load_config(None, tiny_overrides(*zipf_shards, tmp_path, **{"train.weight_decay": 0.1, "train.warmup_steps": 1}))
    engine = SingleEngine(cfg, torch.device("cpu"))
    loader = TokenBatchLoader(zipf_shards[0], SEQ, BATCH, SEED)
    for _ in range(3):
        before = [p.detach().clone() for p in engine.model.parameters()]
        out = engine.train_step([loader.next_batch()])
        measured = math.sqrt(
            sum(((p.detach() - b).double() ** 2).sum().item() for p, b in zip(engine.model.parameters(), before, strict=True))
        )
        assert out.applied and out.update_norm == pytest.approx(measured, rel=1e-4)
        assert math.sqrt(adamw_update_sq_norm(engine.optimizer, scheduled_lrs(engine.scheduler)).item()) == pytest.approx(
            measured, rel=1e-4
        )
    assert find_checkpoint(tmp_path / "checkpoints", "auto") is None


def test_compare_runs(bad_shard, zipf_shards, tmp_path, capsys):
    import json

    from megatron_mgt.compare import ema
    from megatron_mgt.compare import main as compare_main

    run(bad_shard, tmp_path / "spiky", "record", **{"log.geometry_every": 6, "train.eval_every": 6})
    run(zipf_shards, tmp_path / "clean", "record", **{"log.geometry_every": 6, "train.eval_every": 6})
    out = tmp_path / "cmp"
    assert compare_main([str(tmp_path / "spiky"), str(tmp_path / "clean"), "--out", str(out)]) == 0
    assert "| spiky | mgt | 3 | 18 |" in capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    spiky, clean = result["runs"]
    assert (spiky["spikes"], clean["spikes"]) == (1, 0) and spiky["steps"] == clean["steps"] == STEPS
    assert result["loss_target"] == max(spiky["final_smoothed_loss"], clean["final_smoothed_loss"])
    smooth = ema([loss for _, loss in losses(tmp_path / "clean")])
    reached = next(i for i, s in enumerate(smooth) if s <= result["loss_target"])
    assert clean["steps_to_target"] == 1 + reached
    assert clean["seconds_to_target"] == read_metrics(tmp_path / "clean" / "metrics.jsonl", "train")[reached]["train_seconds"] > 0
    valid = read_metrics(tmp_path / "spiky" / "metrics.jsonl", "valid")
    assert spiky["final_valid_ppl"] == pytest.approx(math.exp(valid[-1]["loss"])) and spiky["best_valid_ppl"] <= spiky["final_valid_ppl"]
    geo = read_metrics(tmp_path / "spiky" / "metrics.jsonl", "geometry")[-1]
    assert geo["step"] == STEPS and spiky["erank_last"] == geo["erank"][-1] and 0 <= spiky["neg_beta_deep"] <= 1
    for png in ("loss_curves.png", "grad_norm.png", "erank_heatmap_spiky.png", "erank_heatmap_clean.png"):
        assert (out / png).stat().st_size > 1000
    assert compare_main([str(tmp_path / "clean"), "--out", str(out), "--loss", "0.5"]) == 0
    assert json.loads((out / "compare.json").read_text())["runs"][0]["steps_to_target"] is None  # never reached
    assert compare_main([str(tmp_path / "nothing")]) == 2
