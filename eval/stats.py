"""Win / tie / lose counts of a set of judgements, their rates and 95 % Wilson score intervals.

Rates are over the judged comparisons (errors, where the judge gave no answer, are counted apart
and left out). Two win rates are reported as the RPO papers need them: the paper's, wins over all
judged comparisons (a comparison without a verdict is a win for neither side, as the official
code counts it), and wins over the decided ones (wins + losses); and, since several published
values are half-integers over 256, the win rate with ties (and no-verdicts) counted as half a win.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

Z95 = 1.959964  # the standard normal's 97.5 % quantile


def wilson_interval(successes: float, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (sound at 0 %, 100 % and small n, unlike p +- z*se)."""
    if trials == 0:
        return (math.nan, math.nan)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(verdicts: Iterable[str]) -> dict:
    """Counts and rates of verdicts `A` (a win of the evaluated model), `B` (a loss), `tie`, `none`
    (no verdict parsed) and `error`, with Wilson intervals."""
    counts = Counter(verdicts)
    wins, losses, ties, none, errors = (counts[key] for key in ("A", "B", "tie", "none", "error"))
    judged = wins + losses + ties + none
    decided = wins + losses

    def rate(successes: float, trials: int) -> dict:
        low, high = wilson_interval(successes, trials)
        return {"rate": successes / trials if trials else math.nan, "ci95": [low, high]}

    return {
        "comparisons": judged + errors,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "no_verdict": none,
        "errors": errors,
        "win_rate": rate(wins, judged),
        "tie_rate": rate(ties + none, judged),
        "lose_rate": rate(losses, judged),
        "decided_win_rate": rate(wins, decided),
        "win_rate_ties_half": rate(wins + (ties + none) / 2, judged),  # some published rates are half-integers over 256
        "interval": "Wilson score, 95 %",
    }


def describe(summary: dict) -> str:
    """One line: win rate with its interval and the counts behind it."""

    def percent(entry: dict) -> str:
        if math.isnan(entry["rate"]):
            return "n/a"
        low, high = entry["ci95"]
        return f"{100 * entry['rate']:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"

    counts = f"{summary['wins']} wins, {summary['ties']} ties, {summary['losses']} losses"
    if summary["no_verdict"]:
        counts += f", {summary['no_verdict']} without a verdict"
    if summary["errors"]:
        counts += f", {summary['errors']} errors (not counted)"
    return f"win rate {percent(summary['win_rate'])} ({counts}; over decided {percent(summary['decided_win_rate'])})"
