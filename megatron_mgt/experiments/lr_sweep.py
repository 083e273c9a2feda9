"""Pure logic of a per-arm learning-rate sweep: a geometric grid, edge extension, selection.

Results map lr -> final validation loss; a NaN or infinite loss is a diverged run and ranks
as the worst loss. The sweep extends the grid by one factor beyond whichever edge holds the
best point until the best point is interior or the grid reaches max_points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

SELECTION_RULE = (
    "lowest final valid loss over the sweep; ties to the smaller lr; a best point at an edge is extended by factor until interior"
)


def _check_factor(factor: float) -> None:
    if not (math.isfinite(factor) and factor > 1.0):
        raise ValueError(f"factor must be a finite number > 1, got {factor}")


def _rank_loss(loss: float) -> float:
    """The loss used for ranking: a diverged run (NaN or inf) counts as +inf."""
    return loss if math.isfinite(loss) else math.inf


def _best_lr(results: Mapping[float, float]) -> float:
    """argmin over lr of the ranking loss; ties (including all diverged) to the smaller lr."""
    if not results:
        raise ValueError("no sweep results: expected at least one lr -> loss entry")
    return min(results, key=lambda lr: (_rank_loss(results[lr]), lr))


def initial_grid(center: float, points: int = 4, factor: float = 2.0) -> list[float]:
    """lr_k = center * factor^(k - points // 2), k = 0 .. points - 1, ascending; contains center
    (for points = 4: center / factor^2, center / factor, center, center * factor)."""
    if not (math.isfinite(center) and center > 0):
        raise ValueError(f"center lr must be a finite number > 0, got {center}")
    if points < 4:
        raise ValueError(f"an lr sweep needs points >= 4, got {points}")
    _check_factor(factor)
    return [center * factor ** (k - points // 2) for k in range(points)]


def extend(results: Mapping[float, float], factor: float = 2.0, max_points: int = 10) -> list[float]:
    """The lrs to run next: [min lr / factor] if the best point (see select) is the smallest lr,
    [max lr * factor] if it is the largest, [] if it is interior or the grid already has
    max_points points (then select reports interior=False: the edge was not resolved)."""
    _check_factor(factor)
    if len(results) < 2:
        raise ValueError(f"extend needs at least 2 swept lrs to tell an edge, got {len(results)}")
    if len(results) >= max_points:
        return []
    best = _best_lr(results)
    if best == min(results):
        return [best / factor]
    if best == max(results):
        return [best * factor]
    return []


def select(results: Mapping[float, float]) -> dict:
    """The chosen lr under SELECTION_RULE: the smallest lr among those with the lowest finite loss.

    Returns {"lr", "loss", "interior", "points", "rule"}; lr and loss are None when every run
    diverged, interior says whether the chosen lr lies strictly inside the swept range.
    """
    best = _best_lr(results)
    if not math.isfinite(results[best]):
        return {"lr": None, "loss": None, "interior": False, "points": len(results), "rule": SELECTION_RULE}
    interior = min(results) < best < max(results)
    return {"lr": best, "loss": results[best], "interior": interior, "points": len(results), "rule": SELECTION_RULE}


def sweep(loss_at: Callable[[float], float], center: float, points: int = 4, factor: float = 2.0, max_points: int = 10) -> dict:
    """Run loss_at on initial_grid(center, points, factor), then on extend(...) until it returns [].

    Returns select's keys plus "results": [[lr, loss], ...] ascending in lr (every point run),
    "converged" (the chosen lr is interior), "center", "factor" and "max_points".
    """
    if max_points < points:
        raise ValueError(f"max_points ({max_points}) must be >= points ({points})")
    results = {lr: loss_at(lr) for lr in initial_grid(center, points, factor)}
    while new := extend(results, factor, max_points):
        results.update({lr: loss_at(lr) for lr in new})
    chosen = select(results)
    return {
        **chosen,
        "results": [[lr, results[lr]] for lr in sorted(results)],
        "converged": chosen["interior"],
        "center": center,
        "factor": factor,
        "max_points": max_points,
    }
