"""The statistics behind a study's verdicts: a pooled noise estimate, Student-t intervals, and the tests a
claim can make (A beats B, A matches or beats B within a margin, a contrast of four cells).

Why pooled: a cell of n seeds has an n - 1 degree-of-freedom standard deviation; with 2 seeds that is
one degree of freedom, and "beyond 2 standard errors" is then far from a 5% test. Every cell of a
study trains the same way on the same data with other seeds, so one noise level, pooled over all cells
(degrees of freedom = sum of n - 1), estimates the seed-to-seed spread much better than any one cell.
The Student-t critical value for those degrees of freedom makes each interval a real 95% interval.

Pure Python (no torch, no scipy), so that reports need neither.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LEVEL = 0.95          # the confidence of every interval; verdicts are 5% two-sided tests
POWER = 0.80          # the power at which the smallest detectable effect is stated
MARGIN_POINTS = 1.0   # default non-inferiority margin of "matches or beats" claims, in accuracy points

HOLDS, FAILS, UNDETECTED, UNMEASURED = "holds", "does not hold", "no difference detected", "not measured"
# "A matches or beats B" when A is detectably worse, but perhaps by less than the margin: neither shown nor refuted
WORSE = "worse, within the margin not excluded"


@dataclass(frozen=True)
class Stats:
    mean: float
    std: float | None   # sample standard deviation; None for a single value
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
        return cls(mean, std, n)


@dataclass(frozen=True)
class Noise:
    """The seed-to-seed standard deviation pooled over a study's cells, and its degrees of freedom."""
    sd: float
    df: int

    @classmethod
    def pooled(cls, cells: list[Stats]) -> Noise | None:
        """None when no cell has two or more seeds (the noise is then unknown)."""
        df = sum(s.n - 1 for s in cells if s.n > 1)
        if df == 0:
            return None
        return cls(math.sqrt(sum((s.n - 1) * s.std ** 2 for s in cells if s.n > 1) / df), df)


# --- Student's t distribution (integer degrees of freedom, exact) ----------------------------------

def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer df, by the finite series of Abramowitz & Stegun 26.7.3-4."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2.4/(3.5) cos^4 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:       # even: sin (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ...)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    return 0.5 + math.copysign(a / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p (bisection on t_cdf; 1e-10 absolute)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def critical(df: int, level: float = LEVEL) -> float:
    return t_quantile(1 - (1 - level) / 2, df)


def detectable(se: float, df: int, level: float = LEVEL, power: float = POWER) -> float:
    """The smallest true difference a two-sided test at `level` finds with probability `power`
    (the usual t approximation: (t_crit + t_power) x se)."""
    return (critical(df, level) + t_quantile(power, df)) * se


def expected_max_of_normals(k: int) -> float:
    """E[max of k independent standard normals], by numerical integration: the upward bias, in noise
    units, of the best of k cells that are truly equal (0.56 for 2, 0.85 for 3, 1.03 for 4)."""
    if k <= 1:
        return 0.0
    step, total, x = 1e-3, 0.0, -8.0
    while x < 8.0:  # E[max] = integral of x k phi(x) Phi(x)^(k-1)
        phi = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        total += x * k * phi * (0.5 * (1 + math.erf(x / math.sqrt(2)))) ** (k - 1) * step
        x += step
    return total


# --- tests -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """A difference (or contrast) of cell means with its standard error and 95% interval."""
    diff: float
    se: float | None            # None: noise unknown (no cell of the study has two seeds)
    df: int | None
    lo: float
    hi: float
    detectable: float | None    # the smallest true effect found with 80% power at this n

    def as_dict(self) -> dict:
        return {"diff": self.diff, "se": self.se, "df": self.df, "ci95": [_finite(self.lo), _finite(self.hi)],
                "detectable": self.detectable}


def contrast(terms: list[tuple[float, Stats]], noise: Noise | None, level: float = LEVEL) -> Interval:
    """sum(w x mean) over cells, its standard error under the pooled noise, and its interval."""
    diff = sum(w * s.mean for w, s in terms)
    if noise is None:
        return Interval(diff, None, None, -math.inf, math.inf, None)
    se = noise.sd * math.sqrt(sum(w * w / s.n for w, s in terms))
    half = critical(noise.df, level) * se
    return Interval(diff, se, noise.df, diff - half, diff + half, detectable(se, noise.df, level))


def difference(a: Stats, b: Stats, noise: Noise | None, level: float = LEVEL) -> Interval:
    return contrast([(1.0, a), (-1.0, b)], noise, level)


def superiority(iv: Interval) -> str:
    """"A beats B": holds when the interval lies above 0, does not hold when it lies below 0."""
    if iv.lo > 0:
        return HOLDS
    if iv.hi < 0:
        return FAILS
    return UNDETECTED


def non_inferiority(iv: Interval, margin: float) -> str:
    """"A matches or beats B", a non-inferiority test: holds only when the interval lies above -margin (A is
    at most `margin` worse, at 95%); does not hold when it lies below -margin (A is worse by more than the
    margin); when it lies below 0 but reaches past -margin, A is detectably worse by an amount the study
    cannot place on either side of the margin (WORSE); else no difference was detected, which is not a
    match."""
    if iv.lo > -margin:
        return HOLDS
    if iv.hi < -margin:
        return FAILS
    return WORSE if iv.hi < 0 else UNDETECTED


def every(verdicts: list[str]) -> str:
    """A claim about every comparison: any failure fails it, all must hold for it to hold; otherwise
    undecided, and WORSE where a comparison found A worse."""
    if not verdicts:
        return UNMEASURED
    if FAILS in verdicts:
        return FAILS
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return WORSE if WORSE in verdicts else UNDETECTED


def some(verdicts: list[str]) -> str:
    """An existential claim: one comparison that holds is enough; it fails only if all fail."""
    if not verdicts:
        return UNMEASURED
    if HOLDS in verdicts:
        return HOLDS
    if all(v == FAILS for v in verdicts):
        return FAILS
    return WORSE if all(v in (FAILS, WORSE) for v in verdicts) else UNDETECTED


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x  # JSON has no infinity: None where the noise is unknown
