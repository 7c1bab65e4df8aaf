"""Calibration of binary pixel probabilities: ECE, MCE, Brier score, reliability tables.

Binary convention: a pixel's score is its predicted probability of the *positive* class,
``p = p(y = 1)``, and each bin compares the mean ``p`` of its pixels with the observed
frequency of positives among them (a "reliability diagram for p(y=1)", as
``sklearn.calibration.calibration_curve`` draws it). This differs from the multi-class
"confidence" convention (``max(p, 1 - p)`` against accuracy), which folds both halves of the
range onto [0.5, 1]; for segmentation, where most pixels are confident background, the
p(y=1) view shows the informative high-p end instead of burying it.

- ECE: ``sum_b (n_b / N) |mean_p_b - freq_b|`` over non-empty bins;
- MCE: ``max_b |mean_p_b - freq_b|`` over non-empty bins;
- Brier: ``mean (p - y)^2`` (over all pixels, no binning).

Bins: equal width (``"uniform"``, default 15 bins) or equal mass (``"quantile"``: edges at
quantiles of ``p``). A pixel belongs to bin ``b`` when ``edges[b] < p <= edges[b + 1]``
(``p = 0`` goes to the first bin), i.e. ``searchsorted(edges[1:-1], p, side="left")``,
exactly as sklearn assigns bins, so tables agree with ``calibration_curve`` row for row.

A 3D volume is processed plane by plane with :class:`CalibrationAccumulator` (fixed edges;
per-bin count, sum of p and sum of y, plus the Brier sum), whose tables and scores are exact
for the whole volume. Equal-mass bins need the quantiles first: take them from a seeded
subsample with :func:`bin_edges` (``max_pixels``) and stream with those edges; bins are then
only approximately equal in mass, but every statistic of them is exact. The one-shot
functions take ``max_pixels`` too, to score a seeded random subsample of huge inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from microseg.errors import MicrosegError, ShapeMismatchError

logger = logging.getLogger(__name__)

Strategy = Literal["uniform", "quantile"]

#: Probabilities may stray this far outside [0, 1] from rounding; farther is an error.
RANGE_TOL = 1e-6


def _prob_target(
    prob: np.ndarray, target: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Flattened probabilities (float) and targets (bool), inside ``mask``; validated."""
    prob = np.asarray(prob)
    target = np.asarray(target)
    if prob.shape != target.shape:
        raise ShapeMismatchError(
            f"probabilities and target must have one shape; found {prob.shape} and {target.shape}"
        )
    if not np.issubdtype(prob.dtype, np.floating):
        prob = prob.astype(np.float64)
    if target.dtype != bool:
        t = target != 0
        if target.size and not np.all(target[t] == 1):
            raise MicrosegError("target must be binary (bool or 0/1)")
        target = t
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != prob.shape:
            raise ShapeMismatchError(
                f"mask must have the probabilities' shape {prob.shape}; found {mask.shape}"
            )
        prob, target = prob[mask], target[mask]
    prob, target = prob.ravel(), target.ravel()
    if prob.size:
        lo, hi = float(prob.min()), float(prob.max())
        if not (lo >= -RANGE_TOL and hi <= 1 + RANGE_TOL):
            raise MicrosegError(
                f"probabilities must lie in [0, 1]; found values in [{lo:.4g}, {hi:.4g}]"
            )
    return prob, target


def subsample(*arrays: np.ndarray, max_pixels: int | None, seed: int = 0) -> tuple[np.ndarray, ...]:
    """The same seeded random subset (without replacement, kept in order) of flat arrays."""
    n = arrays[0].size
    if max_pixels is None or n <= max_pixels:
        return arrays
    idx = np.random.default_rng(seed).choice(n, size=int(max_pixels), replace=False)
    idx.sort()
    return tuple(a.ravel()[idx] for a in arrays)


def bin_edges(
    n_bins: int = 15,
    strategy: Strategy = "uniform",
    prob: np.ndarray | None = None,
    *,
    max_pixels: int | None = 2_000_000,
    seed: int = 0,
) -> np.ndarray:
    """``n_bins + 1`` edges: equal width on [0, 1], or quantiles of ``prob`` (equal mass).

    Quantile edges are computed like sklearn's (``np.percentile`` at ``linspace(0, 100)``),
    from a seeded subsample of at most ``max_pixels`` values; the outer edges are set to 0 and 1
    so every probability falls in a bin.
    """
    if n_bins < 1:
        raise MicrosegError(f"n_bins must be >= 1; found {n_bins}")
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy != "quantile":
        raise MicrosegError(f"strategy must be 'uniform' or 'quantile'; found {strategy!r}")
    if prob is None or np.size(prob) == 0:
        raise MicrosegError("quantile bins need the probabilities to take quantiles of")
    (p,) = subsample(np.asarray(prob, dtype=np.float64).ravel(), max_pixels=max_pixels, seed=seed)
    edges = np.percentile(p, np.linspace(0, 1, n_bins + 1) * 100)
    edges[0], edges[-1] = min(edges[0], 0.0), max(edges[-1], 1.0)
    return edges


@dataclass
class CalibrationAccumulator:
    """Per-bin counts and sums for reliability statistics, fed plane by plane.

    ``edges`` are fixed at construction (default: 15 equal-width bins). :meth:`update` adds one
    plane (or any array) of probabilities and binary targets; :meth:`merge` combines partial
    accumulators with the same edges.
    """

    edges: np.ndarray = field(default_factory=lambda: bin_edges(15))
    count: np.ndarray = field(init=False)
    sum_prob: np.ndarray = field(init=False)
    sum_target: np.ndarray = field(init=False)
    sum_sq_error: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.edges = np.asarray(self.edges, dtype=np.float64)
        if self.edges.ndim != 1 or self.edges.size < 2 or np.any(np.diff(self.edges) < 0):
            raise MicrosegError(f"bin edges must be a non-decreasing 1D array; found {self.edges}")
        nb = self.n_bins
        self.count = np.zeros(nb, np.int64)
        self.sum_prob = np.zeros(nb, np.float64)
        self.sum_target = np.zeros(nb, np.float64)

    @classmethod
    def uniform(cls, n_bins: int = 15) -> CalibrationAccumulator:
        return cls(bin_edges(n_bins, "uniform"))

    @property
    def n_bins(self) -> int:
        return self.edges.size - 1

    @property
    def n(self) -> int:
        return int(self.count.sum())

    def update(
        self, prob: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None
    ) -> CalibrationAccumulator:
        """Add pixels (inside ``mask`` when given); returns self."""
        p, y = _prob_target(prob, target, mask)
        if p.size == 0:
            return self
        b = np.searchsorted(self.edges[1:-1], p, side="left")
        nb = self.n_bins
        self.count += np.bincount(b, minlength=nb)
        self.sum_prob += np.bincount(b, weights=p, minlength=nb)
        self.sum_target += np.bincount(b[y], minlength=nb)
        err = p.astype(np.float64)
        err[y] -= 1.0
        self.sum_sq_error += float(np.dot(err, err))
        return self

    def merge(self, other: CalibrationAccumulator) -> CalibrationAccumulator:
        """A new accumulator holding both (edges must be identical)."""
        if not np.array_equal(self.edges, other.edges):
            raise MicrosegError("cannot merge calibration accumulators with different bin edges")
        out = CalibrationAccumulator(self.edges.copy())
        out.count = self.count + other.count
        out.sum_prob = self.sum_prob + other.sum_prob
        out.sum_target = self.sum_target + other.sum_target
        out.sum_sq_error = self.sum_sq_error + other.sum_sq_error
        return out

    def table(self) -> pd.DataFrame:
        """Reliability table: one row per bin, empty bins included (NaN means, count 0).

        Columns: bin, lower, upper, count, mean_confidence (mean p(y=1) in the bin),
        frequency (observed fraction of positives), gap (``|mean_confidence - frequency|``).
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = np.where(self.count > 0, self.sum_prob / self.count, np.nan)
            freq = np.where(self.count > 0, self.sum_target / self.count, np.nan)
        return pd.DataFrame(
            {
                "bin": np.arange(self.n_bins),
                "lower": self.edges[:-1],
                "upper": self.edges[1:],
                "count": self.count.copy(),
                "mean_confidence": conf,
                "frequency": freq,
                "gap": np.abs(conf - freq),
            }
        )

    def ece(self) -> float:
        """Expected calibration error; NaN with no pixels."""
        n = self.n
        if n == 0:
            return float("nan")
        nz = self.count > 0
        gap = np.abs(self.sum_prob[nz] - self.sum_target[nz])  # = count * |conf - freq|
        return float(gap.sum() / n)

    def mce(self) -> float:
        """Maximum calibration error over non-empty bins; NaN with no pixels."""
        nz = self.count > 0
        if not nz.any():
            return float("nan")
        return float(np.max(np.abs(self.sum_prob[nz] - self.sum_target[nz]) / self.count[nz]))

    def brier(self) -> float:
        """Brier score ``mean (p - y)^2``; NaN with no pixels."""
        n = self.n
        return self.sum_sq_error / n if n else float("nan")

    def summary(self) -> dict[str, float | int]:
        return {"ece": self.ece(), "mce": self.mce(), "brier": self.brier(), "n": self.n}


def _accumulate(
    prob: np.ndarray,
    target: np.ndarray,
    n_bins: int,
    strategy: Strategy,
    mask: np.ndarray | None,
    max_pixels: int | None,
    seed: int,
) -> CalibrationAccumulator:
    p, y = _prob_target(prob, target, mask)
    p, y = subsample(p, y, max_pixels=max_pixels, seed=seed)
    edges = bin_edges(n_bins, strategy, p, max_pixels=None) if p.size else bin_edges(n_bins)
    return CalibrationAccumulator(edges).update(p, y)


def reliability_table(
    prob: np.ndarray,
    target: np.ndarray,
    n_bins: int = 15,
    strategy: Strategy = "uniform",
    *,
    mask: np.ndarray | None = None,
    max_pixels: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Reliability table of p(y=1) against the frequency of positives; see the module notes."""
    return _accumulate(prob, target, n_bins, strategy, mask, max_pixels, seed).table()


def calibration_summary(
    prob: np.ndarray,
    target: np.ndarray,
    n_bins: int = 15,
    strategy: Strategy = "uniform",
    *,
    mask: np.ndarray | None = None,
    max_pixels: int | None = None,
    seed: int = 0,
) -> dict[str, float | int]:
    """ECE, MCE, Brier and the pixel count in one pass (Brier on the same subsample)."""
    return _accumulate(prob, target, n_bins, strategy, mask, max_pixels, seed).summary()


def expected_calibration_error(
    prob: np.ndarray,
    target: np.ndarray,
    n_bins: int = 15,
    strategy: Strategy = "uniform",
    *,
    mask: np.ndarray | None = None,
    max_pixels: int | None = None,
    seed: int = 0,
) -> float:
    """ECE of p(y=1) with ``n_bins`` equal-width (or equal-mass) bins."""
    return _accumulate(prob, target, n_bins, strategy, mask, max_pixels, seed).ece()


def maximum_calibration_error(
    prob: np.ndarray,
    target: np.ndarray,
    n_bins: int = 15,
    strategy: Strategy = "uniform",
    *,
    mask: np.ndarray | None = None,
    max_pixels: int | None = None,
    seed: int = 0,
) -> float:
    """MCE: the largest ``|mean p - frequency|`` over non-empty bins."""
    return _accumulate(prob, target, n_bins, strategy, mask, max_pixels, seed).mce()


def brier_score(
    prob: np.ndarray,
    target: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    max_pixels: int | None = None,
    seed: int = 0,
) -> float:
    """Brier score ``mean (p - y)^2`` of p(y=1)."""
    p, y = _prob_target(prob, target, mask)
    p, y = subsample(p, y, max_pixels=max_pixels, seed=seed)
    if p.size == 0:
        return float("nan")
    err = p.astype(np.float64)
    err[y] -= 1.0
    return float(np.dot(err, err) / err.size)
