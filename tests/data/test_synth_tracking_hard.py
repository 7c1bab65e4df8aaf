"""The harder generator options (params.yaml ``synth.tracking.generator``): crowding, touching
daughters that separate slowly, photobleaching and a focus that drifts -- with the CTC ground
truth still exact."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from microseg.data.synth_tracking import TrackingSynthConfig, generate_tracking_sequence
from microseg.errors import ConfigError
from microseg.io.ctc import check_tracks

HARD = {
    "n_cells": (14, 20),
    "touch_fraction": 0.7,
    "enter_probability": 0.15,
    "division_probability": 0.03,
    "min_division_age": 6,
    "daughter_offset": 0.35,
    "daughter_speed_px": 0.2,
    "bleach_per_frame": 0.015,
    "blur_growth": 0.5,
}


def _check_ctc(seq) -> None:
    """CTC rules between labels and table; daughters begin the frame after the mother ends."""
    check_tracks(seq.labels, seq.tracks)
    by_label = seq.tracks.set_index("L")
    for row in seq.tracks[seq.tracks.P > 0].itertuples():
        assert by_label.at[row.P, "E"] == row.B - 1
    assert (seq.tracks[seq.tracks.P > 0].groupby("P").size() == 2).all()


def _daughter_gaps(seq, frames_after: int) -> list[float]:
    """Distance between sister centroids ``frames_after`` frames after each division, over
    the sum of their equivalent radii (1: just touching)."""
    tracks = seq.tracks
    out = []
    for _, sis in tracks[tracks.P > 0].groupby("P"):
        if len(sis) != 2:
            continue
        t = int(sis.B.iloc[0]) + frames_after
        if t > int(sis.E.min()):
            continue
        cents, radii = [], []
        for lab in sis.L:
            m = seq.labels[t] == lab
            cents.append(np.array(ndimage.center_of_mass(m)))
            radii.append(np.sqrt(m.sum() / np.pi))
        out.append(float(np.hypot(*(cents[0] - cents[1])) / sum(radii)))
    return out


def test_hard_sequences_keep_exact_ground_truth_and_are_harder() -> None:
    plain = [generate_tracking_sequence(TrackingSynthConfig(), seed=s) for s in (1, 2, 3)]
    hard = [generate_tracking_sequence(TrackingSynthConfig(**HARD), seed=s) for s in (1, 2, 3)]
    for s in hard:
        _check_ctc(s)
    fg = [np.mean([(s.labels > 0).mean() for s in group]) for group in (plain, hard)]
    assert fg[1] > 1.3 * fg[0]  # crowded
    n_div = [sum(int((s.tracks.P > 0).sum()) for s in group) for group in (plain, hard)]
    assert n_div[1] > n_div[0]
    # daughters are born touching and are still close two frames later
    gaps_hard = np.median([g for s in hard for g in _daughter_gaps(s, 2)])
    gaps_plain = np.median([g for s in plain for g in _daughter_gaps(s, 2)])
    assert gaps_hard < 1.0 < gaps_plain


def test_bleaching_and_blur_grow_over_the_sequence() -> None:
    base = {"n_frames": 20, "flicker": 0.0, "global_flicker": 0.0}
    still = generate_tracking_sequence(TrackingSynthConfig(**base), seed=4)
    bleached = generate_tracking_sequence(
        TrackingSynthConfig(**base, bleach_per_frame=0.03), seed=4
    )

    def fade(s) -> float:  # nuclei signal (offset and background removed), last / first frame
        def signal(t: int) -> float:
            f = s.frames[t].astype(float)
            return float(np.median(f[s.labels[t] > 0]) - np.median(f[s.labels[t] == 0]))

        return signal(19) / signal(0)

    # the noise draws differ once intensities do, so the cells differ: compare the fading
    assert fade(bleached) == pytest.approx(0.97**19 * fade(still), rel=0.25)
    assert fade(still) == pytest.approx(1.0, abs=0.25)
    blurred = generate_tracking_sequence(TrackingSynthConfig(**base, blur_growth=1.0), seed=4)
    sharp_edges = np.abs(np.diff(still.frames[19].astype(float), axis=1)).mean()
    soft_edges = np.abs(np.diff(blurred.frames[19].astype(float), axis=1)).mean()
    assert soft_edges < sharp_edges


def test_hard_options_are_checked() -> None:
    for bad in ({"bleach_per_frame": 1.0}, {"blur_growth": -0.1}, {"daughter_offset": 0.0},
                {"daughter_speed_px": -1.0}):  # fmt: skip
        with pytest.raises(ConfigError):
            TrackingSynthConfig(**bad)
