"""The accuracy vs cloud-rate trade-off: routing under a cap, curves, PGR, APGR and CPT.

With the device-only accuracy d and the cloud-only accuracy c (RouteLLM's weak and strong points):

    PGR(a)   = (a - d) / (c - d)                 performance gap recovered by accuracy a
    APGR     = integral over cloud rate r in [0, 1] of PGR(acc(r)) dr   (trapezoids, endpoints (0, d), (1, c))
    CPT(x %) = smallest cloud rate r with PGR(acc(r)) >= x / 100       (linear interpolation)

`paired_bootstrap` gives the interval of a difference between two methods on the same prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def pgr(accuracy: float, device: float, cloud: float) -> float:
    """Share of the device-to-cloud accuracy gap closed by `accuracy` (nan when there is no gap)."""
    gap = cloud - device
    return (accuracy - device) / gap if abs(gap) > 1e-12 else math.nan


def _with_endpoints(
    points: Sequence[tuple[float, float]], device: float, cloud: float
) -> list[tuple[float, float]]:
    inner = sorted((r, a) for r, a in points if 0.0 < r < 1.0)
    return [(0.0, device), *inner, (1.0, cloud)]


def apgr(points: Sequence[tuple[float, float]], device: float, cloud: float) -> float:
    """Average PGR over cloud rates 0..1 of a curve of (cloud rate, accuracy) points."""
    curve = _with_endpoints(points, device, cloud)
    area = 0.0
    for (r0, a0), (r1, a1) in zip(curve, curve[1:], strict=False):
        area += (r1 - r0) * (pgr(a0, device, cloud) + pgr(a1, device, cloud)) / 2
    return area


def cpt(points: Sequence[tuple[float, float]], device: float, cloud: float, target: float) -> float:
    """Cloud rate needed to reach PGR `target` (e.g. 0.5 for CPT(50%)) along the curve."""
    curve = _with_endpoints(points, device, cloud)
    for (r0, a0), (r1, a1) in zip(curve, curve[1:], strict=False):
        p0, p1 = pgr(a0, device, cloud), pgr(a1, device, cloud)
        if p0 >= target:
            return r0
        if p1 >= target:
            return r0 + (r1 - r0) * (target - p0) / (p1 - p0)
    return 1.0


def route(
    local: Sequence[dict[str, Any]],
    cloud_correct: Sequence[bool],
    to_cloud: Sequence[bool],
    cap: int | None,
) -> list[dict[str, Any]]:
    """Final infos when a router sends `to_cloud[i]` prompts to the cloud, in prompt order, at most `cap`
    of them (first come first served); a refused prompt keeps the device's local answer."""
    out, calls = [], 0
    for info, cloud_ok, wants in zip(local, cloud_correct, to_cloud, strict=True):
        admitted = bool(wants) and (cap is None or calls < cap)
        calls += admitted
        correct = bool(cloud_ok) if admitted else bool(info["local_correct"])
        if admitted:
            outcome = "cloud_correct" if cloud_ok else "wrong"
        elif wants:
            outcome = "over_budget"
        else:
            outcome = "local_correct" if info["local_correct"] else "wrong"
        out.append(
            {
                **info,
                "called_help": bool(wants),
                "called_cloud": admitted,
                "cloud_correct": bool(cloud_ok) if admitted else None,
                "correct": correct,
                "outcome": outcome,
            }
        )
    return out


def accuracy_at(
    local: Sequence[dict[str, Any]], cloud_correct: Sequence[bool], to_cloud: Sequence[bool]
) -> tuple[float, float]:
    """(cloud rate, accuracy) of a routing without a cap."""
    infos = route(local, cloud_correct, to_cloud, cap=None)
    n = max(len(infos), 1)
    return sum(i["called_cloud"] for i in infos) / n, sum(i["correct"] for i in infos) / n


def threshold_curve(
    local: Sequence[dict[str, Any]],
    cloud_correct: Sequence[bool],
    scores: Sequence[float],
    rates: Sequence[float],
) -> list[tuple[float, float]]:
    """Router curve: for each target rate, send the prompts with the highest `scores` (need for help)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    points = []
    for rate in rates:
        chosen = set(order[: round(rate * len(order))])
        points.append(accuracy_at(local, cloud_correct, [i in chosen for i in range(len(order))]))
    return points


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], samples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of a - b over paired items (prompts) and its bootstrap `level` interval: items are resampled
    with replacement `samples` times, each time keeping the pairs together."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(diff) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(len(diff), size=(samples, len(diff)))].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(diff.mean()), float(low), float(high)


def calibrated_threshold(scores: np.ndarray, share: float) -> float:
    """The score above which a `share` of these prompts lie (a router sends those to the cloud)."""
    return float(np.quantile(scores, 1.0 - share)) if len(scores) else 0.0


def roc_auc(scores: np.ndarray, fails: np.ndarray) -> float:
    """ROC AUC of `scores` for predicting `fails` (ties count one half); nan when one class is missing."""
    from sklearn.metrics import roc_auc_score

    fails = np.asarray(fails, dtype=bool)
    if fails.all() or not fails.any():
        return float("nan")
    return float(roc_auc_score(fails, np.asarray(scores, dtype=np.float64)))
