"""The studies' statistics: 95% intervals, Welch's and the paired t-test, Holm's correction.

A comparison of two methods is over their seeds' test averages (5 each). Welch's test does not
assume equal variances, which matters here: a method that sometimes stays on the plateau spreads
several times wider than one that never does. The paired test pairs runs by seed, which fixes the
data order (not the initialisation, whose tensors differ in shape between methods). Holm's
step-down correction keeps the chance of any false "differs" among a family of planned comparisons
at 5%. These replace nothing: the earlier rough rule (a gap above twice the standard error of the
difference, about p < 0.1 with 5 seeds and no correction) is still printed beside, labelled.
"""
import math
import statistics
import warnings

from scipy import stats

LEVEL = 0.95


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95% t-interval (0 with one value)."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, stats.t.ppf(0.5 + LEVEL / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's t-test of mean(a) - mean(b): the difference, its 95% interval (Welch–Satterthwaite
    degrees of freedom) and the two-sided p-value; p is nan when neither has any spread."""
    diff = statistics.mean(a) - statistics.mean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "ci": [diff, diff], "p": math.nan, "test": "welch"}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + LEVEL / 2, df) * se
    with warnings.catch_warnings():  # one cell without spread (every seed at the same answers) is
        warnings.simplefilter("ignore", RuntimeWarning)  # a valid test; scipy warns of precision
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return {"diff": diff, "ci": [diff - half, diff + half], "p": p, "test": "welch"}


def paired(a: list[float], b: list[float]) -> dict:
    """The paired t-test of a - b, runs paired by position (the seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired test: {len(a)} and {len(b)} values")
    d = [x - y for x, y in zip(a, b)]
    m, half = mean_ci(d)
    p = float(stats.ttest_rel(a, b).pvalue) if statistics.stdev(d) > 0 else math.nan
    return {"diff": m, "ci": [m - half, m + half], "p": p, "test": "paired"}


def holm(pvalues: list[float], family: int | None = None) -> list[float]:
    """Holm's adjusted p-values, in the order given (nan stays nan and is not counted). family: the
    number of planned comparisons when only some are known yet; the unknown ones are counted as if
    their p-values were larger, which can only make these adjusted values larger than the final."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = max(family or 0, len(order))
    adjusted, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def noise_rule(a: list[float], b: list[float]) -> bool:
    """The earlier rough rule: True when the gap is at most twice the standard error of the
    difference (kept for comparison with the earlier reports; not a test). Two cells of identical
    values, no gap and no spread, are within noise."""
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return abs(statistics.mean(a) - statistics.mean(b)) <= 2 * se


def verdict(comparison: dict, alpha: float = 0.05) -> str:
    """'higher' / 'lower' when Holm's p is below alpha, else 'no difference shown'."""
    p = comparison.get("p_holm", comparison["p"])
    if math.isnan(p) or p >= alpha:
        return "no difference shown"
    return "higher" if comparison["diff"] > 0 else "lower"


def compare(a: list[float], b: list[float]) -> dict:
    """Welch's test of a against b, the paired test and the noise rule beside it; {} if either has
    fewer than 2 values."""
    if min(len(a), len(b)) < 2:
        return {}
    out = {**welch(a, b), "noise_rule": "within noise" if noise_rule(a, b) else "beyond noise"}
    if len(a) == len(b):
        out["paired"] = paired(a, b)
    return out


def adjust(rows: list[dict], family: int | None = None) -> list[dict]:
    """Holm over the rows that hold a test (compare's), in place: p_holm and the verdict."""
    known = [r for r in rows if "p" in r]
    for r, p in zip(known, holm([r["p"] for r in known], family)):
        r["p_holm"], r["verdict"] = p, None
        r["verdict"] = verdict(r)
    return rows


def fmt_p(p: float | None) -> str:
    return "n/a" if p is None or math.isnan(p) else f"{p:.3f}" if p >= 0.001 else "<0.001"


def table(rows: list[dict], label=lambda r: f"{r['a']} vs {r['b']}") -> list[str]:
    """Markdown rows: comparison, difference and its 95% interval, p, Holm's p, the verdict, the
    paired test, the noise rule."""
    lines = ["| comparison | difference [95%] | p (Welch) | p (Holm) | verdict | paired: "
             "difference [95%], p | noise rule |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "p" not in r:
            lines.append(f"| {label(r)} | not enough seeds |  |  |  |  |  |")
            continue
        pair = r.get("paired")
        paired_cell = (f"{pair['diff']:+.3f} [{pair['ci'][0]:+.3f}, {pair['ci'][1]:+.3f}], "
                       f"{fmt_p(pair['p'])}" if pair else "—")
        lines.append(f"| {label(r)} | {r['diff']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | "
                     f"{fmt_p(r['p'])} | {fmt_p(r['p_holm'])} | {r['verdict']} | {paired_cell} | "
                     f"{r['noise_rule']} |")
    return lines
