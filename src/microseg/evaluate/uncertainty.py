"""Predictive uncertainty of binary (per-pixel Bernoulli) predictions from stochastic samples.

A Probabilistic U-Net (or MC dropout, or an ensemble) gives ``S`` sampled foreground
probabilities ``p_s`` per pixel. Their spread splits the total predictive uncertainty into two
parts (Depeweg et al. 2018; Kendall & Gal 2017):

- **predictive entropy** ``H[E p]``: entropy of the mean prediction (total uncertainty);
- **expected entropy** ``E[H(p)]``: mean entropy of the samples (*aleatoric*: every sample is
  itself unsure, e.g. a blurred boundary);
- **mutual information** ``MI = H[E p] - E[H(p)]`` (*epistemic*: the samples disagree).

plus the mean probability and the variance of ``p`` across samples (population variance,
``ddof=0`` by default).

Everything is computed from four running sums (:class:`UncertaintySums`): ``sum_p``,
``sum_p2``, ``sum_entropy`` and the sample count ``n``. A predictor never needs the full
``S x Z x Y x X`` stack: it draws the samples for one plane (or tile), calls
:meth:`UncertaintySums.update`, turns the sums into maps with :func:`uncertainty_maps` and
moves on. Sums from separate workers combine with :meth:`UncertaintySums.merge`.

Numerics:

- Entropies use ``xlogy`` so ``0 log 0 = 0`` exactly: no epsilon is needed for ``p`` in {0, 1},
  and a sample set of hard 0s and 1s split half/half gives ``MI = ln 2`` and aleatoric 0 exactly.
  Probabilities are clipped to ``[eps, 1 - eps]`` (``eps = 0`` by default, i.e. just to
  ``[0, 1]`` against rounding); a positive ``eps`` is applied *before* both the mean and the
  per-sample entropies, so the two see the same numbers and Jensen's inequality
  (``MI >= 0``) still holds for them.
- ``MI >= 0`` is exact in real arithmetic; rounding can leave tiny negatives (about 1e-16 with
  float64 inputs and sums, 1e-7 where float32 is involved). Those, and negative variances from
  ``E[p^2] - E[p]^2`` cancellation, are clipped to 0.
- Values far outside ``[0, 1]`` (beyond ``RANGE_TOL``) raise: they are almost always logits
  passed by mistake.

Dtypes and memory: per-sample entropies are computed in the input's floating dtype (float32
stays float32; integer and bool inputs become float64), one sample and :data:`CHUNK` values at
a time, so a float32 stack is never copied to float64 and temporaries stay a few MiB. The sums
are ``float64`` by default (three map-sized arrays, exact enough for any ``S``); pass
``dtype=np.float32`` to halve them when they span a whole volume, at about 1e-7 absolute error.
:func:`uncertainty_maps` computes in the sums' dtype and writes ``float32`` maps unless told
otherwise. Peak memory of the streamed path is therefore sums + maps + a few MiB, against
``S`` times a map (plus float temporaries of that size) for the naive full-stack computation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import xlogy

from microseg.errors import MicrosegError, ShapeMismatchError

logger = logging.getLogger(__name__)

Unit = Literal["nats", "bits"]

#: Names of the maps :func:`uncertainty_maps` returns, in display order.
MAP_NAMES: tuple[str, ...] = (
    "mean",
    "variance",
    "entropy",
    "mutual_information",
    "expected_entropy",
)

#: Values processed at a time (per sample, per map): bounds the temporaries to a few MiB.
CHUNK = 1 << 18

#: Probabilities may stray this far outside [0, 1] (interpolation, rounding) and are clipped;
#: farther is an error.
RANGE_TOL = 1e-3


def _float(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p)
    return p if np.issubdtype(p.dtype, np.floating) else p.astype(np.float64)


def _scale(unit: Unit) -> float:
    if unit == "nats":
        return 1.0
    if unit == "bits":
        return 1.0 / math.log(2.0)
    raise MicrosegError(f"entropy unit must be 'nats' or 'bits'; found {unit!r}")


def _check_range(p: np.ndarray, what: str = "probabilities") -> None:
    if p.size == 0:
        return
    lo, hi = float(np.min(p)), float(np.max(p))
    if not (lo >= -RANGE_TOL and hi <= 1.0 + RANGE_TOL):  # also catches NaN
        raise MicrosegError(
            f"{what} must lie in [0, 1]; found values in [{lo:.4g}, {hi:.4g}] "
            "(logits instead of sigmoid outputs?)"
        )


def _clip(p: np.ndarray, eps: float) -> np.ndarray:
    if not 0.0 <= eps < 0.5:
        raise MicrosegError(f"eps must be in [0, 0.5); found {eps!r}")
    return np.clip(p, eps, 1.0 - eps, dtype=p.dtype)


def _neg_entropy(p: np.ndarray) -> np.ndarray:
    """``p log p + (1 - p) log(1 - p)`` (a new array in ``p``'s dtype; p already clipped)."""
    q = np.subtract(1.0, p, dtype=p.dtype)
    h = xlogy(p, p)
    h += xlogy(q, q)
    return h


def _chunks(n: int) -> range:
    return range(0, n, CHUNK)


def binary_entropy(p: np.ndarray, *, unit: Unit = "nats", eps: float = 0.0) -> np.ndarray:
    """Entropy of a Bernoulli(p): ``-p log p - (1 - p) log(1 - p)``, elementwise.

    ``0 log 0 = 0`` (via ``xlogy``), so ``p`` in {0, 1} gives exactly 0. ``p`` is clipped to
    ``[eps, 1 - eps]`` first. Float inputs keep their dtype; others are computed in float64.
    Maximum is ``ln 2`` nats = 1 bit at ``p = 0.5``. Works in chunks of :data:`CHUNK` values,
    so temporaries stay small whatever the size of ``p``.
    """
    p = _float(p)
    scale = _scale(unit)
    out = np.empty(p.shape, p.dtype)
    flat_p, flat_out = p.reshape(-1), out.reshape(-1)
    for i in _chunks(flat_p.size):
        h = _neg_entropy(_clip(flat_p[i : i + CHUNK], eps))
        h *= h.dtype.type(-scale)
        flat_out[i : i + CHUNK] = h
    return out[()] if out.ndim == 0 else out


@dataclass
class UncertaintySums:
    """Running sums over samples: ``sum_p``, ``sum_p2``, ``sum_entropy`` (nats) and count ``n``.

    Start with :meth:`zeros`, feed samples with :meth:`update` (axis 0 is the sample axis),
    combine partial sums with :meth:`merge`. ``eps`` is the clipping applied to every sample
    (see the module notes); sums built with different ``eps`` do not merge.
    """

    sum_p: np.ndarray
    sum_p2: np.ndarray
    sum_entropy: np.ndarray
    n: int = 0
    eps: float = 0.0

    def __post_init__(self) -> None:
        shapes = {np.shape(a) for a in (self.sum_p, self.sum_p2, self.sum_entropy)}
        if len(shapes) != 1:
            raise ShapeMismatchError(
                f"sum_p, sum_p2 and sum_entropy must have one shape; found {sorted(shapes)}"
            )
        if self.n < 0:
            raise MicrosegError(f"sample count n must be >= 0; found {self.n}")
        # updated in place through flat views, which needs C order
        self.sum_p = np.ascontiguousarray(self.sum_p)
        self.sum_p2 = np.ascontiguousarray(self.sum_p2)
        self.sum_entropy = np.ascontiguousarray(self.sum_entropy)

    @classmethod
    def zeros(
        cls, shape: tuple[int, ...], dtype: np.dtype | type = np.float64, eps: float = 0.0
    ) -> UncertaintySums:
        """Empty sums for per-pixel maps of ``shape``, accumulated in ``dtype``."""
        shape = tuple(int(s) for s in shape)
        return cls(np.zeros(shape, dtype), np.zeros(shape, dtype), np.zeros(shape, dtype), 0, eps)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.sum_p.shape

    @property
    def dtype(self) -> np.dtype:
        return self.sum_p.dtype

    def update(self, p_batch: np.ndarray) -> UncertaintySums:
        """Add samples ``p_batch[s, ...]`` (shape ``(k, *self.shape)``) in place; returns self.

        Works one sample and :data:`CHUNK` values at a time, so temporaries stay a few MiB in
        the input's floating dtype, whatever ``k`` and the map size.
        """
        p_batch = np.asarray(p_batch)
        if p_batch.ndim != len(self.shape) + 1 or p_batch.shape[1:] != self.shape:
            raise ShapeMismatchError(
                f"samples must have shape (k, {', '.join(map(str, self.shape))}) with the "
                f"sample axis first; found {p_batch.shape}"
            )
        _clip(np.zeros(1), self.eps)  # validate eps before touching the sums
        sp, sp2, se = (a.reshape(-1) for a in (self.sum_p, self.sum_p2, self.sum_entropy))
        for sample in p_batch:
            flat = sample.reshape(-1)
            for i in _chunks(flat.size):
                c = _float(flat[i : i + CHUNK])
                _check_range(c)
                c = _clip(c, self.eps)
                j = slice(i, i + c.size)
                np.add(sp[j], c, out=sp[j], casting="unsafe")
                np.add(sp2[j], np.square(c), out=sp2[j], casting="unsafe")
                np.subtract(se[j], _neg_entropy(c), out=se[j], casting="unsafe")
            self.n += 1
        return self

    def merge(self, other: UncertaintySums) -> UncertaintySums:
        """A new :class:`UncertaintySums` holding the samples of both (for parallel streams)."""
        if other.shape != self.shape:
            raise ShapeMismatchError(
                f"cannot merge uncertainty sums of shape {self.shape} with {other.shape}"
            )
        if other.eps != self.eps:
            raise MicrosegError(
                f"cannot merge sums clipped with eps={self.eps} and eps={other.eps}"
            )
        dt = np.result_type(self.dtype, other.dtype)
        return UncertaintySums(
            np.add(self.sum_p, other.sum_p, dtype=dt),
            np.add(self.sum_p2, other.sum_p2, dtype=dt),
            np.add(self.sum_entropy, other.sum_entropy, dtype=dt),
            self.n + other.n,
            self.eps,
        )


def from_samples(
    p: np.ndarray, *, dtype: np.dtype | type = np.float64, eps: float = 0.0
) -> UncertaintySums:
    """Sums of a whole sample stack ``p[s, ...]`` (``S >= 1`` samples along axis 0)."""
    p = np.asarray(p)
    if p.ndim < 1 or p.shape[0] < 1:
        raise ShapeMismatchError(
            f"need a sample stack p[s, ...] with at least one sample; found shape {p.shape}"
        )
    return UncertaintySums.zeros(p.shape[1:], dtype=dtype, eps=eps).update(p)


def uncertainty_maps(
    sums: UncertaintySums,
    *,
    unit: Unit = "nats",
    ddof: int = 0,
    dtype: np.dtype | type | None = np.float32,
) -> dict[str, np.ndarray]:
    """Per-pixel maps from sums: see :data:`MAP_NAMES`.

    - ``mean``: ``E[p]``;
    - ``variance``: variance of ``p`` across samples (``ddof=0``: population; ``ddof=1``
      needs ``n >= 2``), clipped at 0;
    - ``entropy``: ``H[E p]`` (total), ``expected_entropy``: ``E[H(p)]`` (aleatoric),
      ``mutual_information``: their difference (epistemic), clipped at 0;

    entropies in ``unit`` (nats or bits). Computed in the sums' dtype, :data:`CHUNK` values at a
    time, straight into the output maps of ``dtype`` (``None``: the sums' dtype), so memory is
    the five maps plus a few MiB. ``entropy == mutual_information + expected_entropy`` up to
    rounding wherever MI was not clipped.
    """
    n = sums.n
    if n <= ddof:
        raise MicrosegError(f"need more than {ddof} sample(s) for these maps; found n = {n}")
    scale = _scale(unit)
    work = sums.dtype
    out_dtype = work if dtype is None else np.dtype(dtype)
    out = {k: np.empty(sums.shape, out_dtype) for k in MAP_NAMES}
    flat = {k: v.reshape(-1) for k, v in out.items()}
    sp, sp2, se = (a.reshape(-1) for a in (sums.sum_p, sums.sum_p2, sums.sum_entropy))
    inv_n = work.type(1.0 / n)
    n_neg, mi_min = 0, 0.0
    for i in _chunks(sp.size):
        j = slice(i, i + CHUNK)
        mean = sp[j] * inv_n
        np.clip(mean, 0.0, 1.0, out=mean)
        var = sp2[j] * inv_n
        var -= np.square(mean)
        np.maximum(var, 0.0, out=var)
        if ddof:
            var *= work.type(n / (n - ddof))
        entropy = _neg_entropy(mean)
        np.negative(entropy, out=entropy)
        expected = se[j] * inv_n
        mi = entropy - expected
        neg = mi < 0
        if neg.any():
            n_neg += int(neg.sum())
            mi_min = min(mi_min, float(mi.min()))
            mi[neg] = 0.0
        if scale != 1.0:
            for a in (entropy, expected, mi):
                a *= work.type(scale)
        flat["mean"][j] = mean
        flat["variance"][j] = var
        flat["entropy"][j] = entropy
        flat["mutual_information"][j] = mi
        flat["expected_entropy"][j] = expected
    if n_neg:
        logger.debug(
            "clipped %d negative mutual-information value(s) (min %.3g) to 0", n_neg, mi_min
        )
    return out


def maps_from_samples(
    p: np.ndarray, *, unit: Unit = "nats", eps: float = 0.0, dtype: np.dtype | type | None = None
) -> dict[str, np.ndarray]:
    """:func:`uncertainty_maps` of :func:`from_samples`, maps in ``p``'s float dtype."""
    p = _float(np.asarray(p))
    sums = from_samples(p, eps=eps)
    return uncertainty_maps(sums, unit=unit, dtype=p.dtype if dtype is None else dtype)
