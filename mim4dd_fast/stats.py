"""Statistics for comparing distillation settings: intervals over seeds, paired tests, sweep effects.

The unit of observation is one *distillation seed*: a new distilled set, evaluated by its own nets.
Nets of one set share that set, so their accuracies are not independent replicates; average them
into one number per seed first, and give every (setting, seed) cell its own evaluation seeds
(``evaluation_seed``). Settings are compared PAIRED on the same distillation seeds, which removes the
seed-to-seed variation the settings share.

What is here, and why each piece:
- ``mean_ci``: mean and Student-t interval over seeds (the primary interval everywhere).
- ``paired_compare``: paired t interval and p-value of a - b, plus a percentile-bootstrap interval and
  an exact sign-flip permutation p-value, which do not assume normal differences.
- ``sweep_effects``: for a one-at-a-time sweep, each setting's paired difference from the default
  (Bonferroni-adjusted intervals, Holm-adjusted p-values) and a within-seed permutation test of
  "this parameter has no effect" (repeated-measures F statistic). It replaces the old "sensitivity
  ratio" (range of means / ddof=0 std over seeds), which has no calibrated null distribution.
- ``holm``: family-wise adjustment when several parameters' tests are reported together.
- ``format_interval`` / ``format_difference``: "mean ± half-width [low, high]", and
  "no detectable effect" when a difference's interval covers zero.

Runtime needs numpy only: the Student t distribution is computed here from the regularized
incomplete beta function (tests check it against scipy.stats).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

__all__ = [
    "EVAL_NET_BITS",
    "Interval",
    "PairedComparison",
    "SettingEffect",
    "StatsInputError",
    "SweepEffects",
    "evaluation_seed",
    "format_difference",
    "format_interval",
    "holm",
    "mean_ci",
    "paired_compare",
    "sign_flip_p",
    "smallest_sign_flip_p",
    "student_t_cdf",
    "student_t_ppf",
    "sweep_effects",
]

DEFAULT_RESAMPLES = 10_000
MAX_EXACT = 1 << 16  # enumerate the permutation distribution exactly up to this many arrangements
_TIE_RTOL = 1e-12  # resampled statistics this close to the observed one count as ties (float noise)


class StatsInputError(ConfigError, ValueError):
    """Bad input to a statistics function (empty, non-finite, mismatched seeds, out-of-range seed)."""


# ----------------------------------------------------------------------------------------------
# Student t distribution (no scipy at runtime)
# ----------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0, with y = 1 - x passed in exactly.

    Passing y separately keeps full precision when x is within rounding of 1 (the t CDF near t = 0).
    """
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    t2 = t * t
    tail = 0.5 * _betainc(0.5 * df, 0.5, df / (df + t2), t2 / (df + t2))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def student_t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (0 < q < 1), by bisection on ``student_t_cdf``."""
    if not 0.0 < q < 1.0:
        raise StatsInputError(f"a quantile needs 0 < q < 1, got {q!r}.")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -student_t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < q:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------------
# Intervals
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at ``level`` from ``n`` seeds (infinite when n < 2)."""

    mean: float
    low: float
    high: float
    level: float
    n: int

    @property
    def half_width(self) -> float:
        return 0.5 * (self.high - self.low)

    def covers(self, value: float = 0.0) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return format_interval(self)


def _as_values(values: Sequence[float], what: str = "values") -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise StatsInputError(f"{what} must be a non-empty list of numbers (one per seed), got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise StatsInputError(f"{what} must be finite numbers, got {x.tolist()}.")
    return x


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise StatsInputError(f"the confidence level must be between 0 and 1, got {level!r}.")


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of per-seed values and its Student-t interval: mean ± t_{n-1} * s / sqrt(n).

    With one seed there is no estimate of the spread, so the interval is (-inf, inf).
    """
    _check_level(level)
    x = _as_values(values)
    n, m = x.size, float(x.mean())
    if n < 2:
        return Interval(m, -math.inf, math.inf, level, n)
    half = student_t_ppf(0.5 + level / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(m, m - half, m + half, level, n)


# ----------------------------------------------------------------------------------------------
# Paired comparison of two settings on the same seeds
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedComparison:
    """a - b over the same seeds. ``diff`` (paired t) is the primary interval and decides ``detectable``."""

    n: int
    mean_a: float
    mean_b: float
    diff: Interval  # mean of (a - b) with its paired Student-t interval
    t_stat: float  # paired t statistic (nan with one seed, ±inf when all differences are equal and non-zero)
    p_value: float  # two-sided paired t p-value (nan with one seed)
    bootstrap: Interval  # percentile bootstrap interval of the mean difference
    permutation_p: float  # two-sided sign-flip permutation p-value
    permutation_exact: bool  # True: all 2^n sign patterns enumerated; False: Monte Carlo

    @property
    def detectable(self) -> bool:
        return not self.diff.covers(0.0)


def _paired_t(d: np.ndarray, level: float) -> tuple[Interval, float, float]:
    """Paired t interval, statistic and two-sided p-value of the mean of the differences ``d``."""
    n, m = d.size, float(d.mean())
    if n < 2:
        return Interval(m, -math.inf, math.inf, level, n), math.nan, math.nan
    sd = float(d.std(ddof=1))
    if sd == 0.0:  # every seed moved by the same amount: the t statistic is 0 or infinite
        t = 0.0 if m == 0.0 else math.copysign(math.inf, m)
        return Interval(m, m, m, level, n), t, 1.0 if m == 0.0 else 0.0
    se = sd / math.sqrt(n)
    half = student_t_ppf(0.5 + level / 2, n - 1) * se
    t = m / se
    p = min(1.0, 2.0 * student_t_cdf(-abs(t), n - 1))
    return Interval(m, m - half, m + half, level, n), t, p


def _bootstrap_mean(d: np.ndarray, level: float, n_resamples: int, seed: int) -> Interval:
    """Percentile bootstrap of the mean: resample seeds with replacement, take the level's quantiles.

    With few seeds it is narrower than the t interval (it ignores the n - 1 correction), which is
    why the t interval is the primary one; it is reported as a check that does not assume normality.
    """
    m = float(d.mean())
    if d.size < 2:
        return Interval(m, -math.inf, math.inf, level, d.size)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(axis=1)
    low, high = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(m, float(low), float(high), level, d.size)


def smallest_sign_flip_p(n: int) -> float:
    """The smallest two-sided p-value the exact sign-flip test can give with ``n`` seeds: 2 / 2^n.

    With 5 seeds it is 1/16 = 0.0625, so the test can never reach 0.05; 6 seeds are the minimum.
    """
    return min(1.0, 2.0 / 2.0**n)


def sign_flip_p(d: Sequence[float], *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                max_exact: int = MAX_EXACT) -> tuple[float, bool]:
    """Two-sided sign-flip permutation p-value of "the differences d are symmetric around 0".

    Statistic |mean(d)|. Under the null every sign pattern is equally likely, so the p-value is the
    share of the 2^n patterns whose |mean| is at least the observed one (exact when 2^n <= max_exact),
    or (1 + hits) / (1 + n_resamples) over random patterns (a valid Monte-Carlo p-value).
    Returns (p, exact).
    """
    x = _as_values(d, "differences")
    n = x.size
    observed = abs(float(x.mean()))
    if 2**n <= max_exact:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
        signs, exact = 1 - 2 * bits, True
    else:
        signs, exact = np.random.default_rng(seed).choice([-1, 1], size=(n_resamples, n)), False
    stats = np.abs(signs @ x) / n
    hits = int((stats >= observed - _TIE_RTOL * max(observed, float(np.abs(x).max()))).sum())
    return (hits / len(signs), True) if exact else ((1 + hits) / (1 + n_resamples), False)


def paired_compare(a: Sequence[float], b: Sequence[float], *, level: float = 0.95,
                   n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, max_exact: int = MAX_EXACT) -> PairedComparison:
    """Compare setting a with setting b, where a[i] and b[i] come from the same distillation seed.

    Deterministic given ``seed`` (it drives the bootstrap and, for many seeds, the sign flips).
    """
    _check_level(level)
    x, y = _as_values(a, "a"), _as_values(b, "b")
    if x.size != y.size:
        raise StatsInputError(f"a paired comparison needs one value per seed on both sides, got {x.size} and {y.size}.")
    d = x - y
    diff, t, p = _paired_t(d, level)
    perm_p, exact = sign_flip_p(d, n_resamples=n_resamples, seed=seed, max_exact=max_exact)
    return PairedComparison(
        n=d.size, mean_a=float(x.mean()), mean_b=float(y.mean()), diff=diff, t_stat=t, p_value=p,
        bootstrap=_bootstrap_mean(d, level, n_resamples, seed), permutation_p=perm_p, permutation_exact=exact,
    )


# ----------------------------------------------------------------------------------------------
# One-at-a-time sweeps: does this parameter matter?
# ----------------------------------------------------------------------------------------------
def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control, no independence assumption)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = p.size
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


@dataclass(frozen=True)
class SettingEffect:
    """One non-default setting of a sweep, paired with the default on the same seeds."""

    setting: Hashable
    diff: Interval  # setting - default: paired t interval at the sweep's (possibly adjusted) level
    p_value: float  # paired t, unadjusted
    p_holm: float  # Holm-adjusted over the sweep's non-default settings

    @property
    def detectable(self) -> bool:
        return not self.diff.covers(0.0)


@dataclass(frozen=True)
class SweepEffects:
    """A one-at-a-time sweep of one parameter: effects vs the default and a test of "no effect"."""

    default: Hashable
    n_seeds: int
    level: float  # the family-wise level asked for
    interval_level: float  # the level of each setting's interval (level, or Bonferroni-adjusted)
    effects: list[SettingEffect]
    f_stat: float  # repeated-measures F: between-setting / residual mean square (seed effects removed)
    p_no_effect: float  # within-seed permutation p-value of "every setting gives the same accuracy"
    exact: bool  # True: permutation distribution enumerated; False: Monte Carlo

    @property
    def detectable(self) -> bool:
        """True when the no-effect test rejects at 1 - level."""
        return self.p_no_effect < 1.0 - self.level


def _between_ss(y: np.ndarray) -> np.ndarray:
    """Between-setting sum of squares n * sum_k (mean_k - grand)^2 of [..., n_seeds, k_settings] arrays."""
    col = y.mean(axis=-2)
    return y.shape[-2] * ((col - col.mean(axis=-1, keepdims=True)) ** 2).sum(axis=-1)


def _rm_f(y: np.ndarray) -> float:
    """Repeated-measures ANOVA F for an [n_seeds, k] table (seeds are blocks)."""
    n, k = y.shape
    ss_set = float(_between_ss(y))
    ss_within = float(((y - y.mean(axis=1, keepdims=True)) ** 2).sum())
    ss_res = max(0.0, ss_within - ss_set)
    if ss_res == 0.0:
        return 0.0 if ss_set == 0.0 else math.inf
    return (ss_set / (k - 1)) / (ss_res / ((k - 1) * (n - 1)))


def _within_seed_permutation_p(y: np.ndarray, n_resamples: int, seed: int, max_exact: int) -> tuple[float, bool]:
    """P-value of "setting labels are exchangeable within each seed" (repeated-measures null).

    Each seed's row is permuted independently; row totals, and so the within-seed sum of squares, do
    not change, which makes the between-setting sum of squares an equivalent statistic to F. Permuting
    every row by the same permutation only relabels settings, so row 0 stays fixed in the exact
    enumeration of the other (k!)^(n-1) arrangements.
    """
    n, k = y.shape
    observed = float(_between_ss(y))
    n_arrangements = math.factorial(k) ** (n - 1)
    if n_arrangements <= max_exact:
        perms = np.array(list(itertools.permutations(range(k))))  # [k!, k]
        rows = np.indices((len(perms),) * (n - 1)).reshape(n - 1, -1).T  # every choice for rows 1..n-1
        idx = perms[np.concatenate([np.zeros((len(rows), 1), dtype=int), rows], axis=1)]  # [A, n, k]
        exact = True
    else:
        rng = np.random.default_rng(seed)
        idx = np.argsort(rng.random((n_resamples, n, k)), axis=2)
        exact = False
    shuffled = np.take_along_axis(np.broadcast_to(y, idx.shape), idx, axis=2)
    stats = _between_ss(shuffled)
    scale = max(observed, float(((y - y.mean()) ** 2).sum()))
    hits = int((stats >= observed - _TIE_RTOL * scale).sum())
    return (hits / len(idx), True) if exact else ((1 + hits) / (1 + n_resamples), False)


def sweep_effects(values: Mapping[Hashable, Sequence[float]], default: Hashable, *, level: float = 0.95,
                  adjust: str = "bonferroni", n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                  max_exact: int = MAX_EXACT) -> SweepEffects:
    """Effects of a one-at-a-time sweep: ``values[setting][i]`` is seed i's result under ``setting``.

    Every setting must be measured on the same seeds, in the same order. Each non-default setting gets
    its paired t interval of (setting - default); with ``adjust="bonferroni"`` each interval has level
    1 - (1 - level) / (k - 1), so all k - 1 cover together with probability >= level. ``p_no_effect``
    tests all settings at once without a normality assumption; when several parameters are tested,
    pass their ``p_no_effect`` values through ``holm``.
    """
    _check_level(level)
    if adjust not in ("bonferroni", "none"):
        raise StatsInputError(f"adjust must be 'bonferroni' or 'none', got {adjust!r}.")
    if default not in values:
        raise StatsInputError(f"the default setting {default!r} is not among the sweep's settings {list(values)}.")
    if len(values) < 2:
        raise StatsInputError("a sweep needs at least two settings (the default and one other).")
    labels = list(values)
    columns = [_as_values(values[s], f"values of setting {s!r}") for s in labels]
    if len({c.size for c in columns}) != 1:
        raise StatsInputError(f"every setting needs one value per seed, got {[c.size for c in columns]} values.")
    y = np.stack(columns, axis=1)  # [n_seeds, k]
    n, k = y.shape
    others = [s for s in labels if s != default]
    interval_level = 1.0 - (1.0 - level) / len(others) if adjust == "bonferroni" else level
    base = y[:, labels.index(default)]
    raw = [_paired_t(y[:, labels.index(s)] - base, interval_level) for s in others]
    p_adj = holm([p for _, _, p in raw]) if n >= 2 else [math.nan] * len(raw)
    effects = [SettingEffect(s, iv, p, pa) for s, (iv, _, p), pa in zip(others, raw, p_adj, strict=True)]
    if n < 2:  # one seed: no spread to compare against
        f_stat, p_none, exact = math.nan, math.nan, True
    else:
        f_stat = _rm_f(y)
        p_none, exact = _within_seed_permutation_p(y, n_resamples, seed, max_exact)
    return SweepEffects(default, n, level, interval_level, effects, f_stat, p_none, exact)


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
def format_interval(iv: Interval, digits: int = 2, scale: float = 1.0, unit: str = "", sign: bool = False) -> str:
    """``"mean ± half-width [low, high]"`` (values times ``scale``); with one seed, says there is no interval."""
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    mean = fmt.format(iv.mean * scale)
    if not math.isfinite(iv.half_width):
        return f"{mean}{unit} (n={iv.n}: no interval)"
    lo, hi = f"{iv.low * scale:.{digits}f}", f"{iv.high * scale:.{digits}f}"
    return f"{mean} ± {iv.half_width * scale:.{digits}f}{unit} [{lo}, {hi}]"


def format_difference(iv: Interval, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    """A signed difference with its interval, followed by "no detectable effect" when it covers zero."""
    text = format_interval(iv, digits, scale, unit, sign=True)
    return f"{text}, no detectable effect" if iv.covers(0.0) else text


# ----------------------------------------------------------------------------------------------
# Evaluation-net seeds
# ----------------------------------------------------------------------------------------------
EVAL_NET_BITS = 20  # up to 2^20 evaluation nets per distilled set


def evaluation_seed(distill_seed: int, net_index: int) -> int:
    """The seed of evaluation net ``net_index`` of the set distilled with ``distill_seed``.

    Scheme: ``(distill_seed + 1) * 2^20 + net_index``. The low 20 bits hold the net index and the
    high bits the distillation seed, so distinct (distill_seed, net_index) pairs never share a seed:
    two distilled sets are never evaluated by identically initialised nets or data orders (the old
    ``seed + i`` gave set 0's net 1 and set 1's net 0 the same seed). The + 1 keeps every evaluation
    seed >= 2^20, so none equals a distillation seed below 2^20. Results stay below 2^63.
    """
    for name, value in (("distillation seed", distill_seed), ("evaluation net index", net_index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise StatsInputError(f"the {name} must be an integer, got {value!r}.")
    if not 0 <= net_index < 1 << EVAL_NET_BITS:
        raise StatsInputError(f"the evaluation net index must be in [0, {1 << EVAL_NET_BITS}), got {net_index}.")
    if not 0 <= distill_seed < (1 << (63 - EVAL_NET_BITS)) - 1:
        raise StatsInputError(
            f"the distillation seed must be in [0, {(1 << (63 - EVAL_NET_BITS)) - 1}), got {distill_seed}."
        )
    return ((int(distill_seed) + 1) << EVAL_NET_BITS) | int(net_index)

