"""Checkpoint conversion pipe / FSDP-DCP / ZeRO <-> single file: converted weights give the
same evaluation loss, round trips are exact, and a converted checkpoint loads into the
other engine and trains on from its step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_mgt.checkpoint import find_checkpoint
from megatron_mgt.config import load_config
from megatron_mgt.convert import convert, main
from megatron_mgt.engine import detect_layout
from megatron_mgt.evaluate import load_model, perplexity
from tests.engine_runs import GLOBAL_MICRO, STEPS, launch, overrides, root, straight, train_records, valid_records

EVAL_TOL = 2e-6  # nats; the engines' own evaluation vs the converted model.pt in evaluate.py


def _eval_loss(run_dir: Path, checkpoint: Path) -> float:
    """evaluate.py's perplexity on `checkpoint`/model.pt over the windows the trainer evaluated."""
    cfg = load_config(run_dir / "config.yaml", [f"train.micro_batch_size={GLOBAL_MICRO}", f"eval.batches={2}", "train.device=cpu"])
    return perplexity(load_model(cfg, checkpoint, torch.device("cpu")), cfg, torch.device("cpu"))["loss"]


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "layout"), [("pipe", "pipe"), ("fsdp", "dcp"), ("zero2", "zero")])
def test_converted_checkpoint_gives_the_same_eval_loss(engine, layout, tmp_path):
    run_dir = straight(engine)
    ckpt = find_checkpoint(run_dir / "checkpoints", "auto")
    assert detect_layout(ckpt) == layout
    out = convert(ckpt, tmp_path / "single", "single")
    assert detect_layout(out) == "single"
    logged = valid_records(run_dir)[-1]
    assert logged["step"] == STEPS
    loss = _eval_loss(run_dir, out)
    print(f"\n{engine}: engine's valid loss {logged['loss']:.7f}, converted model.pt in evaluate.py {loss:.7f}")
    assert abs(loss - logged["loss"]) <= EVAL_TOL
    assert _eval_loss(run_dir, ckpt) == loss  # evaluate.py also reads the engine's layout directly


@pytest.mark.slow
def test_round_trips_are_exact(tmp_path):
    single = find_checkpoint(straight("single") / "checkpoints", "auto")
    reference = torch.load(single / "model.pt")
    assert main([str(single), str(tmp_path / "pipe"), "--to", "pipe"]) == 0
    assert main([str(tmp_path / "pipe"), str(tmp_path / "dcp"), "--to", "dcp"]) == 0
    assert main([str(tmp_path / "dcp"), str(tmp_path / "back"), "--to", "single"]) == 0
    back = torch.load(tmp_path / "back" / "model.pt")
    assert back.keys() == reference.keys()
    assert all(torch.equal(back[k], reference[k]) for k in reference)
    # the tied head is stored once in the pipeline layout and shared again on the way back
    n = load_config(straight("single") / "config.yaml").model.n_layers
    assert not (tmp_path / "pipe" / f"layer_{n + 2:02d}-model_states.pt").exists()
    assert back["head.weight"].data_ptr() == back["embed.weight"].data_ptr()
    assert main([str(single), str(tmp_path / "back"), "--to", "single"]) == 2  # refuses a non-empty target


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "layout"), [("pipe", "pipe"), ("fsdp", "dcp")])
def test_converted_single_checkpoint_trains_on_in_another_engine(engine, layout, tmp_path):
    """single -> pipe / dcp weights, resumed for one step by the other engine, matches the
    single engine resumed from the same weights (both with fresh AdamW moments)."""
    single = find_checkpoint(straight("single") / "checkpoints", "auto")
    weights = convert(single, root() / f"weights_{engine}" / layout, layout)
    reference = convert(single, root() / f"weights_{engine}" / "single", "single")
    results = {}
    for name, source in (("single", reference), (engine, weights)):
        run_dir = root() / f"from_weights_{engine}_{name}"
        launch(name, overrides(name, run_dir, **{"train.resume": str(source), "train.max_steps": STEPS + 1}))
        results[name] = (train_records(run_dir), valid_records(run_dir))
    (ref_train, ref_valid), (got_train, got_valid) = results["single"], results[engine]
    assert [r["step"] for r in got_train] == [r["step"] for r in ref_train] == [STEPS + 1]
    assert abs(got_train[0]["loss"] - ref_train[0]["loss"]) <= EVAL_TOL
    assert got_train[0]["lr"] == pytest.approx(ref_train[0]["lr"], rel=1e-12)
    assert abs(got_valid[-1]["loss"] - ref_valid[-1]["loss"]) <= EVAL_TOL
