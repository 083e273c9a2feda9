"""Learning-rate sweep logic (megatron_mgt.experiments.lr_sweep) on synthetic loss curves, and its plot."""

from __future__ import annotations

import math

import pytest

from megatron_mgt import plots
from megatron_mgt.experiments import lr_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CENTER = 1e-3  # initial grid: 2.5e-4, 5e-4, 1e-3, 2e-3


def parabola(best_lr: float, diverge_above: float = math.inf, calls: list | None = None):
    """loss(lr) = 1 + (log2 lr - log2 best_lr)^2, inf above diverge_above; records every call in `calls`."""

    def loss_at(lr: float) -> float:
        if calls is not None:
            calls.append(lr)
        return math.inf if lr > diverge_above else 1.0 + (math.log2(lr) - math.log2(best_lr)) ** 2

    return loss_at


def _lrs(out: dict) -> list[float]:
    return [lr for lr, _ in out["results"]]


def test_initial_grid_contains_center() -> None:
    assert lr_sweep.initial_grid(CENTER) == pytest.approx([2.5e-4, 5e-4, 1e-3, 2e-3])
    assert lr_sweep.initial_grid(1.0, points=5, factor=3.0) == pytest.approx([1 / 9, 1 / 3, 1.0, 3.0, 9.0])


@pytest.mark.parametrize(
    "kwargs,match",
    [({"points": 3}, "points >= 4"), ({"factor": 1.0}, "factor"), ({"factor": math.inf}, "factor"), ({"center": 0.0}, "center")],
)
def test_initial_grid_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lr_sweep.initial_grid(**{"center": CENTER, **kwargs})


def test_minimum_inside_initial_grid_needs_no_extension() -> None:
    calls: list[float] = []
    out = lr_sweep.sweep(parabola(5e-4, calls=calls), CENTER)
    assert _lrs(out) == pytest.approx([2.5e-4, 5e-4, 1e-3, 2e-3])
    assert sorted(calls) == _lrs(out)  # every point run exactly once
    assert out["lr"] == pytest.approx(5e-4) and out["loss"] == pytest.approx(1.0)
    assert out["converged"] and out["interior"]
    assert out["rule"] == lr_sweep.SELECTION_RULE


def test_minimum_three_factors_above_extends_upward_until_interior() -> None:
    calls: list[float] = []
    out = lr_sweep.sweep(parabola(1.6e-2, calls=calls), CENTER)  # 2e-3 * 2^3
    # 4e-3, 8e-3, 1.6e-2 (still the edge), then 3.2e-2 makes 1.6e-2 interior
    assert calls[4:] == pytest.approx([4e-3, 8e-3, 1.6e-2, 3.2e-2])
    assert out["lr"] == pytest.approx(1.6e-2) and out["converged"]
    assert len(out["results"]) == 8


def test_minimum_below_extends_downward() -> None:
    out = lr_sweep.sweep(parabola(6.25e-5), CENTER)  # 2.5e-4 / 2^2
    assert _lrs(out)[:3] == pytest.approx([3.125e-5, 6.25e-5, 1.25e-4])
    assert out["lr"] == pytest.approx(6.25e-5) and out["converged"]
    assert len(out["results"]) == 7


def test_divergence_at_high_lr_counts_as_worst() -> None:
    out = lr_sweep.sweep(parabola(8e-3, diverge_above=3e-3), CENTER)
    # 2e-3 is the best finite point at the top edge; 4e-3 diverges, which makes 2e-3 interior
    assert _lrs(out) == pytest.approx([2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3])
    assert math.isinf(out["results"][-1][1])
    assert out["lr"] == pytest.approx(2e-3) and out["converged"]
    nan_results = {1e-3: 2.0, 2e-3: 1.5, 4e-3: 1.2, 8e-3: float("nan")}
    assert lr_sweep.extend(nan_results) == [] and lr_sweep.select(nan_results)["lr"] == 4e-3


def test_max_points_reached_reports_unresolved_edge() -> None:
    out = lr_sweep.sweep(parabola(1.0), CENTER, max_points=6)
    assert _lrs(out) == pytest.approx([2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3])
    assert out["lr"] == pytest.approx(8e-3)
    assert not out["converged"] and not out["interior"]
    assert out["max_points"] == 6
    with pytest.raises(ValueError, match="max_points"):
        lr_sweep.sweep(parabola(1.0), CENTER, points=5, max_points=4)


def test_select_ties_and_all_diverged() -> None:
    tied = {1.0: 1.0, 2.0: 0.5, 4.0: 0.5, 8.0: 2.0}
    assert lr_sweep.select(tied) == {"lr": 2.0, "loss": 0.5, "interior": True, "points": 4, "rule": lr_sweep.SELECTION_RULE}
    assert lr_sweep.extend(tied) == []
    diverged = {1.0: math.inf, 2.0: math.nan, 4.0: math.inf, 8.0: math.inf}
    chosen = lr_sweep.select(diverged)
    assert chosen["lr"] is None and chosen["loss"] is None and not chosen["interior"]
    assert lr_sweep.extend(diverged) == [0.5]  # all tie as worst: the smaller lr, an edge, goes down
    with pytest.raises(ValueError, match="at least 2"):
        lr_sweep.extend({1.0: 1.0})
    with pytest.raises(ValueError, match="no sweep results"):
        lr_sweep.select({})


def test_plot_lr_sweep_writes_png(tmp_path) -> None:
    curves = {
        "mgt": {2.5e-4: 3.1, 5e-4: 2.9, 1e-3: 3.0, 2e-3: math.inf},
        "preln": {2.5e-4: 3.3, 5e-4: 3.2, 1e-3: 3.25, 2e-3: float("nan")},
        "broken": {1e-3: math.inf},
    }
    path = tmp_path / "sub" / "lr_sweep.png"
    panels = {"12 layers": curves, "48 layers": {"mgt": {1e-3: 2.8, 2e-3: 2.7}, "postln": {1e-3: math.nan}}}
    plots.plot_lr_sweep(panels, {"12 layers": {"mgt": 5e-4, "preln": 5e-4}, "48 layers": {"mgt": 2e-3}}, path, "lr sweep")
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC)


def test_plot_lr_sweep_legend_and_titles(tmp_path, monkeypatch) -> None:
    """The legend shows an arm's line wherever it has one (not the x of a panel where it
    diverged), names an arm that diverged everywhere, and the title sits above the panels."""
    drawn = []
    monkeypatch.setattr(plots, "_save_atomic", lambda fig, path: drawn.append(fig))
    panels = {"12 layers": {"mgt": {1e-3: math.inf}, "postln": {1e-3: math.nan}}, "48 layers": {"mgt": {1e-3: 2.8, 2e-3: 2.7}, "postln": {1e-3: math.inf}}}
    plots.plot_lr_sweep(panels, {"48 layers": {"mgt": 2e-3}}, tmp_path / "x.png", "lr sweeps")
    (fig,) = drawn
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["mgt", "postln (all diverged)"]
    assert type(legend.legend_handles[0]).__name__ == "Line2D"
    assert [ax.get_title() for ax in fig.axes] == ["12 layers", "48 layers"] and fig.get_suptitle().startswith("lr sweeps")
    drawn.clear()
    plots.plot_series_panels({"96 layers": {"mgt": [(1.0, 3.0, 0.0), (2.0, 2.9, 0.0)]}}, tmp_path / "y.png", "valid loss vs tokens", "tokens", "loss")
    plots.plot_series_vs_x({"mgt": [(1.0, 3.0, 0.0)]}, tmp_path / "z.png", "one series", "x", "y")
    named, single = drawn
    assert named.get_suptitle() == "valid loss vs tokens" and named.axes[0].get_title() == "96 layers"  # a named panel keeps the plot's title
    assert single.axes[0].get_title() == "one series" and single.axes[0].get_legend() is not None
