"""The example's seed statistics against textbook values and scipy's paired t-test."""

from __future__ import annotations

import math
import statistics

import pytest

pytest.importorskip("scipy")

from scipy import stats as sps

from examples.stats import paired, summarize, verdict


def test_summarize_is_mean_and_sample_std() -> None:
    xs = [68.2, 67.1, 69.4]
    s = summarize(xs)
    assert s.mean == pytest.approx(statistics.fmean(xs), abs=1e-12)
    assert s.std == pytest.approx(statistics.stdev(xs), abs=1e-12)
    assert summarize([3.0]) == (3.0, 0.0, 1)


def test_paired_interval_matches_scipy_ttest_rel() -> None:
    a = [68.2, 67.1, 69.4, 66.0]
    b = [67.9, 67.5, 68.1, 65.2]
    got = paired(a, b, level=0.95)
    ci = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert got.mean == pytest.approx(
        statistics.fmean([x - y for x, y in zip(a, b, strict=True)]), abs=1e-12
    )
    assert (got.low, got.high) == pytest.approx((ci.low, ci.high), abs=1e-10)


def test_three_seeds_use_the_t_quantile_with_two_degrees_of_freedom() -> None:
    d = [1.0, 2.0, 4.0]
    got = paired(d, [0.0, 0.0, 0.0])
    half = 4.302652729911275 * statistics.stdev(d) / math.sqrt(3)  # t_{0.975, 2}
    assert (got.low, got.high) == pytest.approx((7 / 3 - half, 7 / 3 + half), abs=1e-9)
    assert got.low < 0 < got.high  # [−1.46, +6.13]: mean +2.33 but not significant
    assert not got.significant


def test_float_noise_is_a_tie_not_a_win() -> None:
    # Two means of the same counts, summed in another order, differ in the last bits.
    fedit = [68.1987000928505, 70.0, 66.5]
    fair = [68.19870009285052, 70.0, 66.5]
    pr = paired(fair, fedit)
    assert pr.tie
    assert not pr.significant
    v = verdict({"fedit": fedit, "lora_fair": fair})
    assert v.best is None
    assert v.text.startswith("no significant difference")


def test_the_same_difference_on_every_seed_is_not_significant() -> None:
    # Two seeds, one test image more on each: sd = 0, so the t-interval has zero width.
    # Averages of per-domain percentages, so the two differences differ in their last bits.
    fedit = [(50.0 + 100 / 3) / 2, 67.0]
    other = [fedit[0] + 100 / 359, 67.0 + 100 / 359]
    assert other[0] - fedit[0] != other[1] - fedit[1]
    pr = paired(other, fedit)
    assert pr.constant
    assert pr.low == pr.high == pytest.approx(100 / 359)
    assert not pr.significant
    assert verdict({"fedit": fedit, "other": other}).best is None
    # A varying difference of the same mean with a positive-width interval still can be.
    assert paired([66.3, 67.26, 66.28], [66.0, 67.0, 66.0]).significant


def test_verdict_needs_every_adjusted_interval_above_zero() -> None:
    base = [60.0, 62.0, 61.0, 63.0]
    runs = {
        "fedit": base,
        "a": [x + 5.0 + e for x, e in zip(base, [0.1, -0.1, 0.2, 0.0], strict=True)],
        "b": [x + 0.5 * s for x, s in zip(base, [1, -1, 1, -1], strict=True)],
    }
    v = verdict(runs)
    assert v.best == "a"
    assert v.level == pytest.approx(1 - 0.05 / 2)
    # A noisy leader is not declared best, though its mean is highest.
    runs["a"] = [x + d for x, d in zip(base, [6.0, -4.0, 5.0, -3.0], strict=True)]
    v = verdict(runs)
    assert v.best is None
    assert v.leader == "a"
    assert "fedit" in v.not_separated
    assert verdict({"fedit": [1.0], "a": [2.0]}).best is None  # one seed: no interval
