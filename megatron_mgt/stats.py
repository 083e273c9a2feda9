"""Statistics of the evaluation protocol: seed summaries, correlations, Student t intervals,
seed-paired differences, the 2x2 interaction term and the decision rule applied to them.

Pure Python (no scipy): the t quantile inverts the t CDF, written with the regularised
incomplete beta function.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import torch

_CF_EPS = 1e-15
_CF_TINY = 1e-300
_CF_MAX_TERMS = 10_000
_BISECT_STEPS = 200
DECISION_RULES = {
    "ci_excludes_zero": "for a loss difference (lower is better): win if the CI's upper bound < 0, loss if its lower bound > 0, else undetermined",
}


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample std (0 for one value) of the finite values, and their count."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson r over the pairs where both values are finite; NaN with fewer than 3 pairs or a constant side."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan
    xs, ys = torch.tensor(pairs, dtype=torch.float64).T
    xs, ys = xs - xs.mean(), ys - ys.mean()
    den = (xs.norm() * ys.norm()).item()
    return (xs @ ys).item() / den if den > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rho: Pearson r of the ranks (ties get their average rank) over the finite pairs."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan

    def ranks(v):
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():  # average ties
            mask = t == value
            r[mask] = r[mask].mean()
        return r.tolist()

    a, b = zip(*pairs, strict=True)
    return pearson(ranks(list(a)), ranks(list(b)))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """1 / (1 + d_1 / (1 + d_2 / (1 + ...))) by the modified Lentz method, with
    d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)) and d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))."""

    def guard(v: float) -> float:
        return v if abs(v) > _CF_TINY else _CF_TINY

    # f_0 = 1 for the leading "1 +"; Lentz keeps C_n = f_n / f_{n-1} and D_n = f_{n-1} / f_n.
    f, c, d = 1.0, 1.0, 0.0
    for n in range(1, _CF_MAX_TERMS):
        m = n // 2
        if n % 2 == 0:
            coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 / guard(1.0 + coef * d)
        c = guard(1.0 + coef / c)
        f *= c * d
        if abs(c * d - 1.0) < _CF_EPS:
            break
    # the loop evaluated 1 + d_1 / (1 + ...) starting from the "1 +"; invert it.
    return 1.0 / f


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) = x^a (1 - x)^b / (a B(a, b)) * CF(a, b, x) for x < (a + 1) / (a + b + 2),
    else 1 - I_{1-x}(b, a) (where the continued fraction converges fast)."""
    if a <= 0 or b <= 0:
        raise ValueError(f"incomplete beta needs a > 0 and b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete beta needs x in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) * _beta_continued_fraction(a, b, x)


def _t_upper_tail(t: float, df: float) -> float:
    """P(T > t) = I_{df / (df + t^2)}(df / 2, 1 / 2) / 2 for t >= 0."""
    return 0.5 * regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """Student t quantile t_{p, df}: the t with P(T <= t) = p, found by bisection on the upper tail
    P(T > t) = 1 - p (no cancellation near p = 1); t_{1-p} = -t_p."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs p in (0, 1), got {p}")
    if not (df > 0 and math.isfinite(df)):
        raise ValueError(f"t_quantile needs finite degrees of freedom df > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while _t_upper_tail(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        if _t_upper_tail(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean, sample std s, se = s / sqrt(n) and the t interval mean -+ t_{(1+level)/2, n-1} se of the finite values.

    Returns {"n", "mean", "std", "se", "ci": [lo, hi], "level"}; std, se and ci are NaN for n < 2
    (mean NaN for n = 0).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    mean, std, n = mean_std(values)
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "se": math.nan, "ci": [math.nan, math.nan], "level": level}
    se = std / math.sqrt(n)
    half = t_quantile(0.5 + level / 2, n - 1) * se
    return {"n": n, "mean": mean, "std": std, "se": se, "ci": [mean - half, mean + half], "level": level}


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float], level: float = 0.95) -> dict:
    """Seed-paired differences d_s = a_s - b_s over the seeds where both are finite, with their t_interval.

    Returns t_interval's keys plus "diffs" {seed: d_s} (seeds in sorted order when sortable).
    """
    seeds = [s for s in _seed_order(a) if s in b and _finite(a[s]) and _finite(b[s])]
    diffs = {s: a[s] - b[s] for s in seeds}
    return {**t_interval(list(diffs.values()), level), "diffs": diffs}


def interaction(
    l_mgt: Mapping[Hashable, float],
    l_mhc: Mapping[Hashable, float],
    l_ddl: Mapping[Hashable, float],
    l_preln: Mapping[Hashable, float],
    level: float = 0.95,
) -> dict:
    """2x2 interaction per seed, I_s = L_mgt - L_mhc - L_ddl + L_preln, over the seeds finite in all four, with its t_interval.

    For a loss, I < 0 means the two mechanisms together gain more than the sum of their
    separate gains over pre-LN (superadditive). Returns t_interval's keys plus "terms" {seed: I_s}.
    """
    arms = (l_mgt, l_mhc, l_ddl, l_preln)
    seeds = [s for s in _seed_order(l_mgt) if all(s in arm and _finite(arm[s]) for arm in arms)]
    terms = {s: l_mgt[s] - l_mhc[s] - l_ddl[s] + l_preln[s] for s in seeds}
    return {**t_interval(list(terms.values()), level), "terms": terms}


def _seed_order(values: Mapping[Hashable, float]) -> list:
    """The mapping's keys, sorted when they are mutually comparable, else in insertion order."""
    try:
        return sorted(values)
    except TypeError:
        return list(values)


def decide(ci: Mapping, rule: str = "ci_excludes_zero") -> dict:
    """Decision on a loss difference (lower is better) from its interval ci["ci"] = [lo, hi].

    Rule "ci_excludes_zero": "win" if hi < 0, "loss" if lo > 0, else "undetermined" (also for a
    NaN interval). Returns {"decision", "rule", "rule_text", "level"} so results record the rule.
    """
    if rule not in DECISION_RULES:
        raise ValueError(f"unknown decision rule {rule!r}; known rules: {', '.join(sorted(DECISION_RULES))}")
    lo, hi = ci["ci"]
    decision = "win" if hi < 0 else "loss" if lo > 0 else "undetermined"
    return {"decision": decision, "rule": rule, "rule_text": DECISION_RULES[rule], "level": ci.get("level")}
