"""The protocol runners (megatron_mgt/experiments) on micro presets: outputs, keys, resume."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from megatron_mgt.experiments.cli import main as experiment_main
from megatron_mgt.experiments.cli import run_experiment
from megatron_mgt.experiments.report import fmt_ci, fmt_estimate, fmt_lr
from megatron_mgt.stats import pearson, spearman

MICRO = {
    "model": {"vocab_size": 256, "d_model": 32, "n_heads": 2, "max_seq_len": 32},
    "data": {"seq_len": 32},
    "train": {"seed": 1, "micro_batch_size": 4, "max_steps": 6, "warmup_steps": 2, "eval_every": 0, "eval_batches": 2, "save_every": 3, "keep_checkpoints": 10, "threads": 1},
    "log": {"every": 1, "wandb": "disabled", "progress": False},
    "eval": {"batches": 2, "geometry_batch": 2},
}


MICRO_DATA: list[str] = []  # (train, valid) prefixes, set by the fixture


@pytest.fixture(scope="module")
def micro(tmp_path_factory, zipf_shards):
    """(write_preset(name, grid) -> path, pool dir, root) sharing one run pool."""
    root = tmp_path_factory.mktemp("experiments")
    MICRO_DATA[:] = zipf_shards
    base = dict(MICRO, data={**MICRO["data"], "train_prefix": zipf_shards[0], "valid_prefix": zipf_shards[1]})
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    pool = root / "pool"

    def write_preset(name: str, grid: dict, overrides: dict | None = None, **extra):
        path = root / f"{name}.yaml"
        spec = {"experiment": name, "base": "base.yaml", "out": str(root / "out" / name), "pool": str(pool), "grid": grid, "overrides": overrides or {}, **extra}
        path.write_text(yaml.safe_dump(spec))
        return path

    return write_preset, pool, root


def _check_outputs(out, keys):
    results = json.loads((out / "results.json").read_text())
    for key in ("experiment", "grid", "base_config", *keys):
        assert key in results, key
    assert (out / "results.md").read_text().startswith("# ")
    assert list(out.glob("*.png")), "no plots"
    return results


def test_correlations():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, 2], [1, 2]))


TUNING = {"center": 3.0e-3, "points": 4, "factor": 2, "max_points": 4}  # four sweep points, no extension


def test_depth_scaling_tuned_arms_paired_stats_and_resume(micro):
    write_preset, pool, root = micro
    grid = {"variants": ["preln", "mgt", "embed_only"], "depths": [1, 2], "seeds": [1, 2], "tuning": TUNING}
    preset = write_preset("depth_scaling", grid, decision={"rule": "ci_excludes_zero", "level": 0.9})
    results = run_experiment("depth_scaling", preset)
    out = root / "out" / "depth_scaling"
    _check_outputs(out, ("table", "runs", "lr_sweeps", "baselines", "decision_rule"))
    assert (out / "diff_vs_depth.png").stat().st_size > 0 and "diff_vs_depth.png" in (out / "results.md").read_text()
    assert sum(r.get("diff_vs_baseline", {}).get("n", 0) >= 2 for r in results["table"]) == 4  # mgt and embed_only at two depths: points on the plot
    assert {(r["arm"], r["depth"]) for r in results["table"]} == {(a, d) for a in ("preln", "mgt", "embed_only") for d in (1, 2)}
    for depth in ("1", "2"):
        for arm, sweep in results["lr_sweeps"][depth].items():
            lrs = [lr for lr, _ in sweep["results"]]
            assert lrs == pytest.approx([7.5e-4, 1.5e-3, 3e-3, 6e-3]) and sweep["lr"] in lrs, arm
            best = min(loss for _, loss in sweep["results"])
            assert dict(map(tuple, sweep["results"]))[sweep["lr"]] == best  # the chosen lr is the sweep's best
    for row in results["table"]:
        assert row["seeds"] == 2 and math.isfinite(row["valid_loss"])
        if row["arm"] != "preln":
            diff = row["diff_vs_baseline"]
            assert diff["n"] == 2 and diff["level"] == 0.9 and row["decision"] in ("win", "loss", "undetermined")
            assert diff["mean"] == pytest.approx(sum(diff["diffs"].values()) / 2)
    runs = {(r["arm"], r["depth"], r["seed"]): r for r in results["runs"]}
    assert runs[("embed_only", 1, 1)]["n_layers"] == 0 and runs[("embed_only", 1, 1)]["run"] == runs[("embed_only", 2, 1)]["run"]  # one run serves every depth
    from megatron_mgt.baselines import ngram_baselines

    train_prefix, valid_prefix = MICRO_DATA
    assert results["baselines"] == pytest.approx(ngram_baselines(train_prefix, valid_prefix, MICRO["model"]["vocab_size"]))
    assert results["decision_rule"]["rule"] == "ci_excludes_zero" and results["decision_rule"]["level"] == 0.9
    md = (out / "results.md").read_text()
    assert "90% CI" in md and "95%" not in md  # every interval at the declared level
    sweep_rows = [line for line in md.splitlines() if line.startswith("| preln | 2 | 0.00075: ")]  # each sweep point, the choice
    assert len(sweep_rows) == 1 and sweep_rows[0].endswith(f"| {fmt_lr(results['lr_sweeps']['2']['preln']['lr'])} | complete |")
    metrics = {p: p.stat().st_mtime_ns for p in pool.glob("*/metrics.jsonl")}
    # Second invocation: every run (sweep points included) is finished, nothing retrains.
    again = run_experiment("depth_scaling", preset)
    assert {p: p.stat().st_mtime_ns for p in pool.glob("*/metrics.jsonl")} == metrics
    assert [r["valid_loss"] for r in again["table"]] == [r["valid_loss"] for r in results["table"]]


def test_archive_lets_a_new_machine_skip_finished_runs(micro, tmp_path):
    """Finished runs copied to the archive count as done when the pool is gone (runs/ does not survive a machine)."""
    write_preset, pool, root = micro
    grid = {"variants": ["preln"], "depths": [1], "seeds": [1], "tuning": TUNING}
    first_pool, second_pool = tmp_path / "pool_a", tmp_path / "pool_b"
    archive = tmp_path / "archive"
    preset = write_preset("depth_scaling", grid, archive=str(archive))
    results = run_experiment("depth_scaling", preset, pool=first_pool)
    assert len(list(archive.glob("*/eval/eval.json"))) == 4 and not list(archive.glob("*/checkpoints"))
    again = run_experiment("depth_scaling", preset, pool=second_pool)
    assert not second_pool.exists() or not list(second_pool.glob("*/metrics.jsonl"))  # nothing trained
    assert again["table"][0]["valid_loss"] == results["table"][0]["valid_loss"]


def test_interrupted_run_resumes(micro, capsys):
    write_preset, pool, root = micro
    preset = write_preset("depth_scaling", {"variants": ["preln"], "depths": [3], "seeds": [1]})
    # An interrupted run: trained to step 3 under the pool's naming; the runner resumes it.
    from megatron_mgt.config import derive
    from megatron_mgt.experiments.common import RunStopped, ensure_run, load_experiment, run_name
    from megatron_mgt.train import train

    exp = load_experiment("depth_scaling", preset)
    cfg = derive(exp.base, {"model.residual": "preln", "model.n_layers": 3, "train.seed": 1})
    run_dir = pool / run_name(cfg)
    train(derive(cfg, {"train.run_dir": str(run_dir), "train.exit_at_step": 3}))
    # a runner's segment that stops early (exit_at_step is volatile: the same run) still records its wall time
    with pytest.raises(RunStopped, match="stopped early"):
        ensure_run(derive(cfg, {"train.exit_at_step": 5}), pool)
    first_segment = json.loads((run_dir / "run_info.json").read_text())["wall_seconds"]
    assert first_segment > 0 and "tokens" not in json.loads((run_dir / "run_info.json").read_text())
    assert experiment_main(["depth_scaling", "--preset", str(preset), "train.exit_at_step=4"]) == 130  # the CLI: a message, no traceback
    assert "mgt-experiment: stopped: " in capsys.readouterr().err
    from megatron_mgt.flops import cpu_model

    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["cpu"] == cpu_model() != ""  # which machine the wall was timed on
    (run_dir / "run_info.json").write_text(json.dumps({**info, "cpu": "Other CPU"}))  # as if that segment ran on another machine
    run_experiment("depth_scaling", preset)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "resumed" for e in events) == 2
    assert (run_dir / "eval" / "eval.json").is_file()
    assert json.loads((run_dir / "run_info.json").read_text())["wall_seconds"] > first_segment
    assert json.loads((run_dir / "run_info.json").read_text())["cpu"] == "mixed"  # timed on two machines: no one CPU's wall


def test_ablation_interaction(micro):
    write_preset, _, root = micro
    preset = write_preset("ablation", {"variants": ["preln", "mhc", "ddl", "mgt"], "depth": 1, "seeds": [1, 2], "tuning": TUNING})
    results = run_experiment("ablation", preset)
    _check_outputs(root / "out" / "ablation", ("table", "interaction", "runs", "lr_sweeps"))
    loss = {r["arm"]: r["per_seed"] for r in results["table"]}
    inter = results["interaction"]
    for seed in (1, 2):
        by_hand = loss["mgt"][seed] - loss["mhc"][seed] - loss["ddl"][seed] + loss["preln"][seed]
        assert inter["terms"][seed] == pytest.approx(by_hand)
    assert inter["n"] == 2 and inter["decision"] in ("win", "loss", "undetermined")


def test_rank_evolution_and_beta(micro, tmp_path):
    """rank_evolution at each arm's tuned lr: the rank profile at init and every checkpoint, the
    final loss equal to the twin run's (checkpoints change nothing), archived with the run."""
    import shutil

    write_preset, pool, root = micro
    archive = tmp_path / "archive"
    grid = {"variants": ["preln", "mgt"], "depths": [2], "seeds": [1], "tuning": TUNING, "checkpoint_every": 2}
    preset = write_preset("rank_evolution", grid, {"eval.rank_windows": 4}, archive=str(archive))
    results = run_experiment("rank_evolution", preset)
    _check_outputs(root / "out" / "rank_evolution", ("table", "runs", "centered", "lr_sweeps", "checkpoint_every"))
    assert {r["arm"] for r in results["runs"]} == {"preln", "mgt"}
    for r in results["runs"]:
        assert r["lr"] == results["lr_sweeps"]["2"][r["arm"]]["lr"]  # the tuned lr
        assert [p["step"] for p in r["evolution"]] == [0, 2, 4, 6]
        assert all(len(p["erank_tol"]) == len(p["ln_erank_tol"]) == len(p["collapsed"]) == 3 for p in r["evolution"])
        assert all(0.0 < v <= 1.0 for p in r["evolution"] for v in p["erank_tol"])
        assert r["valid_loss"] == r["twin_valid_loss"]  # the twin is the sweep's own run at that lr, trained without the extra checkpoints
    row = next(r for r in results["table"] if r["arm"] == "mgt")
    assert row["erank_tol_last_final"]["mean"] == results["runs"][[r["arm"] for r in results["runs"]].index("mgt")]["evolution"][-1]["erank_tol"][-1]
    assert (root / "out" / "rank_evolution" / "heatmap_mgt_L2.png").is_file()
    # A new machine: the evolution runs' records (evolution.json included) come from the archive, nothing retrains.
    for r in results["runs"]:
        assert (archive / r["run"] / "eval" / "evolution.json").is_file()
        shutil.rmtree(pool / r["run"])
    again = run_experiment("rank_evolution", preset)
    assert not any((pool / r["run"]).exists() for r in results["runs"]) and json.dumps(again["table"]) == json.dumps(results["table"])
    # beta_distribution reuses the mgt run and its evolution, through the CLI.
    # beta_distribution on the tuned runs (the sweep's), through the CLI, with the evolution of the first seed.
    preset = write_preset("beta_distribution", {"variants": ["mgt"], "depths": [2], "seeds": [1, 2], "tuning": TUNING, "evolution": True})
    assert experiment_main(["beta_distribution", "--preset", str(preset)]) == 0
    beta = _check_outputs(root / "out" / "beta_distribution", ("table", "runs", "evolution", "lr_sweeps"))
    row = beta["table"][0]
    assert {"frac_negative_deep_third", "spearman_negfrac_depth", "spearman_negfrac_erank_out"} <= set(row)
    assert row["seeds"] == 2 and row["lr"] == beta["lr_sweeps"]["2"]["mgt"]["lr"]
    by_seed = [r["final"]["deep_minus_shallow"] for r in beta["runs"]]
    assert row["deep_minus_shallow"]["mean"] == pytest.approx(sum(by_seed) / 2)
    assert row["decision_deeper"] in ("deeper", "shallower", "undetermined")
    (steps,) = beta["evolution"].values()
    assert [p["step"] for p in steps] == [0, 3, 6]


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

    from megatron_mgt.experiments.cli import EXPERIMENTS, campaign_steps
    from megatron_mgt.experiments.common import load_experiment

    presets = sorted(Path("configs/experiments").glob("*_[cg]pu.yaml"))
    presets = [p for p in presets if not p.name.startswith("campaign_")]  # campaigns: test_campaign_runs_its_steps_in_order
    names = [p.name for p in presets if not p.name.startswith("base_")]
    assert {f"{e}_{size}.yaml" for e in EXPERIMENTS for size in ("cpu", "gpu")} <= set(names)
    for path in presets:
        if path.name.startswith("base_"):
            continue
        name = yaml.safe_load(path.read_text()).get("experiment", path.name.rsplit("_", 1)[0])  # e.g. depth_scaling_L96_sweep_cpu.yaml
        assert name in EXPERIMENTS, f"{path}: experiment {name!r}"
        exp = load_experiment(name, path)
        assert exp.grid and exp.pool and exp.out
    merged = load_experiment("depth_scaling", "configs/experiments/depth_scaling_cpu.yaml", ["grid.tuning.points=6"]).grid["tuning"]
    assert merged["points"] == 6 and merged["bands"] == {96: 48} and merged["center"] == 3.0e-3  # a nested override keeps the rest
    for path in Path("configs/experiments").glob("campaign_*.yaml"):  # every step of a shipped campaign loads
        for step in campaign_steps(str(path)):
            assert load_experiment(step["experiment"], step["preset"], step["overrides"]).grid


def test_decision_block_checked_at_load(tmp_path):
    """A bad decision block is a ConfigError naming the preset and the key, before anything
    trains; a good one gives the rule and level every runner reports with."""
    from megatron_mgt.config import ConfigError
    from megatron_mgt.experiments.common import load_experiment
    from megatron_mgt.experiments.report import ci_label

    base = Path("configs/experiments/depth_scaling_cpu.yaml").resolve()
    spec = yaml.safe_load(base.read_text())
    spec["base"] = str(base.parent / spec["base"])
    preset = tmp_path / "p.yaml"
    for decision, message in (({"level": 95}, r"decision.level=95 must be a number in \(0, 1\)"), ({"level": "high"}, "decision.level='high'"),
                              ({"rule": "p_below_0.05"}, "decision.rule='p_below_0.05' is not a known rule"), ({"alpha": 0.05}, r"unknown decision keys \['alpha'\]"),
                              ("ci_excludes_zero", "decision must be a mapping")):
        preset.write_text(yaml.safe_dump({**spec, "decision": decision}))
        with pytest.raises(ConfigError, match=message) as err:
            load_experiment("depth_scaling", preset)
        assert str(preset) in str(err.value)
    preset.write_text(yaml.safe_dump({**spec, "decision": {"level": 0.9}}))
    exp = load_experiment("depth_scaling", preset)
    assert (exp.rule, exp.level, ci_label(exp.level)) == ("ci_excludes_zero", 0.9, "90% CI")


def test_lr_sweep_panels_follow_the_bands():
    """One lr-sweep panel per sweep depth: a banded depth (96 uses 48's sweep) is named on its
    donor's panel, and a report of only banded depths still shows the sweep it used."""
    from megatron_mgt.experiments.depth_scaling import lr_sweep_panels

    def record(sweep_depth, lr):
        return {"sweep_depth": sweep_depth, "lr": lr, "results": [[lr / 2, 3.2], [lr, 3.0], [lr * 2, 3.1]]}

    sweeps = {12: {"preln": record(12, 3e-3), "mgt": record(12, 6e-3)}, 48: {"preln": record(48, 1.5e-3), "mgt": record(48, 3e-3)}}
    sweeps[96] = sweeps[48]
    panels, chosen = lr_sweep_panels(sweeps, ["preln", "mgt"], [12, 48, 96])
    assert list(panels) == ["12 layers", "48 layers (lrs used at 48, 96)"] and chosen["48 layers (lrs used at 48, 96)"] == {"preln": 1.5e-3, "mgt": 3e-3}
    panels, chosen = lr_sweep_panels({96: sweeps[48]}, ["preln", "mgt"], [96])
    assert list(panels) == ["48 layers (lrs used at 96)"] and panels["48 layers (lrs used at 96)"]["mgt"] == {1.5e-3: 3.2, 3e-3: 3.0, 6e-3: 3.1}


def test_campaign_runs_its_steps_in_order(micro, capsys):
    from megatron_mgt.config import ConfigError
    from megatron_mgt.experiments.cli import run_campaign

    write_preset, _, root = micro
    write_preset("depth_scaling", {"variants": ["preln"], "depths": [1], "seeds": [1], "tuning": TUNING})
    write_preset("ablation", {"variants": ["preln", "mhc", "ddl", "mgt"], "depth": 1, "seeds": [1], "tuning": TUNING})
    campaign = root / "campaign.yaml"
    steps = [{"experiment": "depth_scaling", "preset": "depth_scaling.yaml"}, {"experiment": "ablation", "preset": "ablation.yaml", "overrides": ["grid.seeds=[1]"]}]
    campaign.write_text(yaml.safe_dump({"campaign": steps}))
    results = run_campaign(str(campaign))
    assert "lr_sweeps" in results[0] and "interaction" in results[1]
    printed = capsys.readouterr().out
    assert printed.index("step 1/2: depth_scaling") < printed.index("step 2/2: ablation")
    campaign.write_text(yaml.safe_dump({"campaign": [{"experiment": "ablation"}]}))
    with pytest.raises(ConfigError, match="campaign step 0"):
        run_campaign(str(campaign))
    # a bad later step is refused before the first step trains anything
    bad = [steps[0], {"experiment": "ablation", "preset": "missing.yaml"}]
    campaign.write_text(yaml.safe_dump({"campaign": bad}))
    capsys.readouterr()
    with pytest.raises(ConfigError, match="campaign step 1: experiment preset not found"):
        run_campaign(str(campaign))
    assert "step 1/2" not in capsys.readouterr().out
    for bad_override, message in (("grid.variants=[preln, mtg]", "'mtg' is not a residual rule"), ("grid.tuning.points=2", "points >= 4")):
        campaign.write_text(yaml.safe_dump({"campaign": [steps[0], {**steps[1], "overrides": [bad_override]}]}))
        with pytest.raises(ConfigError, match=f"campaign step 1: .*{message}"):
            run_campaign(str(campaign))


def test_report_only_chooses_no_lr_from_an_unfinished_sweep(micro, tmp_path):
    from megatron_mgt.experiments import common

    write_preset, _, root = micro
    preset = write_preset("depth_scaling", {"variants": ["preln", "mgt"], "depths": [1], "seeds": [1, 2], "tuning": TUNING})
    common.REPORT_ONLY = True
    try:
        results = run_experiment("depth_scaling", preset, pool=tmp_path / "empty_pool", out=tmp_path / "out")
    finally:
        common.REPORT_ONLY = False
    assert not list((tmp_path / "empty_pool").glob("*/metrics.jsonl"))  # nothing trained
    for sweep in results["lr_sweeps"]["1"].values():
        assert sweep["complete"] is False and sweep["lr"] is None and sweep["results"] == []
    assert all(row["label"] == "no finished run" and row["seeds"] == 0 for row in results["table"])


def test_report_formats_lr_and_undefined_intervals():
    """A 1.5e-3 lr must not print as a rounded 0.002; a one-seed interval is named, not 'nan'."""
    assert fmt_lr(0.0015) == "0.0015" and fmt_lr(7.5e-4) == "0.00075" and fmt_lr(1.875e-4) == "0.0001875" and fmt_lr(None) == "-"
    assert fmt_ci([-0.25, 0.125]) == "[-0.250, +0.125]" and fmt_ci([3.1, 3.3], signed=False) == "[3.100, 3.300]"
    assert fmt_ci([math.nan, math.nan]) == "n/a (<2 seeds)" and fmt_ci(None) == "-"
    assert fmt_estimate({"mean": -0.444, "ci": [math.nan, math.nan]}) == "-0.444 n/a (<2 seeds)"
    assert fmt_estimate({"mean": math.nan, "ci": [math.nan, math.nan]}) == "-" and fmt_ci([math.nan, math.nan], n=0) == "-"  # no run at all


def test_matched_d_ff_is_the_smallest_width_reaching_mgts_count():
    """The affine solve gives the linear search's answer (the run names of preln_matched depend on it)."""
    from megatron_mgt.config import derive, load_config
    from megatron_mgt.experiments.arms import matched_d_ff, param_count

    for layers, d in ((2, 32), (5, 48)):
        base = derive(load_config(None), {"model.n_layers": layers, "model.d_model": d, "model.n_heads": 2, "model.vocab_size": 97})
        goal = param_count(derive(base, {"model.residual": "mgt"}))
        d_ff = matched_d_ff(base)
        assert param_count(derive(base, {"model.residual": "preln", "model.d_ff": d_ff})) >= goal
        assert param_count(derive(base, {"model.residual": "preln", "model.d_ff": d_ff - 1})) < goal
        assert d_ff > derive(base, {"model.residual": "preln"}).model.ffn_dim


def test_initial_sweep_grid_does_not_wait_for_a_held_point(micro, tmp_path, monkeypatch):
    """run_grid(wait_for_held=False), as tuned_sweeps runs the initial grid: a point another
    runner holds is passed over and not waited for (the runner goes on to edge extensions)."""
    import fcntl

    from megatron_mgt.config import derive
    from megatron_mgt.experiments import common
    from megatron_mgt.experiments.common import load_experiment, run_grid, run_name

    monkeypatch.setattr(common, "ARCHIVE", None)
    monkeypatch.setattr(common, "REPORT_ONLY", False)
    write_preset, _, _ = micro
    exp = load_experiment("depth_scaling", write_preset("depth_scaling", {"variants": ["preln"], "depths": [1], "seeds": [1], "tuning": TUNING}))
    pool = tmp_path / "pool"
    pool.mkdir()
    specs = [(derive(exp.base, {"model.n_layers": 1, "train.lr": lr}), "") for lr in (1e-3, 2e-3)]
    held = run_name(specs[0][0])
    with open(pool / f".{held}.lock", "w") as other_runner:
        fcntl.flock(other_runner, fcntl.LOCK_EX)
        kept = run_grid(specs, pool, "grid", wait_for_held=False)  # would block forever with wait_for_held=True
    assert [o.name for o in kept] == [run_name(specs[1][0])] and not (pool / held / "metrics.jsonl").exists()


def test_a_runner_skips_a_sweep_point_another_holds_and_waits_only_at_the_end(micro, tmp_path, monkeypatch):
    """Edge extensions are sequential within an arm: while another runner trains preln's point,
    this runner finishes mgt's sweep instead of waiting, then waits (blocking, not spinning)."""
    import fcntl
    import threading
    import time

    from megatron_mgt.config import derive
    from megatron_mgt.experiments import arms, common, lr_sweep
    from megatron_mgt.experiments.common import load_experiment, run_name

    monkeypatch.setattr(common, "ARCHIVE", None)  # earlier tests' archive holds these very runs
    monkeypatch.setattr(common, "REPORT_ONLY", False)
    calls: list[tuple[str, bool]] = []
    real_ensure_run = arms.ensure_run

    def recording_ensure_run(cfg, pool, tag="", **kw):
        calls.append((run_name(cfg, tag), kw.get("wait", True)))
        return real_ensure_run(cfg, pool, tag, **kw)

    monkeypatch.setattr(arms, "ensure_run", recording_ensure_run)
    write_preset, _, _ = micro
    exp = load_experiment("depth_scaling", write_preset("depth_scaling", {"variants": ["preln", "mgt"], "depths": [1], "seeds": [1], "tuning": TUNING}))
    pool = tmp_path / "pool"
    pool.mkdir()
    first = derive(exp.base, {"model.n_layers": 1, "train.seed": 1})
    grid = lr_sweep.initial_grid(TUNING["center"], TUNING["points"], TUNING["factor"])
    held = run_name(arms.arm_config(derive(first, {"train.lr": grid[0]}), "preln"))
    mgt_runs = [run_name(arms.arm_config(derive(first, {"train.lr": lr}), "mgt")) for lr in grid]
    locked, stop, seen = threading.Event(), threading.Event(), {}

    def other_runner():  # holds preln's point until mgt's sweep is done (training needs the main thread)
        with open(pool / f".{held}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            locked.set()
            deadline = time.monotonic() + 120
            while not stop.is_set() and not all((pool / n / "eval" / "eval.json").is_file() for n in mgt_runs) and time.monotonic() < deadline:
                time.sleep(0.2)
            seen["mgt_done"] = all((pool / n / "eval" / "eval.json").is_file() for n in mgt_runs)
            seen["held_untouched"] = not (pool / held / "metrics.jsonl").exists()
            stop.wait(3)  # hold a little longer: the runner's next round finds it held again and must block

    thread = threading.Thread(target=other_runner, daemon=True)
    thread.start()
    assert locked.wait(10)
    try:
        result = arms._extend_sweeps(first, ["preln", "mgt"], 1, pool, arms.tuning_settings(exp.grid))
    finally:
        stop.set()  # on the success path the other runner has already let go
        thread.join(10)
    assert seen == {"mgt_done": True, "held_untouched": True}  # it moved on to mgt instead of waiting
    tries = [wait for name, wait in calls if name == held]
    assert tries == [False, False, True], tries  # skipped, tried again after mgt, then blocked once (no spinning)
    assert list(result) == ["preln", "mgt"] and all(result[a]["complete"] and result[a]["lr"] in grid for a in result)
    assert (pool / held / "eval" / "eval.json").is_file()  # trained by this runner once released


def test_status_lists_what_a_rerun_would_train(micro, tmp_path, monkeypatch, capsys):
    """--status walks the grid in report-only mode: an open sweep before any run, nothing
    after the experiment ran, and a run whose lock another runner holds as running."""
    import fcntl

    from megatron_mgt.experiments import common
    from megatron_mgt.experiments.cli import grid_status

    monkeypatch.setattr(common, "ARCHIVE", None)
    monkeypatch.setattr(common, "REPORT_ONLY", False)
    write_preset, _, _ = micro
    preset = write_preset("depth_scaling", {"variants": ["preln"], "depths": [1], "seeds": [1, 2], "tuning": TUNING})
    steps = [{"experiment": "depth_scaling", "preset": str(preset), "overrides": []}]
    pool = tmp_path / "pool"
    capsys.readouterr()
    before = grid_status(steps, pool=pool)
    walked = capsys.readouterr()
    assert "run/s" not in walked.err and "not finished" not in walked.err + walked.out and common.QUIET is False  # the summary alone
    assert "4 runs to train (0 running); sweeps still open: preln@1" in before and "no estimate" in before  # the initial grid's 4 points; seed 2 waits on the sweep
    assert "at least" in before and not list(pool.glob("*/metrics.jsonl")) and common.REPORT_ONLY is False  # nothing trained
    run_experiment("depth_scaling", preset, pool=pool, out=tmp_path / "out")
    assert "total: 0 runs to train;" in grid_status(steps, pool=pool)
    seed2 = next(p for p in pool.iterdir() if p.name.startswith("preln_L1_s2_"))
    (seed2 / "eval" / "eval.json").unlink()
    with open(pool / f".{seed2.name}.lock", "w") as other_runner:
        fcntl.flock(other_runner, fcntl.LOCK_EX)
        held = grid_status(steps, pool=pool, workers=2)
    assert f"{seed2.name}: running, step 6, ~0 min" in held and "total: 1 runs to train;" in held and "with 2 worker(s)" in held
    assert f"{seed2.name}: to resume from step 6, ~0 min" in grid_status(steps, pool=pool)  # trained, its evaluation owed


def test_deadline_gate_starts_only_runs_that_end_in_time(micro, tmp_path, monkeypatch, capsys):
    """--deadline: the estimate (median wall of the arm, scaled by depth, x EVAL_MARGIN) scaled
    by the steps left decides; past the deadline a runner trains nothing and still reports."""
    import datetime as dt

    from megatron_mgt.config import Config, ConfigError, derive, load_config
    from megatron_mgt.experiments import common, status
    from megatron_mgt.train import train

    archive, pool = tmp_path / "archive", tmp_path / "pool"
    for name, wall in (("preln_L4_s1_aaaaaa", 500.0), ("preln_L4_s2_bbbbbb", 700.0)):  # median 600 s at 4 layers
        (archive / name / "eval").mkdir(parents=True)
        (archive / name / "eval" / "eval.json").write_text("{}")
        (archive / name / "run_info.json").write_text(json.dumps({"wall_seconds": wall}))
    monkeypatch.setattr(common, "ARCHIVE", archive)
    cfg = derive(Config(), {"train.max_steps": 10})
    need = 1200.0 * status.EVAL_MARGIN  # 8 layers: 600 s x 8 / 4
    fresh = pool / "preln_L8_s1_cccccc"
    assert status.deadline_gate(1000 + need, clock=lambda: 1000.0)("preln_L8_s1_cccccc", cfg, fresh)
    assert not status.deadline_gate(1000 + need - 1, clock=lambda: 1000.0)("preln_L8_s1_cccccc", cfg, fresh)
    write_preset, _, root = micro
    half = pool / "preln_L8_s2_dddddd"  # a real run stopped with 3 of its 6 steps checkpointed needs half
    micro_cfg = load_config(root / "base.yaml", ["train.save_every=3", "train.exit_at_step=3", f"train.run_dir={half}"])
    assert train(micro_cfg).status.startswith("exited")
    half_need = 1200.0 * (0.5 + status.EVAL_MARGIN - 1)  # half the training left, and all of the evaluation
    assert status.deadline_gate(1000 + half_need, clock=lambda: 1000.0)("preln_L8_s2_dddddd", micro_cfg, half)
    assert not status.deadline_gate(1000 + half_need - 1, clock=lambda: 1000.0)("preln_L8_s2_dddddd", micro_cfg, half)
    unknown = status.deadline_gate(1000.0, clock=lambda: 999.0)  # no estimate for mgt: starts only before the deadline
    assert unknown("mgt_L8_s1_eeeeee", cfg, fresh) and not status.deadline_gate(1000.0, clock=lambda: 1000.0)("mgt_L8_s1_eeeeee", cfg, fresh)

    # walls timed on this CPU model win over other machines' where there are any; runs without a cpu are another machine's
    (archive / "preln_L4_s3_eeeeee" / "eval").mkdir(parents=True)
    (archive / "preln_L4_s3_eeeeee" / "eval" / "eval.json").write_text("{}")
    (archive / "preln_L4_s3_eeeeee" / "run_info.json").write_text(json.dumps({"wall_seconds": 300.0, "cpu": "Test CPU"}))
    assert sorted(status.finished_walls([archive])[("preln", 4)]) == [300.0, 500.0, 700.0]
    assert status.finished_walls([archive], "Test CPU")[("preln", 4)] == [300.0]
    assert sorted(status.finished_walls([archive], "Other CPU")[("preln", 4)]) == [300.0, 500.0, 700.0]  # none timed here: all of them
    monkeypatch.setattr(status, "cpu_model", lambda: "Test CPU")
    assert status.deadline_gate(1000 + 600.0 * status.EVAL_MARGIN, clock=lambda: 1000.0)("preln_L8_s1_cccccc", cfg, fresh)  # 300 s x 8 / 4
    monkeypatch.undo()
    monkeypatch.setattr(common, "ARCHIVE", archive)
    (archive / "preln_L4_s3_eeeeee" / "eval" / "eval.json").unlink()  # the rest of the test: the two walls above

    now = dt.datetime(2026, 12, 7, 12, 0)
    assert status.parse_deadline("+90", now) == now.timestamp() + 5400 == status.parse_deadline("+1.5h", now)
    assert status.parse_deadline("15:05", now) == dt.datetime(2026, 12, 7, 15, 5).timestamp()
    assert status.parse_deadline("2026-12-08T01:00", now) == dt.datetime(2026, 12, 8, 1, 0).timestamp()
    utc = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)  # a zoned deadline is compared in its zone, not a bare traceback
    assert status.parse_deadline("2026-12-07T13:00+00:00", utc) == utc.timestamp() + 3600
    with pytest.raises(ConfigError, match="has passed"):
        status.parse_deadline("2026-12-07T11:00Z", utc)
    assert status.parse_deadline("11:00", now) == dt.datetime(2026, 12, 8, 11, 0).timestamp()  # a clock time past today: tomorrow's
    with pytest.raises(ConfigError, match="passed 10 min ago; for tomorrow's give 2026-12-08T11:50"):
        status.parse_deadline("11:50", now)  # just past: a slip, not a deadline 24 h away
    with pytest.raises(ConfigError, match="has passed"):
        status.parse_deadline("2026-12-07T11:59", now)
    for bad in ("soon", "+x", "25:00"):
        with pytest.raises(ConfigError, match="expected"):
            status.parse_deadline(bad, now)
    # evolution adds one EVOLUTION_POINT_MARGIN of the estimate per kept checkpoint and init (10 steps, save_every 5: 3 points)
    evo_cfg = derive(cfg, {"train.save_every": 5})
    evo_need = need + 1200.0 * 3 * status.EVOLUTION_POINT_MARGIN
    assert status.deadline_gate(1000 + evo_need, clock=lambda: 1000.0)("preln_L8_s1_cccccc", evo_cfg, fresh, True)
    assert not status.deadline_gate(1000 + evo_need - 1, clock=lambda: 1000.0)("preln_L8_s1_cccccc", evo_cfg, fresh, True)

    monkeypatch.setattr(common, "ARCHIVE", None)
    monkeypatch.setattr(common, "REPORT_ONLY", False)
    preset = write_preset("depth_scaling", {"variants": ["preln"], "depths": [1], "seeds": [1], "tuning": TUNING})
    out = tmp_path / "out"
    assert experiment_main(["depth_scaling", "--preset", str(preset), "--pool", str(pool), "--out", str(out), "--deadline", "+0"]) == 0
    assert not list(pool.glob("*_L1_*/metrics.jsonl")) and common.START_GATE is None  # no estimate and no time left: nothing starts
    assert re.search(r"deadline \d{4}-\d\d-\d\d \d\d:\d\d \(local\)", capsys.readouterr().err)  # the resolved date-time is said
    refused = json.loads((out / "results.json").read_text())
    assert refused["lr_sweeps"]["1"]["preln"]["complete"] is False and refused["lr_sweeps"]["1"]["preln"]["lr"] is None  # the sweep stays open
    assert experiment_main(["depth_scaling", "--preset", str(preset), "--pool", str(pool), "--out", str(out), "--deadline", "+600"]) == 0
    trained = json.loads((out / "results.json").read_text())  # time left: the sweep and the seed train (no estimate: start while before)
    assert trained["lr_sweeps"]["1"]["preln"]["complete"] is True and math.isfinite(trained["table"][0]["valid_loss"])
    assert experiment_main(["depth_scaling", "--preset", str(preset), "--deadline", "soon"]) == 2


def test_finished_run_is_archived_late_and_report_only_writes_nothing(micro, tmp_path, monkeypatch):
    """A run that finished before `archive:` was set (or before a crash) is archived the next
    time a runner meets it; report-only computes nothing (not even a missing evolution) and
    writes nothing."""
    from megatron_mgt.config import derive
    from megatron_mgt.experiments import common
    from megatron_mgt.experiments.common import ensure_run, load_experiment

    write_preset, _, _ = micro
    exp = load_experiment("depth_scaling", write_preset("depth_scaling", {"variants": ["preln"], "depths": [1], "seeds": [1]}))
    cfg = derive(exp.base, {"model.residual": "preln", "model.n_layers": 1, "train.seed": 7})
    pool, archive = tmp_path / "pool", tmp_path / "archive"
    monkeypatch.setattr(common, "ARCHIVE", None)
    done = ensure_run(cfg, pool)
    assert done.status == "finished" and not archive.exists()
    monkeypatch.setattr(common, "ARCHIVE", archive)
    evolution = done.run_dir / "eval" / "evolution.json"
    assert ensure_run(cfg, pool, evolution=True, report_only=True).status == "missing"  # its evolution is work left
    assert not evolution.exists() and not archive.exists()
    assert ensure_run(cfg, pool, report_only=True).status == "finished" and not archive.exists()
    again = ensure_run(cfg, pool)
    assert not again.trained_now and (archive / done.name / "eval" / "eval.json").is_file()
    assert (archive / done.name / "run_info.json").read_text() == (done.run_dir / "run_info.json").read_text()
