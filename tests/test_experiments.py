"""The protocol runners (megatron_mgt/experiments) on micro presets: outputs, keys, resume."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from megatron_mgt.experiments.ablation import synergy
from megatron_mgt.experiments.cli import main as experiment_main
from megatron_mgt.experiments.cli import run_experiment
from megatron_mgt.experiments.stats import pearson, spearman

MICRO = {
    "model": {"vocab_size": 256, "d_model": 32, "n_heads": 2, "max_seq_len": 32},
    "data": {"seq_len": 32},
    "train": {"seed": 1, "micro_batch_size": 4, "max_steps": 6, "warmup_steps": 2, "eval_every": 0, "eval_batches": 2, "save_every": 3, "keep_checkpoints": 10, "threads": 1},
    "log": {"every": 1, "wandb": "disabled", "progress": False},
    "eval": {"batches": 2, "geometry_batch": 2},
}


@pytest.fixture(scope="module")
def micro(tmp_path_factory, zipf_shards):
    """(write_preset(name, grid) -> path, pool dir, root) sharing one run pool."""
    root = tmp_path_factory.mktemp("experiments")
    base = dict(MICRO, data={**MICRO["data"], "train_prefix": zipf_shards[0], "valid_prefix": zipf_shards[1]})
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    pool = root / "pool"

    def write_preset(name: str, grid: dict, overrides: dict | None = None):
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"experiment": name, "base": "base.yaml", "out": str(root / "out" / name), "pool": str(pool), "grid": grid, "overrides": overrides or {}}))
        return path

    return write_preset, pool, root


def _check_outputs(out, keys):
    results = json.loads((out / "results.json").read_text())
    for key in ("experiment", "grid", "base_config", *keys):
        assert key in results, key
    assert (out / "results.md").read_text().startswith("# ")
    assert list(out.glob("*.png")), "no plots"
    return results


def test_synergy_formula():
    assert synergy(3.0, 2.0, 2.5, 2.8) == pytest.approx(1.0 / 0.7)
    assert synergy(3.0, 2.3, 2.5, 2.8) == pytest.approx(1.0)  # additive gains
    assert synergy(3.0, 2.9, 2.5, 2.8) < 1  # subadditive
    assert math.isnan(synergy(3.0, 2.0, 3.0, 3.0))  # no single-mechanism gain
    assert math.isnan(synergy(3.0, float("nan"), 2.5, 2.8))  # a diverged run


def test_correlations():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 2], [1, 2]))


def test_depth_scaling_and_resume(micro):
    write_preset, pool, root = micro
    preset = write_preset("depth_scaling", {"variants": ["preln", "mgt"], "depths": [1, 2], "seeds": [1]})
    results = run_experiment("depth_scaling", preset)
    out = root / "out" / "depth_scaling"
    _check_outputs(out, ("table", "runs"))
    assert {(r["variant"], r["depth"]) for r in results["table"]} == {("preln", 1), ("preln", 2), ("mgt", 1), ("mgt", 2)}
    for r in results["runs"]:
        assert math.isfinite(r["valid_loss"]) and 0 < r["erank_final_layer"] <= 1 and len(r["erank"]) == r["n_layers"] + 1
    metrics = {p: p.stat().st_mtime_ns for p in pool.glob("*/metrics.jsonl")}
    assert len(metrics) == 4
    # Second invocation: every run is finished, nothing retrains.
    run_experiment("depth_scaling", preset)
    assert {p: p.stat().st_mtime_ns for p in pool.glob("*/metrics.jsonl")} == metrics


def test_interrupted_run_resumes(micro):
    write_preset, pool, root = micro
    preset = write_preset("depth_scaling", {"variants": ["preln"], "depths": [3], "seeds": [1]})
    # An interrupted run: trained to step 3 under the pool's naming; the runner resumes it.
    from megatron_mgt.config import derive
    from megatron_mgt.experiments.common import load_experiment, run_name
    from megatron_mgt.train import train

    exp = load_experiment("depth_scaling", preset)
    cfg = derive(exp.base, {"model.residual": "preln", "model.n_layers": 3, "train.seed": 1})
    run_dir = pool / run_name(cfg)
    train(derive(cfg, {"train.run_dir": str(run_dir), "train.exit_at_step": 3}))
    run_experiment("depth_scaling", preset)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resumed" for e in events)
    assert (run_dir / "eval" / "eval.json").is_file()


def test_ablation(micro):
    write_preset, _, root = micro
    preset = write_preset("ablation", {"variants": ["preln", "mhc", "ddl", "mgt"], "depth": 1, "seeds": [1]})
    results = run_experiment("ablation", preset)
    _check_outputs(root / "out" / "ablation", ("table", "synergy", "runs"))
    assert list(results["synergy"]["per_seed"]) == [1]
    assert {"mean_over_seeds", "std_over_seeds", "from_mean_losses"} <= set(results["synergy"])


def test_rank_evolution_and_beta(micro):
    write_preset, _, root = micro
    results = run_experiment("rank_evolution", write_preset("rank_evolution", {"variants": ["preln", "mgt"], "depths": [2], "seeds": [1]}))
    _check_outputs(root / "out" / "rank_evolution", ("table", "runs", "centered"))
    assert [p["step"] for p in results["runs"][0]["evolution"]] == [0, 3, 6]
    # beta_distribution reuses the mgt run and its evolution, through the CLI.
    preset = write_preset("beta_distribution", {"variants": ["mgt"], "depths": [2], "seeds": [1]})
    assert experiment_main(["beta_distribution", "--preset", str(preset)]) == 0
    beta = _check_outputs(root / "out" / "beta_distribution", ("table", "runs"))
    row = beta["table"][0]
    assert {"frac_negative_deep_third", "spearman_negfrac_depth", "spearman_negfrac_erank_out"} <= set(row)
    assert [p["step"] for p in beta["runs"][0]["over_steps"]] == [0, 3, 6]


def test_copy_task(micro):
    write_preset, pool, root = micro
    preset = write_preset("copy_task", {"variants": ["preln"], "depths": [1], "n": 3, "symbols": 5, "train_examples": 200, "valid_examples": 16})
    results = run_experiment("copy_task", preset)
    _check_outputs(root / "out" / "copy_task", ("table", "runs", "chance"))
    assert 0.0 <= results["table"][0]["copy_accuracy"] <= 1.0
    assert list(pool.glob("copy_data_*/train.bin"))


def test_edge_of_chaos(micro):
    write_preset, _, root = micro
    preset = write_preset("edge_of_chaos", {"variant": "mgt", "depth": 1, "seeds": [1], "sweep": [{"beta_init": 0.3}], "init_grid": {"beta_init": [0.1, 0.5], "alpha_init": [0.0]}})
    results = run_experiment("edge_of_chaos", preset)
    _check_outputs(root / "out" / "edge_of_chaos", ("table", "correlations", "init_grid"))
    assert [r["point"] for r in results["table"]] == ["reference", "beta_init=0.3"]
    assert all(math.isfinite(r["angle_exponent"]) and math.isfinite(r["gradient_exponent"]) for r in results["table"])
    assert len(results["init_grid"]) == 2


def test_shipped_presets_load():
    from pathlib import Path

    from megatron_mgt.experiments.cli import EXPERIMENTS
    from megatron_mgt.experiments.common import load_experiment

    presets = sorted(Path("configs/experiments").glob("*_[cg]pu.yaml"))
    names = [p.name for p in presets if not p.name.startswith("base_")]
    assert {f"{e}_{size}.yaml" for e in EXPERIMENTS for size in ("cpu", "gpu")} <= set(names)
    for path in presets:
        if path.name.startswith("base_"):
            continue
        exp = load_experiment(path.name.rsplit("_", 1)[0], path)
        assert exp.grid and exp.pool and exp.out
