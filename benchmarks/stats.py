"""Statistics used by the benchmarks: latency percentiles, bootstrap interval, McNemar's test,
Poisson arrivals and adapter popularity distributions. Pure functions on plain inputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max/mean of latencies in ms (numpy's linear-interpolation percentiles)."""
    if len(latencies_ms) == 0:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    a = np.asarray(latencies_ms, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "max_ms": float(a.max()),
        "mean_ms": float(a.mean()),
    }


def bootstrap_ci(
    correct: Sequence[int | bool], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of 0/1 outcomes (accuracy).

    Hand-written rather than scipy.stats.bootstrap because resampling a 0/1 vector reduces to
    a binomial draw per resample, which is exact and ~100x faster for 7,600 items.
    """
    c = np.asarray(correct, dtype=float)
    n = len(c)
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one outcome")
    rng = np.random.default_rng(seed)
    # Resampling n items with replacement from k ones and n-k zeros: count of ones ~ Binomial(n, k/n).
    means = rng.binomial(n, c.mean(), size=n_boot) / n
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def mcnemar(a_correct: Sequence[int | bool], b_correct: Sequence[int | bool]) -> dict[str, float | int | str]:
    """McNemar's test on paired correctness of two classifiers on the same items.

    b = items A got right and B wrong, c = the reverse. Reports the exact two-sided binomial
    p-value (used for the decision) and the chi-square statistic with continuity correction.
    """
    from scipy.stats import binomtest, chi2

    a = np.asarray(a_correct, dtype=bool)
    bb = np.asarray(b_correct, dtype=bool)
    if a.shape != bb.shape:
        raise ValueError(f"mcnemar: outcome vectors differ in length ({a.shape} vs {bb.shape})")
    b = int((a & ~bb).sum())
    c = int((~a & bb).sum())
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p_exact": 1.0, "chi2_cc": 0.0, "p_chi2_cc": 1.0, "method": "exact binomial"}
    p_exact = float(binomtest(min(b, c), n, 0.5).pvalue)
    stat = (abs(b - c) - 1) ** 2 / n
    return {
        "b": b,
        "c": c,
        "p_exact": p_exact,
        "chi2_cc": float(stat),
        "p_chi2_cc": float(chi2.sf(stat, 1)),
        "method": "exact binomial",
    }


def poisson_arrivals(rate_per_s: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s from start) of a Poisson process of `rate_per_s` over `duration_s`."""
    if rate_per_s <= 0:
        raise ValueError(f"rate must be > 0 req/s, got {rate_per_s}")
    # Draw a generous batch of exponential gaps; top up in the rare case it falls short.
    times: list[np.ndarray] = []
    t = 0.0
    while t < duration_s:
        gaps = rng.exponential(1.0 / rate_per_s, size=max(16, int(rate_per_s * duration_s * 1.2) + 16))
        chunk = t + np.cumsum(gaps)
        times.append(chunk)
        t = float(chunk[-1])
    all_t = np.concatenate(times)
    return all_t[all_t < duration_s]


def adapter_weights(n: int, dist: str) -> np.ndarray:
    """Selection probabilities over `n` models: 'uniform' or 'zipf:S' (p_k ∝ 1/k^S, k = 1..n)."""
    if n <= 0:
        raise ValueError("need at least one model")
    if dist == "uniform":
        return np.full(n, 1.0 / n)
    if dist.startswith("zipf:"):
        try:
            s = float(dist.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad --adapter-dist {dist!r}; use zipf:S with a number S, e.g. zipf:1.1") from None
        w = 1.0 / np.arange(1, n + 1) ** s
        return w / w.sum()
    raise ValueError(f"unknown --adapter-dist {dist!r}; use 'uniform' or 'zipf:S'")
