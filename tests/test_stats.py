"""mim4dd_fast.stats against scipy.stats, hand-computed cases, and simulated sweeps with a known truth."""

import math

import numpy as np
import pytest
import scipy.stats as ss
from hypothesis import given, settings
from hypothesis import strategies as st

from mim4dd_fast.errors import ConfigError
from mim4dd_fast.stats import (
    EVAL_NET_BITS,
    Interval,
    StatsInputError,
    evaluation_seed,
    format_difference,
    format_interval,
    holm,
    mean_ci,
    paired_compare,
    sign_flip_p,
    smallest_sign_flip_p,
    student_t_cdf,
    student_t_ppf,
    sweep_effects,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
seed_values = st.lists(finite, min_size=2, max_size=12)


# -- Student t --------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(t=st.floats(-60, 60), df=st.floats(0.5, 1000))
def test_t_cdf_matches_scipy(t, df):
    assert student_t_cdf(t, df) == pytest.approx(ss.t.cdf(t, df), abs=1e-10)


@settings(max_examples=60, deadline=None)
@given(q=st.floats(1e-6, 1 - 1e-6), df=st.floats(0.5, 1000))
def test_t_ppf_matches_scipy(q, df):
    assert student_t_ppf(q, df) == pytest.approx(ss.t.ppf(q, df), rel=1e-8, abs=1e-9)


def test_t_quantiles_match_the_printed_table():
    # two-sided 95 % critical values from any t table
    for df, value in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)]:
        assert student_t_ppf(0.975, df) == pytest.approx(value, abs=5e-4)


# -- mean and interval over seeds ---------------------------------------------------------------
def test_mean_ci_hand_computed():
    iv = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, s = sqrt(2.5), se = s / sqrt(5) = sqrt(0.5)
    assert iv.mean == 3.0 and iv.n == 5 and iv.level == 0.95
    assert iv.half_width == pytest.approx(2.776445105 * math.sqrt(0.5), rel=1e-8)
    assert (iv.low, iv.high) == pytest.approx((3 - iv.half_width, 3 + iv.half_width))


@settings(max_examples=40, deadline=None)
@given(values=seed_values, level=st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_mean_ci_matches_scipy_t_interval(values, level):
    x = np.array(values)
    iv = mean_ci(values, level)
    if x.std(ddof=1) == 0:
        assert iv.low == iv.high == pytest.approx(x.mean())
        return
    low, high = ss.t.interval(level, x.size - 1, loc=x.mean(), scale=ss.sem(x))
    assert (iv.low, iv.high) == pytest.approx((low, high), rel=1e-8, abs=1e-8)


def test_one_seed_has_no_interval_and_bad_input_is_refused():
    iv = mean_ci([0.7])
    assert iv.mean == 0.7 and iv.low == -math.inf and iv.high == math.inf and iv.covers(0.0)
    assert format_interval(iv, 1, 100) == "70.0 (n=1: no interval)"
    for bad in ([], [1.0, math.nan], [[1.0, 2.0]]):
        with pytest.raises(StatsInputError):
            mean_ci(bad)
    with pytest.raises(ConfigError):  # a user-facing error: the CLI prints one sentence, exit 2
        mean_ci([1.0, 2.0], level=1.5)


# -- paired comparison ----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(pairs=st.lists(st.tuples(finite, finite), min_size=3, max_size=10))
def test_paired_t_matches_scipy_ttest_rel(pairs):
    a, b = (np.array(v) for v in zip(*pairs, strict=True))
    d = a - b
    r = paired_compare(a, b, n_resamples=200)
    assert r.n == len(pairs) and r.diff.mean == pytest.approx(d.mean())
    if d.std(ddof=1) <= 1e-9 * max(1.0, np.abs(d).max()):
        return  # degenerate: scipy returns nan, covered by the hand-computed test below
    ref = ss.ttest_rel(a, b)
    assert r.t_stat == pytest.approx(ref.statistic, rel=1e-7)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)
    ci = ref.confidence_interval(0.95)
    assert (r.diff.low, r.diff.high) == pytest.approx((ci.low, ci.high), rel=1e-7, abs=1e-9)


def test_paired_hand_computed_and_degenerate_cases():
    r = paired_compare([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])  # d = 2, 3, 4: mean 3, s = 1, se = 1/sqrt(3)
    assert r.t_stat == pytest.approx(3 * math.sqrt(3))
    assert r.diff.half_width == pytest.approx(4.302652730 / math.sqrt(3), rel=1e-8)
    assert r.permutation_p == pytest.approx(2 / 8) and r.permutation_exact  # only all-plus / all-minus reach 3
    assert r.detectable  # [0.52, 5.48] excludes 0
    same = paired_compare([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])  # every seed moves by exactly +0.5
    assert (same.diff.low, same.diff.high, same.p_value, same.t_stat) == (0.5, 0.5, 0.0, math.inf)
    none = paired_compare([1.0, 2.0], [1.0, 2.0])
    assert none.p_value == 1.0 and none.permutation_p == 1.0 and not none.detectable
    one = paired_compare([0.9], [0.8])
    assert math.isnan(one.p_value) and not one.detectable and one.diff.half_width == math.inf
    with pytest.raises(StatsInputError):
        paired_compare([1.0, 2.0], [1.0])


@settings(max_examples=25, deadline=None)
@given(d=st.lists(st.floats(-10, 10, allow_nan=False).filter(lambda v: abs(v) > 1e-3), min_size=2, max_size=9))
def test_sign_flip_matches_scipy_exact_permutation_test(d):
    p, exact = sign_flip_p(d)
    ref = ss.permutation_test((np.array(d),), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                              n_resamples=np.inf, alternative="two-sided")
    assert exact and p == pytest.approx(ref.pvalue, abs=1e-12)


def test_sign_flip_smallest_p_and_monte_carlo():
    assert sign_flip_p([1.0] * 5)[0] == smallest_sign_flip_p(5) == 1 / 16  # 5 seeds can never reach 0.05
    assert smallest_sign_flip_p(6) == 1 / 32
    d = np.random.default_rng(3).normal(0.5, 1.0, size=20)  # 2^20 patterns: Monte Carlo
    p_mc, exact = sign_flip_p(d, n_resamples=20_000, seed=1)
    ref = ss.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                              n_resamples=200_000, random_state=0).pvalue
    assert not exact and p_mc == pytest.approx(ref, abs=4 * math.sqrt(ref * (1 - ref) / 20_000) + 1e-4)
    assert sign_flip_p(d, n_resamples=2000, seed=5) == sign_flip_p(d, n_resamples=2000, seed=5)


def test_bootstrap_interval_matches_scipy_percentile_and_is_deterministic():
    a = np.array([0.82, 0.85, 0.80, 0.88, 0.84, 0.83, 0.86, 0.81])
    b = np.array([0.80, 0.84, 0.81, 0.85, 0.82, 0.80, 0.85, 0.80])
    r = paired_compare(a, b, n_resamples=100_000, seed=0)
    ref = ss.bootstrap((a - b,), np.mean, method="percentile", n_resamples=100_000, random_state=1).confidence_interval
    assert r.bootstrap.low == pytest.approx(ref.low, abs=1.5e-4)
    assert r.bootstrap.high == pytest.approx(ref.high, abs=1.5e-4)
    assert paired_compare(a, b, seed=7) == paired_compare(a, b, seed=7)
    assert paired_compare(a, b, seed=7).bootstrap != paired_compare(a, b, seed=8).bootstrap


# -- sweeps ---------------------------------------------------------------------------------------
def _rm_f_by_regression(y: np.ndarray) -> float:
    """Second implementation of the repeated-measures F: least squares with seed and setting dummies."""
    n, k = y.shape
    seed_dummies = np.repeat(np.eye(n), k, axis=0)
    setting_dummies = np.tile(np.eye(k), (n, 1))[:, 1:]
    target = y.reshape(-1)

    def rss(design):
        return float(((target - design @ np.linalg.lstsq(design, target, rcond=None)[0]) ** 2).sum())

    full, reduced = rss(np.hstack([seed_dummies, setting_dummies])), rss(seed_dummies)
    return ((reduced - full) / (k - 1)) / (full / ((n - 1) * (k - 1)))


def test_sweep_statistics_match_regression_scipy_and_holm():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(3, 3)) + np.array([0.0, 0.3, 1.0])  # 3 seeds x 3 settings: 6^3 = 216 arrangements
    sweep = sweep_effects({s: y[:, j] for j, s in enumerate(["a", "b", "c"])}, "a")
    assert sweep.exact and sweep.n_seeds == 3 and sweep.default == "a"
    assert sweep.f_stat == pytest.approx(_rm_f_by_regression(y), rel=1e-9)

    def between(*cols, axis):
        means = np.stack([c.mean(axis=axis) for c in cols], axis=-1)
        return ((means - means.mean(axis=-1, keepdims=True)) ** 2).sum(axis=-1)

    ref = ss.permutation_test(tuple(y.T), between, permutation_type="samples", n_resamples=np.inf,
                              alternative="greater", vectorized=True)
    assert sweep.p_no_effect == pytest.approx(ref.pvalue, abs=1e-12)
    assert sweep.interval_level == pytest.approx(1 - 0.05 / 2)  # Bonferroni over the 2 non-default settings
    for effect, j in zip(sweep.effects, (1, 2), strict=True):
        ref_t = ss.ttest_rel(y[:, j], y[:, 0])
        ci = ref_t.confidence_interval(sweep.interval_level)
        assert effect.p_value == pytest.approx(ref_t.pvalue, rel=1e-7)
        assert (effect.diff.low, effect.diff.high) == pytest.approx((ci.low, ci.high), rel=1e-7)
    assert [e.p_holm for e in sweep.effects] == pytest.approx(holm([e.p_value for e in sweep.effects]))


def test_holm_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_sweep_refuses_bad_input():
    with pytest.raises(StatsInputError, match="default"):
        sweep_effects({"a": [1, 2], "b": [1, 3]}, "z")
    with pytest.raises(StatsInputError, match="one value per seed"):
        sweep_effects({"a": [1, 2], "b": [1, 3, 4]}, "a")
    with pytest.raises(StatsInputError, match="two settings"):
        sweep_effects({"a": [1, 2]}, "a")


def _noise_sweep(rng, n_seeds=6, k=4, shift=0.0):
    """Per-seed accuracies of a k-setting sweep: shared seed effect + heavy-tailed cell noise (+ one shift)."""
    seed_effect = rng.normal(0, 3.0, size=(n_seeds, 1))
    y = seed_effect + rng.standard_t(4, size=(n_seeds, k))
    y[:, -1] += shift
    return {j: y[:, j] for j in range(k)}


def test_no_effect_test_is_calibrated_on_pure_noise_and_has_power():
    rng = np.random.default_rng(2024)
    n_sweeps = 200
    rejections = sum(
        sweep_effects(_noise_sweep(rng), 0, n_resamples=999, seed=i).p_no_effect < 0.05 for i in range(n_sweeps)
    )
    # The rejection rate is consistent with the nominal 5 % (two-sided binomial test at 0.001).
    assert ss.binomtest(rejections, n_sweeps, 0.05).pvalue > 1e-3, rejections
    # A real effect of 3 noise sd's on one setting is found in most sweeps.
    power = np.mean([sweep_effects(_noise_sweep(rng, shift=3.0 * math.sqrt(2)), 0, n_resamples=999, seed=i).detectable
                     for i in range(50)])
    assert power >= 0.8, power


def test_the_old_sensitivity_ratio_is_not_calibrated():
    """Why sweep_effects replaces it: range of means / mean ddof=0 seed std exceeds 1 on most pure-noise sweeps."""
    y = np.random.default_rng(0).normal(size=(5000, 2, 5))  # 2 seeds x 5 settings, no effect at all
    means = y.mean(axis=1)
    ratio = (means.max(-1) - means.min(-1)) / y.std(axis=1).mean(-1)
    assert (ratio > 1).mean() > 0.9  # 97 % here; docs/theory.md section 6: "more than 90 %"


def test_sweep_effect_intervals_flag_the_shifted_setting():
    rng = np.random.default_rng(7)
    values = _noise_sweep(rng, n_seeds=8, shift=6.0)
    sweep = sweep_effects(values, 0, seed=1)
    assert sweep.detectable
    flags = {e.setting: e.detectable for e in sweep.effects}
    assert flags[3] and not flags[1] and not flags[2]


# -- formatting ----------------------------------------------------------------------------------
def test_formatting():
    iv = Interval(mean=0.884, low=0.872, high=0.896, level=0.95, n=5)
    assert format_interval(iv, 1, 100, " %") == "88.4 ± 1.2 % [87.2, 89.6]"
    assert format_difference(Interval(0.008, -0.003, 0.019, 0.95, 5), 1, 100) == \
        "+0.8 ± 1.1 [-0.3, 1.9], no detectable effect"
    assert format_difference(Interval(-0.02, -0.03, -0.01, 0.95, 5), 1, 100) == "-2.0 ± 1.0 [-3.0, -1.0]"
    assert str(iv) == "0.88 ± 0.01 [0.87, 0.90]"


# -- evaluation seeds -----------------------------------------------------------------------------
@given(s=st.integers(0, 2**40), i=st.integers(0, 2**EVAL_NET_BITS - 1),
       t=st.integers(0, 2**40), j=st.integers(0, 2**EVAL_NET_BITS - 1))
def test_evaluation_seeds_never_collide(s, i, t, j):
    a, b = evaluation_seed(s, i), evaluation_seed(t, j)
    assert (a == b) == ((s, i) == (t, j))
    assert 2**EVAL_NET_BITS <= a < 2**63  # never equal to a distillation seed below 2^20; fits torch's seed


def test_evaluation_seed_layout_and_bad_input():
    assert evaluation_seed(0, 0) == 2**20 and evaluation_seed(1, 3) == 2 * 2**20 + 3
    # the old scheme seed + i gave set 0's net 1 and set 1's net 0 the same seed
    assert evaluation_seed(0, 1) != evaluation_seed(1, 0)
    for s, i in ((-1, 0), (0, -1), (0, 2**EVAL_NET_BITS), (1.5, 0), (0, True)):
        with pytest.raises(StatsInputError):
            evaluation_seed(s, i)
