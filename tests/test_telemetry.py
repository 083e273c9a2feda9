"""Live geometry telemetry: records in metrics.jsonl during a tiny training run."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config, tiny_overrides

from megatron_mgt.config import ConfigError, load_config
from megatron_mgt.metrics import read_metrics, wandb_scalars
from megatron_mgt.telemetry import latest_per_step, write_heatmaps
from megatron_mgt.train import train

LAYERS = 3
BETA = ("mgt", "ddl_rank1")  # rules with a beta


def run(shards, run_dir, **extra):
    cfg = load_config(None, tiny_overrides(*shards, run_dir, **extra))
    result = train(cfg)
    return cfg, result, read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.parametrize("residual, center", [("mgt", True), ("preln", False), ("ddl_rank1", True), ("mhc_nstream", True)])
def test_geometry_records_during_training(zipf_shards, tmp_path, residual, center):
    cfg, result, records = run(
        zipf_shards, tmp_path / "run", **{"log.geometry_every": 2, "model.residual": residual, "eval.center": center}
    )
    assert result.status == "finished"
    geo = [r for r in records if r["kind"] == "geometry"]
    assert [r["step"] for r in geo] == [0, 2, 4, 6, 8]  # step 0 = at init
    for r in geo:
        assert r["centered"] is center
        for key in ("erank", "token_cosine", "relative_residual"):
            assert len(r[key]) == LAYERS + 1, key
        assert all(0 < v <= 1 for v in r["erank"])
        assert all(-1 <= v <= 1 for v in r["token_cosine"])
        assert all(0 <= v <= 1 + 1e-9 for v in r["relative_residual"])
        assert r["sublayers"] == [f"layers.{i}.{s}" for i in range(LAYERS) for s in ("attn", "mlp")]
        assert len(r["update_ratio"]) == 2 * LAYERS and all(v > 0 for v in r["update_ratio"])
        if residual in BETA:
            assert all(math.isfinite(b) for b in r["beta_mean"])
            assert all(0 <= f <= 1 for f in r["beta_frac_negative"])
        else:
            assert r["beta_mean"] == [None] * (2 * LAYERS) and r["beta_frac_negative"] == [None] * (2 * LAYERS)
        assert r["seconds"] > 0
    if residual in BETA:  # beta starts at beta_init everywhere, then moves
        beta_init = cfg.model.mgt.beta_init if residual == "mgt" else cfg.model.ddl_rank1.beta_init
        assert geo[0]["beta_mean"] == pytest.approx([beta_init] * (2 * LAYERS), abs=1e-6)
        assert geo[-1]["beta_mean"] != geo[0]["beta_mean"]
    # wandb gets one scalar per layer; None entries and the flag are left out
    scalars = wandb_scalars(geo[-1], "geometry")
    assert "geometry/erank/003" in scalars and "geometry/update_ratio/005" in scalars
    assert "geometry/centered" not in scalars and ("geometry/beta_mean/000" in scalars) == (residual in BETA)
    assert ("h_res_diag" in geo[-1]) == (residual == "mhc_nstream")
    # the heat maps come from the metrics file alone
    written = write_heatmaps(tmp_path / "run" / "metrics.jsonl", tmp_path / "plots", residual)
    assert [p.name for p in written] == ["erank_heatmap.png", "token_cosine_heatmap.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_telemetry_does_not_change_training(zipf_shards, tmp_path):
    short = {"train.max_steps": 4, "train.save_every": 0, "train.eval_every": 2}
    _, _, with_geo = run(zipf_shards, tmp_path / "a", **{"log.geometry_every": 1, **short})
    _, _, without = run(zipf_shards, tmp_path / "b", **{"log.geometry_every": 0, **short})
    assert not [r for r in without if r["kind"] == "geometry"]
    assert len([r for r in with_geo if r["kind"] == "geometry"]) == 5
    losses = lambda recs: [r["loss"] for r in recs if r["kind"] in ("train", "valid")]  # noqa: E731
    assert losses(with_geo) == losses(without)


def test_gram_spectrum_records_equal_svd_and_costly_cadence_is_reported(zipf_shards, tmp_path):
    """eval.spectrum=gram gives the svd run's records (to 1e-6: it drops round-off-level s_i that svd keeps); a snapshot every step costs far
    more than 5% of a tiny run's time: one telemetry_costly event with the cadence that would fit."""
    short = {"train.max_steps": 4, "train.save_every": 0, "train.eval_every": 0, "log.geometry_every": 1}
    _, _, svd = run(zipf_shards, tmp_path / "svd", **short)
    with pytest.warns(UserWarning, match="geometry telemetry takes"):
        _, _, gram = run(zipf_shards, tmp_path / "gram", **{**short, "eval.spectrum": "gram"})
    geo = lambda recs: [r for r in recs if r["kind"] == "geometry"]  # noqa: E731
    assert len(geo(gram)) == len(geo(svd)) == 5
    for a, b in zip(geo(svd), geo(gram), strict=True):
        assert a["erank"] == pytest.approx(b["erank"], rel=1e-6) and a["token_cosine"] == b["token_cosine"]
    costly = [e for e in gram if e["kind"] == "event" and e["event"] == "telemetry_costly"]
    assert len(costly) == 1 and 0.05 < costly[0]["fraction"] < 1
    c = costly[0]  # the suggested cadence puts telemetry at <= 5%: S / (S + every' / every * W) <= 0.05
    assert c["suggested_geometry_every"] == math.ceil(c["seconds"] * 0.95 / (0.05 * c["training_seconds"]))
    assert c["seconds"] / (c["seconds"] + c["suggested_geometry_every"] * c["training_seconds"]) <= 0.05 + 1e-9
    with pytest.raises(ConfigError, match="spectrum"):
        load_config(None, ["eval.spectrum=qr"])


def test_resumed_run_does_not_repeat_init_and_heatmap_keeps_last_per_step(zipf_shards, tmp_path):
    run(zipf_shards, tmp_path / "r", **{"log.geometry_every": 2, "train.exit_at_step": 4})
    _, result, records = run(zipf_shards, tmp_path / "r", **{"log.geometry_every": 2})
    assert result.status == "finished"
    steps = [r["step"] for r in records if r["kind"] == "geometry"]
    assert steps == [0, 2, 4, 6, 8]
    # mgt-eval writes the layer x step heat maps next to its own plots
    from megatron_mgt.evaluate import evaluate

    evaluate(load_config(tmp_path / "r" / "config.yaml"), tmp_path / "r")
    for png in ("erank_heatmap.png", "token_cosine_heatmap.png", "erank_vs_depth.png"):
        assert (tmp_path / "r" / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    dup = [{"step": 2, "v": 1}, {"step": 0, "v": 0}, {"step": 2, "v": 2}]
    assert latest_per_step(dup) == [{"step": 0, "v": 0}, {"step": 2, "v": 2}]


def test_geometry_every_validated():
    with pytest.raises(ConfigError, match="geometry_every"):
        load_config(None, ["log.geometry_every=-1"])


def test_nstream_snapshot_record_has_h_res_and_mean_stream_layers():
    from megatron_mgt.geometry import geometry_snapshot
    from megatron_mgt.model import Transformer
    from megatron_mgt.telemetry import snapshot_record

    torch.manual_seed(0)
    cfg = tiny_config("mhc_nstream", n_layers=2)
    probe = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    record = snapshot_record(geometry_snapshot(Transformer(cfg), probe, True), step=0)
    assert len(record["erank"]) == 3 and len(record["h_res_diag"]) == 4
    assert all(0.9 < v < 1 for v in record["h_res_diag"])  # res_diag_init 0.95
    assert all(0 <= v < 5e-4 for v in record["h_res_col_err"])
    assert "h_res_diag" not in snapshot_record(geometry_snapshot(Transformer(tiny_config("preln", n_layers=2)), probe, True), 0)


def test_wandb_gets_the_heat_maps_as_images(zipf_shards, tmp_path, monkeypatch):
    """With wandb on (offline here), every snapshot also logs the layer x step heat maps."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run(zipf_shards, tmp_path / "run", **{"log.geometry_every": 4, "log.wandb": "offline", "train.max_steps": 4})
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    images = sorted(p.name.split("_")[0] + "_" + p.name.split("_")[1] for p in offline.rglob("media/images/geometry/*.png"))
    assert images.count("erank_heatmap") == 2 and images.count("token_cosine") == 2, images  # steps 0 and 4
