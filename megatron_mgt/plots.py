"""PNG writers for training and geometry telemetry.

Uses matplotlib's object API on the Agg canvas (no pyplot, no global backend state).
Every writer takes plain Python/NumPy data and writes its PNG atomically: a temp file in
the target directory, then os.replace.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_MARKER_MAX_POINTS = 50  # sparse series (e.g. validation) are also drawn with markers
_MAX_XTICKS = 10


def _new_figure(figsize: tuple[float, float] = (7.0, 4.5)) -> Figure:
    """A Figure attached to an Agg canvas."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# 20 distinct line styles: the 10 tab10 colours solid, then dashed (a protocol table has 12 arms)
_CYCLE = cycler(linestyle=["-", "--"]) * cycler(color=[f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")])


def _axes(fig: Figure) -> Axes:
    ax = fig.add_subplot()
    ax.set_prop_cycle(_CYCLE)
    return ax


_LEGEND_INSIDE_MAX = 8  # more series than this: one legend beside the panels, not over the data


def _panel_figure(n_panels: int, names: Sequence[str]) -> tuple[Figure, Sequence[Axes], dict[str, dict], bool]:
    """A figure of n_panels axes side by side on a shared y axis, a style (colour, line style) per
    series name shared by every panel, and whether the legend goes beside the panels."""
    n_panels = max(1, n_panels)
    outside = len(names) > _LEGEND_INSIDE_MAX or n_panels > 1
    fig = _new_figure((0.6 + 3.6 * n_panels + 2.0, 4.5) if outside else (7.0, 4.5))
    axes = fig.subplots(1, n_panels, sharey=True, squeeze=False)[0]
    return fig, axes, dict(zip(names, _CYCLE(), strict=False)), outside  # 20 styles, then repeats


def _panel_legend(fig: Figure, ax: Axes, handles: Mapping[str, object], outside: bool) -> None:
    if handles:
        if outside:
            fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7)
        else:
            ax.legend(list(handles.values()), list(handles))


def _save_atomic(fig: Figure, path: str | os.PathLike) -> None:
    """Write fig as PNG to path via a temp file in the same directory and os.replace."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600
            fig.savefig(f, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def plot_loss_curves(
    series: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike,
    title: str,
    ylabel: str = "loss",
    markers: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    dashed: Callable[[str], bool] = lambda name: False,
    logy: bool = False,
    xlabel: str = "step",
) -> None:
    """One labelled line per series (e.g. "train", "valid") of (step, value) points against
    step (or `xlabel`); `markers[name]` (step, value) points are drawn as x in that series' colour. A
    series `dashed(name)` selects is drawn dashed in the colour of the series before it."""
    fig = _new_figure()
    ax = _axes(fig)
    line = None
    for name, points in series.items():
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        marker = "o" if len(points) <= _MARKER_MAX_POINTS else None
        style = {"linestyle": "--", "color": line.get_color()} if dashed(name) and line is not None else {}
        (line,) = ax.plot(steps, values, label=name, marker=marker, markersize=3, linewidth=1.2, **style)
        marks = [p for p in (markers or {}).get(name, ()) if np.isfinite(p[1])]
        if marks:
            ax.scatter(*zip(*marks, strict=True), marker="x", s=60, color=line.get_color(), zorder=3)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    _save_atomic(fig, path)


def plot_erank_vs_depth(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str) -> None:
    """Normalised effective rank against layer index, one line per variant or checkpoint; y in [0, 1]."""
    fig = _new_figure()
    ax = _axes(fig)
    for name, values in curves.items():
        reference = name.startswith(("(", "Gaussian"))  # reference lines: black, no markers
        style = {"color": "black", "linestyle": ":" if name.startswith("(") else "-.", "linewidth": 1.0} if reference else {}
        ax.plot(range(len(values)), values, label=name, marker="." if len(values) <= _MARKER_MAX_POINTS and not reference else None, **style)
    ax.set(xlabel="layer", ylabel="effective rank / min(T, d)", title=title, ylim=(0.0, 1.02))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    _save_atomic(fig, path)


def plot_beta_by_layer(
    stats_per_sublayer: Sequence[Mapping[str, float]],
    path: str | os.PathLike,
    title: str = "beta per sublayer",
) -> None:
    """Per sublayer (beta_stats dicts): mean with q25-q75 and q05-q95 bands; frac_negative on a twin axis."""
    x = np.arange(len(stats_per_sublayer))

    def col(key: str) -> np.ndarray:
        return np.array([s[key] for s in stats_per_sublayer], dtype=float)

    fig = _new_figure()
    ax = _axes(fig)
    ax.fill_between(x, col("q05"), col("q95"), alpha=0.2, color="C0", label="q05-q95")
    ax.fill_between(x, col("q25"), col("q75"), alpha=0.35, color="C0", label="q25-q75")
    ax.plot(x, col("mean"), color="C0", label="mean")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel="sublayer", ylabel="beta", title=title)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(x, col("frac_negative"), color="C3", linestyle="--", label="frac_negative")
    twin.set(ylabel="fraction beta < 0", ylim=(0.0, 1.0))
    handles, labels = ax.get_legend_handles_labels()
    twin_handles, twin_labels = twin.get_legend_handles_labels()
    ax.legend(handles + twin_handles, labels + twin_labels, loc="upper left")
    _save_atomic(fig, path)


def plot_heatmap(
    matrix: Sequence[Sequence[float]] | np.ndarray,
    steps: Sequence[int],
    path: str | os.PathLike,
    title: str,
    cbar_label: str,
    limits: tuple[float, float] | None = None,
) -> None:
    """Heatmap of matrix[layer, k] (layer 0 at the bottom), column k labelled by steps[k]; NaN
    cells blank; `limits` fixes the colour scale (to compare several maps)."""
    data = np.asarray(matrix, dtype=float)
    if data.ndim != 2 or data.size == 0 or data.shape[1] != len(steps):
        raise ValueError(f"matrix must be a non-empty [layers, {len(steps)}], got shape {data.shape}")
    fig = _new_figure()
    ax = _axes(fig)
    vmin, vmax = limits if limits is not None else (None, None)
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", origin="lower", interpolation="nearest", vmin=vmin, vmax=vmax)
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), _MAX_XTICKS)).round().astype(int))
    ax.set_xticks(ticks, [str(steps[k]) for k in ticks])
    ax.set(xlabel="step", ylabel="layer", title=title)
    fig.colorbar(image, ax=ax, label=cbar_label)
    _save_atomic(fig, path)


def plot_series_vs_x(series: Mapping[str, Sequence[tuple[float, float, float]]], path: str | os.PathLike, title: str, xlabel: str, ylabel: str, **options) -> None:
    """plot_series_panels with one panel (options: logx, logy, xticks)."""
    plot_series_panels({"": series}, path, title, xlabel, ylabel, **options)


def plot_series_panels(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float, float]]]],
    path: str | os.PathLike,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    xticks: Sequence[float] | None = None,
) -> None:
    """One line per series of (x, mean, spread) points, spread drawn as error bars (0 or NaN:
    none), one panel per key of `panels` (e.g. per depth) side by side on a shared y axis, each
    series name in the same style in every panel; `xticks` labels exactly those x values (e.g.
    the depths of a log axis)."""
    fig, axes, style, outside = _panel_figure(len(panels), list(dict.fromkeys(name for series in panels.values() for name in series)))
    handles: dict[str, object] = {}
    for ax, (panel, series) in zip(axes, panels.items(), strict=False):
        for name, points in series.items():
            points = sorted(p for p in points if np.isfinite(p[1]))
            if not points:
                continue
            x, y, err = (np.array(v, dtype=float) for v in zip(*points, strict=True))
            handles.setdefault(name, ax.errorbar(x, y, yerr=np.nan_to_num(err), marker="o", markersize=4, capsize=3, linewidth=1.2, **style[name]))
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        if xticks:
            ax.set_xticks(list(xticks), [f"{t:g}" for t in xticks])
            ax.minorticks_off()
        ax.set(xlabel=xlabel, title=panel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    if list(panels) == [""]:
        axes[0].set_title(title)
    else:  # named panels (or none): the title above them all
        fig.suptitle(title)
    _panel_legend(fig, axes[0], handles, outside)
    _save_atomic(fig, path)


def plot_scatter(
    groups: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    title: str,
    xlabel: str,
    ylabel: str,
    labels: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Scatter of (x, y) points, one colour per group, optional text label per point."""
    fig = _new_figure()
    ax = _axes(fig)
    for name, points in groups.items():
        if not points:
            continue
        x, y = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        ax.scatter(x, y, label=name, s=18)
        for (px, py), text in zip(points, (labels or {}).get(name, ()), strict=False):
            ax.annotate(text, (px, py), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if groups:
        ax.legend()
    _save_atomic(fig, path)


def plot_lr_sweep(
    panels: Mapping[str, Mapping[str, Mapping[float, float]]], chosen: Mapping[str, Mapping[str, float]], path: str | os.PathLike, title: str
) -> None:
    """Final loss against lr (log2 axis): one panel per sweep (e.g. per depth), one line per arm
    over its finite points, an arm in the same style in every panel and one legend beside them;
    the chosen lr (chosen[panel][arm]) ringed; diverged (NaN/inf) points drawn as x above every
    finite point, one row per arm so coinciding lrs stay visible."""
    arms = list(dict.fromkeys(arm for curves in panels.values() for arm in curves))
    fig, axes, style, outside = _panel_figure(len(panels), arms)
    finite = [loss for curves in panels.values() for losses in curves.values() for loss in losses.values() if np.isfinite(loss)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = (high - low) or 1.0
    lines: dict[str, object] = {}
    marks: dict[str, object] = {}
    for ax, (name, curves) in zip(axes, panels.items(), strict=False):
        for arm, losses in curves.items():
            color, row = style[arm]["color"], arms.index(arm)
            ok = sorted((lr, loss) for lr, loss in losses.items() if np.isfinite(loss))
            bad = sorted(lr for lr, loss in losses.items() if not np.isfinite(loss))
            if ok:
                (line,) = ax.plot(*zip(*ok, strict=True), color=color, linestyle=style[arm]["linestyle"], marker="o", markersize=4, linewidth=1.2)
                lines.setdefault(arm, line)
            if bad:
                marks.setdefault(arm, ax.scatter(bad, [high + (0.06 + 0.04 * row) * span] * len(bad), marker="x", s=50, color=color, zorder=3))
            lr = chosen.get(name, {}).get(arm)
            if lr is not None and lr in losses and np.isfinite(losses[lr]):
                ax.scatter([lr], [losses[lr]], s=140, facecolors="none", edgecolors=color, linewidths=1.8, zorder=4)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="learning rate", title=name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final valid loss")
    fig.suptitle(f"{title} (x: diverged, ring: chosen)")
    handles = {arm if arm in lines else f"{arm} (all diverged)": lines.get(arm, marks.get(arm)) for arm in arms if arm in lines or arm in marks}
    _panel_legend(fig, axes[0], handles, outside)
    _save_atomic(fig, path)
