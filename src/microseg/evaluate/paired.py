"""Paired comparison of two models on the same images: mean difference and a bootstrap CI.

Two models scored on the same test images are compared image by image: the difference
``d_i = a_i - b_i`` of a per-image score (e.g. F1 at IoU 0.5) removes what the images share
(an image hard for one model is usually hard for the other), so a paired interval is much
narrower than comparing two dataset means. The interval is a seeded bootstrap over images
(:func:`scipy.stats.bootstrap` on the differences, which resamples the image pairs exactly as
``paired=True`` on the two score vectors would), percentile by default, BCa on request.

Rule used by the benchmark report: a difference is claimed only when its interval excludes 0.

Conventions:

- the two tables must hold the same image ids (each once); otherwise the comparison is
  refused, since a mean over different images compares the images, not the models;
- all differences equal (e.g. identical inputs): the bootstrap distribution is that one value,
  so the interval is ``[d, d]`` exactly (no resampling, no floating-point noise);
- fewer than two images: no interval (NaN) and no claim;
- missing scores (NaN) are refused unless ``nan_policy="omit"``, which drops those pairs
  (``n_images`` says how many remain).

Pure functions of tables: nothing here reads files or draws figures.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

from microseg.errors import DataFormatError, MicrosegError

logger = logging.getLogger(__name__)

#: The group label of the comparison over all images.
ALL = "all"

Method = Literal["percentile", "BCa", "basic"]
METHODS: tuple[str, ...] = ("percentile", "BCa", "basic")


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over the paired images of one group, with its bootstrap interval."""

    group: str
    n_images: int
    mean_a: float
    mean_b: float
    mean_diff: float
    low: float
    high: float
    confidence_level: float

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (a claimable difference)."""
        return bool(self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def paired_values(
    a: pd.DataFrame,
    b: pd.DataFrame,
    value: str,
    *,
    id_col: str = "image_id",
    group_col: str | None = None,
    names: tuple[str, str] = ("a", "b"),
) -> pd.DataFrame:
    """``a`` and ``b``'s ``value`` side by side on the same ids (sorted by id).

    Columns: ``id_col``, ``a``, ``b`` and, with ``group_col``, ``group`` (taken from ``a``;
    ``b``'s must agree where it has one). Refuses duplicate ids, different id sets and
    images whose group differs between the two tables.
    """
    tables = {}
    for name, df in zip(names, (a, b), strict=True):
        need = {id_col, value} | ({group_col} if group_col and name == names[0] else set())
        missing = sorted(need - set(df.columns))
        if missing:
            raise DataFormatError(f"per-image table of {name!r} lacks columns {missing}")
        ids = df[id_col].astype(str)
        dup = sorted(set(ids[ids.duplicated()]))
        if dup:
            raise DataFormatError(f"per-image table of {name!r} repeats image ids {dup[:5]}")
        tables[name] = df.assign(**{id_col: ids}).set_index(id_col)
    ta, tb = (tables[n] for n in names)
    only_a = sorted(set(ta.index) - set(tb.index))
    only_b = sorted(set(tb.index) - set(ta.index))
    if only_a or only_b:
        raise MicrosegError(
            f"cannot pair {names[0]!r} and {names[1]!r}: their image sets differ "
            f"({len(only_a)} only in {names[0]!r}, e.g. {only_a[:3]}; "
            f"{len(only_b)} only in {names[1]!r}, e.g. {only_b[:3]}); "
            "evaluate both on the same images"
        )
    ids = sorted(ta.index)
    out = pd.DataFrame(
        {
            id_col: ids,
            "a": pd.to_numeric(ta.loc[ids, value]).to_numpy(float),
            "b": pd.to_numeric(tb.loc[ids, value]).to_numpy(float),
        }
    )
    if group_col:
        ga = ta.loc[ids, group_col]
        if group_col in tb:
            gb = tb.loc[ids, group_col]
            bad = ga.notna() & gb.notna() & (ga.astype(str) != gb.astype(str))
            if bad.any():
                raise DataFormatError(
                    f"{group_col!r} of images {list(ga.index[bad][:3])} differs between "
                    f"{names[0]!r} and {names[1]!r}"
                )
        out["group"] = ga.fillna("unknown").astype(str).to_numpy()
    return out


def bootstrap_mean_ci(
    diff: np.ndarray,
    *,
    n_resamples: int = 10_000,
    confidence_level: float = 0.95,
    seed: int = 0,
    method: Method = "percentile",
) -> tuple[float, float]:
    """Bootstrap interval of the mean of ``diff`` (seeded; see the module notes)."""
    d = np.asarray(diff, float)
    if n_resamples < 1:
        raise MicrosegError(f"n_resamples must be >= 1; found {n_resamples}")
    if not 0 < confidence_level < 1:
        raise MicrosegError(f"confidence_level must lie in (0, 1); found {confidence_level}")
    if method not in METHODS:
        raise MicrosegError(f"bootstrap method must be one of {METHODS}; found {method!r}")
    if d.size < 2:
        return math.nan, math.nan
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = bootstrap(
            (d,),
            np.mean,
            n_resamples=n_resamples,
            confidence_level=confidence_level,
            method=method,
            vectorized=True,
            rng=np.random.default_rng(seed),
        )
    for w in caught:
        logger.info("bootstrap of %d differences: %s", d.size, w.message)
    ci = res.confidence_interval
    return float(ci.low), float(ci.high)


def _group_order(groups: pd.Series, order: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(groups))
    first = [g for g in (order or ()) if g in present]
    return first + sorted(g for g in present if g not in first)


def paired_difference(
    a: pd.DataFrame,
    b: pd.DataFrame,
    value: str = "f1_50",
    *,
    id_col: str = "image_id",
    group_col: str | None = None,
    group_order: Sequence[str] | None = None,
    n_resamples: int = 10_000,
    confidence_level: float = 0.95,
    seed: int = 0,
    method: Method = "percentile",
    nan_policy: Literal["raise", "omit"] = "raise",
    names: tuple[str, str] = ("a", "b"),
) -> list[PairedDifference]:
    """Mean ``a - b`` of ``value`` over paired images, with a bootstrap interval.

    The first entry is over all images (group :data:`ALL`); with ``group_col`` (e.g.
    ``modality``) one entry per group follows, ``group_order`` first, the rest sorted. Every
    group is bootstrapped with a fresh generator from ``seed``, so its interval does not
    depend on which other groups exist. ``names`` only label error messages.
    """
    pairs = paired_values(a, b, value, id_col=id_col, group_col=group_col, names=names)
    bad = pairs["a"].isna() | pairs["b"].isna()
    if bad.any():
        if nan_policy != "omit":
            raise DataFormatError(
                f"{int(bad.sum())} images have no {value!r} (e.g. "
                f"{pairs.loc[bad, id_col].tolist()[:3]}); pass nan_policy='omit' to drop them"
            )
        pairs = pairs[~bad]
    groups = [(ALL, pairs)]
    if group_col:
        groups += [
            (g, pairs[pairs["group"] == g]) for g in _group_order(pairs["group"], group_order)
        ]
    out = []
    for g, sub in groups:
        x, y = sub["a"].to_numpy(float), sub["b"].to_numpy(float)
        d = x - y
        low, high = bootstrap_mean_ci(
            d,
            n_resamples=n_resamples,
            confidence_level=confidence_level,
            seed=seed,
            method=method,
        )
        n = int(d.size)
        # a constant difference is its own mean (np.mean may round 0.1 to 0.10000000000000002)
        mean_diff = float(d[0]) if n and np.all(d == d[0]) else float(d.mean()) if n else math.nan
        out.append(
            PairedDifference(
                group=g,
                n_images=n,
                mean_a=float(x.mean()) if n else math.nan,
                mean_b=float(y.mean()) if n else math.nan,
                mean_diff=mean_diff,
                low=low,
                high=high,
                confidence_level=confidence_level,
            )
        )
    return out


def paired_difference_table(diffs: Sequence[PairedDifference]) -> pd.DataFrame:
    """:func:`paired_difference` output as a table, one row per group."""
    return pd.DataFrame([d.as_dict() for d in diffs])
