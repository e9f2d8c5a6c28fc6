"""Honest comparisons over seeds: mean ± std, paired t-intervals, and a verdict that admits ties.

Every method runs on the same seeds (same LoRA and head initialisation, same client SGD order),
so method ``m`` and FedIT form pairs ``(x_m,s, x_fedit,s)``; the paired differences
``d_s = x_m,s − x_fedit,s`` remove the part of the seed-to-seed variation the methods share.

* :func:`paired` — the mean of ``d`` and its two-sided Student-t interval,
  ``mean(d) ± t_{1−α/2, n−1} · sd(d) / √n`` (``sd`` with ``n − 1``). With ``n = 3`` seeds,
  ``t_{0.975, 2} = 4.30``: the interval is wide, as it should be.
* :func:`verdict` — the method with the highest mean is declared better only if its paired
  interval against *every* other method lies above 0, each at the Bonferroni-adjusted level
  ``1 − α / (M − 1)`` (M methods). Otherwise: "no significant difference".

A difference that is the same on every seed has zero variance and a zero-width interval; it is
reported as such ("constant") and never counted as significant.

Differences below :data:`TIE_TOL` percentage points (floating-point noise of averaging the
same counts in another order, e.g. 68.1987000928505 vs 68.19870009285052) count as 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

__all__ = ["TIE_TOL", "Paired", "Summary", "Verdict", "paired", "summarize", "verdict"]

TIE_TOL = 1e-9
"""Differences smaller than this (in accuracy points) are exact ties."""


class Summary(NamedTuple):
    """Mean and sample standard deviation (``n − 1``; 0 for one seed) of one method's runs."""

    mean: float
    std: float
    n: int


class Paired(NamedTuple):
    """``mean(a − b)`` over paired seeds and its t-interval ``[low, high]`` at ``level``.

    ``low``/``high`` are NaN for fewer than two seeds (no interval exists).
    """

    mean: float
    low: float
    high: float
    n: int
    level: float

    @property
    def constant(self) -> bool:
        """The same non-zero difference on every seed: zero variance, a zero-width interval.

        Accuracies are counts, so with two or three seeds this happens by chance (one test
        image more on each seed). The t-interval is then degenerate, not evidence.
        """
        return self.n >= 2 and self.low == self.high and self.mean != 0.0

    @property
    def significant(self) -> bool:
        """The interval has positive width and excludes 0 (``constant`` differences never are)."""
        return self.low < self.high and (self.low > 0.0 or self.high < 0.0)

    @property
    def tie(self) -> bool:
        """Identical on every seed."""
        return self.mean == 0.0 and self.low == 0.0 and self.high == 0.0


class Verdict(NamedTuple):
    """``best`` when one method beats every other beyond the interval, else ``None``.

    ``leader``: the highest mean; ``not_separated``: the methods whose adjusted interval
    against the leader contains 0; ``level``: the adjusted per-comparison level; ``text``.
    """

    best: str | None
    leader: str
    not_separated: tuple[str, ...]
    level: float
    text: str


def summarize(xs: Sequence[float]) -> Summary:
    """Mean and sample standard deviation of ``xs``."""
    n = len(xs)
    if n == 0:
        raise ValueError("no values to summarise")
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return Summary(mean, std, n)


def _t_quantile(q: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def paired(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> Paired:
    """Paired difference ``a − b`` over the same seeds, with its two-sided t-interval."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    d = [0.0 if abs(v) < TIE_TOL else v for v in d]
    s = summarize(d)
    if s.n < 2:
        return Paired(s.mean, math.nan, math.nan, s.n, level)
    if s.std < TIE_TOL:  # the same difference on every seed, up to float rounding
        return Paired(s.mean, s.mean, s.mean, s.n, level)
    half = _t_quantile(0.5 + level / 2, s.n - 1) * s.std / math.sqrt(s.n)
    return Paired(s.mean, s.mean - half, s.mean + half, s.n, level)


def verdict(runs: Mapping[str, Sequence[float]], *, level: float = 0.95) -> Verdict:
    """Whether one method beats every other beyond its (Bonferroni-adjusted) paired interval."""
    names = list(runs)
    means = {m: summarize(runs[m]).mean for m in names}
    leader = max(names, key=lambda m: means[m])
    others = [m for m in names if m != leader]
    adj = 1.0 - (1.0 - level) / max(len(others), 1)
    n = len(runs[leader])
    if n < 2:
        return Verdict(
            None, leader, tuple(others), adj, "one seed: no interval, so no method is declared best"
        )
    tied = []
    for m in others:
        pr = paired(runs[leader], runs[m], level=adj)
        if not (pr.significant and pr.low > 0.0):
            tied.append(m)
    if not others:
        return Verdict(leader, leader, (), adj, f"{leader} is the only method")
    if not tied:
        text = (
            f"{leader} beats every other method beyond its paired {100 * adj:.2f}% t-interval "
            f"over {n} seeds (Bonferroni over {len(others)} comparisons)"
        )
        return Verdict(leader, leader, (), adj, text)
    text = (
        f"no significant difference: the highest mean, {leader}, is not separated from "
        f"{', '.join(tied)} by its paired {100 * adj:.2f}% t-interval over {n} seeds "
        f"(Bonferroni over {len(others)} comparisons)"
    )
    return Verdict(None, leader, tuple(tied), adj, text)
