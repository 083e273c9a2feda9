"""Statistics of the evaluation protocol (megatron_mgt.stats) on hand-worked examples."""

from __future__ import annotations

import math

import pytest

from megatron_mgt import stats


@pytest.mark.parametrize(
    "p,df,table",
    [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.975, 9, 2.2622), (0.95, 10, 1.8125), (0.975, 30, 2.0423)],
)
def test_t_quantile_table_values(p: float, df: int, table: float) -> None:
    assert stats.t_quantile(p, df) == pytest.approx(table, abs=5e-5)  # tables round to 4 decimals


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.9995])
def test_t_quantile_closed_forms(p: float) -> None:
    # df = 1 (Cauchy): tan(pi (p - 1/2)); df = 2: (2p - 1) / sqrt(2 p (1 - p))
    assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert stats.t_quantile(1 - p, 3) == pytest.approx(-stats.t_quantile(p, 3), rel=1e-12)


def test_t_quantile_edges_and_errors() -> None:
    assert stats.t_quantile(0.5, 7) == 0.0
    assert stats.t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)  # the normal limit
    for p in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="p in"):
            stats.t_quantile(p, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_quantile(0.9, 0)


def test_incomplete_beta_closed_form() -> None:
    # I_x(2, 3) = P(Binomial(4, x) >= 2) = 1 - (1 - x)^4 - 4 x (1 - x)^3
    for x in (0.1, 0.4, 0.8):
        assert stats.regularized_incomplete_beta(2, 3, x) == pytest.approx(1 - (1 - x) ** 4 - 4 * x * (1 - x) ** 3, abs=1e-13)


def test_paired_difference_worked_example() -> None:
    a = {0: 3.1, 1: 3.2, 2: 3.0, 3: 3.3, 4: 3.1, 5: 9.0, 6: float("nan")}
    b = {0: 3.0, 1: 3.0, 2: 3.0, 3: 3.0, 4: 3.0, 6: 3.0, 7: 3.0}
    out = stats.paired_difference(a, b)
    # seeds 0-4 only (5 missing in b, 6 NaN in a, 7 missing in a): d = 0.1, 0.2, 0.0, 0.3, 0.1
    assert list(out["diffs"]) == [0, 1, 2, 3, 4]
    assert out["diffs"][3] == pytest.approx(0.3)
    # mean 0.7 / 5 = 0.14; squared deviations 0.0016 + 0.0036 + 0.0196 + 0.0256 + 0.0016 = 0.052
    # s^2 = 0.052 / 4 = 0.013; se = sqrt(0.013 / 5); half width = t_{0.975, 4} se = 2.7764 * 0.0509902
    assert out["n"] == 5
    assert out["mean"] == pytest.approx(0.14)
    assert out["std"] == pytest.approx(math.sqrt(0.013))
    assert out["se"] == pytest.approx(math.sqrt(0.013 / 5))
    assert out["ci"][0] == pytest.approx(0.14 - 2.7764 * 0.0509902, abs=1e-5)
    assert out["ci"][1] == pytest.approx(0.14 + 2.7764 * 0.0509902, abs=1e-5)
    assert out["level"] == 0.95
    assert stats.decide(out)["decision"] == "undetermined"  # the interval [-0.0016, 0.2816] holds 0


def test_paired_difference_too_few_seeds() -> None:
    out = stats.paired_difference({0: 1.0}, {0: 0.5})
    assert out["n"] == 1 and out["mean"] == pytest.approx(0.5)
    assert all(math.isnan(v) for v in (out["std"], out["se"], *out["ci"]))
    assert stats.decide(out)["decision"] == "undetermined"
    assert stats.paired_difference({}, {})["n"] == 0


def test_interaction_worked_example() -> None:
    l_mgt = {0: 3.0, 1: 2.8, 2: 3.0, 3: 1.0}
    l_mhc = {0: 3.2, 1: 3.1, 2: 3.1, 3: 1.0}
    l_ddl = {0: 3.3, 1: 3.2, 2: 3.1}
    l_preln = {0: 3.4, 1: 3.3, 2: 3.3, 3: 1.0}
    out = stats.interaction(l_mgt, l_mhc, l_ddl, l_preln)
    # I_0 = 3.0 - 3.2 - 3.3 + 3.4 = -0.1; I_1 = 2.8 - 3.1 - 3.2 + 3.3 = -0.2; I_2 = 3.0 - 3.1 - 3.1 + 3.3 = 0.1; seed 3 lacks ddl
    assert list(out["terms"]) == [0, 1, 2]
    assert [out["terms"][s] for s in (0, 1, 2)] == pytest.approx([-0.1, -0.2, 0.1])
    # mean -0.2 / 3; deviations -1/30, -4/30, 5/30: s^2 = (1 + 16 + 25) / 900 / 2 = 42 / 1800
    assert out["mean"] == pytest.approx(-0.2 / 3)
    assert out["std"] == pytest.approx(math.sqrt(42 / 1800))
    half = 4.3027 * math.sqrt(42 / 1800 / 3)  # t_{0.975, 2}
    assert out["ci"] == pytest.approx([-0.2 / 3 - half, -0.2 / 3 + half], abs=1e-4)


def test_interaction_of_a_depth_table() -> None:
    """The runners' rows (compare_arms) give the same worked example, with the decision; a table
    without all four 2 x 2 arms has no interaction."""
    from megatron_mgt.experiments.arms import interaction_of

    rows = [{"arm": "mgt", "per_seed": {0: 3.0, 1: 2.8, 2: 3.0}}, {"arm": "mhc", "per_seed": {0: 3.2, 1: 3.1, 2: 3.1}},
            {"arm": "ddl", "per_seed": {0: 3.3, 1: 3.2, 2: 3.1}}, {"arm": "preln", "per_seed": {0: 3.4, 1: 3.3, 2: 3.3}},
            {"arm": "postln", "per_seed": {0: 9.0}}]
    out = interaction_of(rows, "ci_excludes_zero", 0.95)
    assert out["mean"] == pytest.approx(-0.2 / 3) and out["decision"] == out["verdict"] == "undetermined" and out["formula"].startswith("I_s = L_mgt")
    assert interaction_of(rows[1:], "ci_excludes_zero", 0.95) is None


def test_decide_three_cases_and_rule_recorded() -> None:
    assert stats.decide({"ci": [-0.3, -0.1]})["decision"] == "win"
    assert stats.decide({"ci": [0.1, 0.2]})["decision"] == "loss"
    assert stats.decide({"ci": [-0.1, 0.1]})["decision"] == "undetermined"
    assert stats.decide({"ci": [-0.1, 0.0]})["decision"] == "undetermined"  # touching zero is not excluding it
    out = stats.decide({"ci": [-0.3, -0.1], "level": 0.9})
    assert out["rule"] == "ci_excludes_zero" and out["level"] == 0.9 and "upper bound < 0" in out["rule_text"]
    with pytest.raises(ValueError, match="ci_excludes_zero"):
        stats.decide({"ci": [0.1, 0.2]}, rule="p_value")


def test_t_interval_level_validated() -> None:
    with pytest.raises(ValueError, match="level"):
        stats.t_interval([1.0, 2.0], level=95)


def test_copied_mean_std_pearson_spearman() -> None:
    assert stats.mean_std([1.0, 2.0, 3.0, float("nan"), None]) == pytest.approx((2.0, 1.0, 3))
    assert stats.mean_std([4.0]) == (4.0, 0.0, 1)
    mean, std, n = stats.mean_std([float("inf")])
    assert math.isnan(mean) and math.isnan(std) and n == 0
    assert stats.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert stats.pearson([1, 2, 3, 4], [1, 0, 0, 1]) == pytest.approx(0.0)
    assert math.isnan(stats.pearson([1, 2], [1, 2]))
    assert math.isnan(stats.pearson([1, 2, 3], [5, 5, 5]))  # constant side
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: y ranks (0.5, 0.5, 2, 3) against x ranks (0, 1, 2, 3)
    assert stats.spearman([1, 2, 3, 4], [7, 7, 8, 9]) == pytest.approx(stats.pearson([0, 1, 2, 3], [0.5, 0.5, 2, 3]))
    assert stats.spearman([1, 2, 3, float("nan")], [3, 2, 1, 0]) == pytest.approx(-1.0)
