"""Compare model versions by their feedback: is the candidate better, worse, or not yet known?

Why these statistics:

* **Accuracy** is a proportion (correct / judged), so its 95 % interval is Wilson's score
  interval, which stays inside [0, 1] and keeps its coverage at small n and near 0 or 1, where
  the textbook normal interval fails exactly in the cases a rollout starts from.
* **Macro F1** is not a proportion; its interval is a percentile bootstrap over the confusion
  matrix (multinomial resampling of the cells, a fixed seed so one report always reads the same).
* **The verdict** is a two-sided two-proportion z-test on accuracy (pooled standard error): with
  p < α the candidate is ``better`` or ``worse``; otherwise ``undecided``, together with the n
  judged so far and the n per version a test of the observed rates would need for the given power
  (the standard sample-size formula for two proportions). Accuracy decides, not macro F1: it is the
  quantity the test is exact about, and a rollout needs one rule fixed in advance.

The rates come from the feedback store's confusion matrices, so the cost is O(K²) per version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from predictors.feedback.metrics import macro_f1

ALPHA = 0.05
POWER = 0.8
CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0

_NORMAL = NormalDist()

Verdict = Literal["better", "worse", "undecided"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Interval(_Frozen):
    """A two-sided interval at ``confidence``, computed by ``method``."""

    low: float
    high: float
    confidence: float
    method: str


class VersionStats(_Frozen):
    """Accuracy and macro F1 of one model version's feedback, each with its 95 % interval."""

    version: str
    count: int
    correct: int
    accuracy: float | None
    accuracy_interval: Interval | None
    macro_f1: float | None
    macro_f1_interval: Interval | None


class ProportionTest(_Frozen):
    """The two-proportion z-test of candidate accuracy against baseline accuracy."""

    difference: float | None
    """Candidate accuracy minus baseline accuracy."""
    z: float | None
    p_value: float | None
    alpha: float


class Comparison(_Frozen):
    """The answer of ``GET /v2/models/{name}/feedback/compare``."""

    model_name: str
    baseline: VersionStats
    candidate: VersionStats
    versions: list[VersionStats]
    test: ProportionTest
    verdict: Verdict
    n_so_far: int
    """Feedback judged so far for the version with fewer (the test is only as strong as that one)."""
    n_needed: int | None
    """Feedback needed per version for ``power`` at ``alpha`` given the observed rates; None when the rates
    are equal or not yet known (no finite n would separate them)."""
    power: float
    reason: str


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval for a proportion of ``successes`` in ``n`` (n > 0)."""
    if n <= 0:
        raise ValueError("a proportion needs n > 0")
    z = _NORMAL.inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes the bound is exactly 0 or 1; floating point would leave a trace of it.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """z and two-sided p of H0: p1 == p2, pooled standard error. (0, 1) when the pooled rate is 0 or 1."""
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (x2 / n2 - x1 / n1) / se
    return z, 2 * (1 - _NORMAL.cdf(abs(z)))


def n_per_group(p1: float, p2: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Samples per group for a two-sided two-proportion test to detect p1 vs p2; None when p1 == p2."""
    if p1 == p2:
        return None
    z_alpha = _NORMAL.inv_cdf(1 - alpha / 2)
    z_beta = _NORMAL.inv_cdf(power)
    mean = (p1 + p2) / 2
    root = z_alpha * math.sqrt(2 * mean * (1 - mean)) + z_beta * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return math.ceil(root * root / (p1 - p2) ** 2)


def bootstrap_macro_f1(matrix: np.ndarray, confidence: float = CONFIDENCE, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of macro F1 (present classes) by resampling the matrix's cells."""
    cm = np.asarray(matrix, dtype=np.int64)
    n = int(cm.sum())
    k = cm.shape[0]
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, cm.ravel() / n, size=samples).reshape(samples, k, k).astype(np.float64)
    tp = np.einsum("sii->si", draws)
    denominator = draws.sum(axis=2) + draws.sum(axis=1)
    present = denominator > 0
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=present)
    scores = f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(scores, [tail, 100 - tail])
    return float(low), float(high)


def version_stats(version: str, matrix: np.ndarray, confidence: float = CONFIDENCE) -> VersionStats:
    """Accuracy and macro F1 with intervals for one version's confusion matrix."""
    cm = np.asarray(matrix, dtype=np.int64)
    n = int(cm.sum())
    correct = int(np.trace(cm))
    if n == 0:
        return VersionStats(version=version, count=0, correct=0, accuracy=None, accuracy_interval=None,
                            macro_f1=None, macro_f1_interval=None)
    low, high = wilson_interval(correct, n, confidence)
    f1_low, f1_high = bootstrap_macro_f1(cm, confidence)
    return VersionStats(
        version=version, count=n, correct=correct, accuracy=correct / n,
        accuracy_interval=Interval(low=low, high=high, confidence=confidence, method="wilson"),
        macro_f1=macro_f1(cm),
        macro_f1_interval=Interval(low=f1_low, high=f1_high, confidence=confidence, method="bootstrap"))


def choose_versions(versions: Sequence[str], served: str | None, baseline: str | None,
                    candidate: str | None) -> tuple[str, str]:
    """(baseline, candidate) from the versions with feedback, oldest first, unless the caller named them.

    The candidate defaults to the version served now (with no feedback yet, the verdict says so),
    else the newest; the baseline to the newest version older than the candidate (after a rollback
    to the oldest, the newest other one).
    """
    if not versions:
        raise LookupError("no feedback recorded for any version of this model yet")
    if candidate is None:
        candidate = served if served else versions[-1]
    if baseline is None:
        older = list(versions[:versions.index(candidate)]) if candidate in versions else list(versions)
        others = older or [v for v in versions if v != candidate]  # a rollback: the candidate is the oldest
        if not others:
            raise LookupError(f"only version {candidate!r} has feedback; a comparison needs a second version "
                              "(name it with ?baseline=)")
        baseline = others[-1]
    if baseline == candidate:
        raise ValueError(f"baseline and candidate are both version {baseline!r}")
    return baseline, candidate


def compare(model_name: str, matrices: dict[str, np.ndarray], baseline: str, candidate: str, *,
            alpha: float = ALPHA, power: float = POWER) -> Comparison:
    """The comparison report of ``candidate`` against ``baseline`` (see the module docstring)."""
    k = next(iter(matrices.values())).shape[0] if matrices else 0
    empty = np.zeros((k, k), dtype=np.int64)
    stats = {v: version_stats(v, m) for v, m in matrices.items()}
    base = stats.get(baseline) or version_stats(baseline, empty)
    cand = stats.get(candidate) or version_stats(candidate, empty)
    n_so_far = min(base.count, cand.count)
    if base.count == 0 or cand.count == 0:
        missing = baseline if base.count == 0 else candidate
        return Comparison(model_name=model_name, baseline=base, candidate=cand, versions=list(stats.values()),
                          test=ProportionTest(difference=None, z=None, p_value=None, alpha=alpha),
                          verdict="undecided", n_so_far=n_so_far, n_needed=None, power=power,
                          reason=f"no feedback yet for version {missing!r}")
    assert base.accuracy is not None and cand.accuracy is not None
    z, p = two_proportion_z(base.correct, base.count, cand.correct, cand.count)
    difference = cand.accuracy - base.accuracy
    needed = n_per_group(base.accuracy, cand.accuracy, alpha, power)
    if p < alpha:
        verdict: Verdict = "better" if difference > 0 else "worse"
        reason = (f"accuracy {cand.accuracy:.3f} against {base.accuracy:.3f}: p = {p:.2g} < {alpha} "
                  "(two-proportion z-test)")
    else:
        verdict = "undecided"
        if needed is None:
            reason = f"equal accuracy so far (p = {p:.2g}); no sample size would separate equal rates"
        else:
            reason = (f"p = {p:.2g} >= {alpha} with n = {n_so_far}; about {needed} per version would detect the "
                      f"observed difference with {power:.0%} power")
    return Comparison(model_name=model_name, baseline=base, candidate=cand, versions=list(stats.values()),
                      test=ProportionTest(difference=difference, z=z, p_value=p, alpha=alpha), verdict=verdict,
                      n_so_far=n_so_far, n_needed=needed, power=power, reason=reason)
