"""The fidelity study's statistics: cells (mean and sample std over seeds), paired differences by seed with 95%
t-intervals and two-sided paired t-test p-values, Holm's correction over the comparisons of a pair."""
from __future__ import annotations

import math
import statistics

from scipy import stats

# (a, b): a - b by seed, per pair; Holm's correction runs over these, within a pair
COMPARISONS = (("rsd", "ofa"), ("rsd", "kd"), ("ofa", "kd"), ("kd", "scratch"), ("dkd", "scratch"),
               ("ofa", "scratch"), ("rsd", "scratch"))


def cell(values):
    """(mean, sample std (n - 1; nan for one value), n)."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def paired_difference(a_by_seed, b_by_seed):
    """a - b over the seeds both have: mean, its 95% t-interval, the two-sided paired t-test's p, n."""
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    diffs = [a_by_seed[s] - b_by_seed[s] for s in seeds]
    n = len(diffs)
    mean = statistics.mean(diffs) if diffs else math.nan
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "p": math.nan, "n": n}
    sd = statistics.stdev(diffs)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = 2 * stats.t.sf(abs(mean / (sd / math.sqrt(n))), n - 1)
    return {"mean": mean, "low": mean - half, "high": mean + half, "p": float(p), "n": n}


def holm(p_values):
    """Holm's step-down adjusted p-values, in the order given (nan entries are left out and stay nan)."""
    order = sorted((p, k) for k, p in enumerate(p_values) if not math.isnan(p))
    m, adjusted, running = len(order), [math.nan] * len(p_values), 0.0
    for rank, (p, k) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[k] = running
    return adjusted


def comparisons(by_seed, wanted=COMPARISONS):
    """by_seed: {method: {seed: top-1}} of one pair (or one table's arms). The `wanted` (a, b) whose methods both
    ran, each a dict with the paired difference and its Holm-adjusted p (over the comparisons found)."""
    found = [(a, b) for a, b in wanted if a in by_seed and b in by_seed]
    rows = [dict(a=a, b=b, **paired_difference(by_seed[a], by_seed[b])) for a, b in found]
    for row, adjusted in zip(rows, holm([row["p"] for row in rows])):
        row["p_holm"] = adjusted
    return rows
