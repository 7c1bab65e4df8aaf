"""Tiny synthetic time-lapses (the tracking generator) and their U-Net targets cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from microseg.data.synth_tracking import (
    TrackingSequence,
    TrackingSynthConfig,
    generate_tracking_sequence,
)
from microseg.data.targets import RawItem, write_targets

TINY_SEQ = TrackingSynthConfig(shape=(32, 32), n_frames=6, n_cells=(2, 3), radius_px=(4.0, 6.0))


@pytest.fixture(scope="session")
def tiny_sequences() -> dict[str, TrackingSequence]:
    """Sequence ``01`` (train) and ``02`` (val), 6 frames of 32 x 32 pixels each."""
    return {
        "01": generate_tracking_sequence(TINY_SEQ, 1),
        "02": generate_tracking_sequence(TINY_SEQ, 2),
    }


@pytest.fixture(scope="session")
def tiny_targets(tmp_path_factory: pytest.TempPathFactory, tiny_sequences) -> Path:
    """Targets cache of every frame, ids ``seq<NN>_t<TTT>`` as the tracking stage names them
    (written in reverse frame order: the family must sort frames itself)."""
    items = [
        RawItem(f"seq{name}_t{t:03d}", split, "fluorescence", seq.frames[t], seq.labels[t])
        for name, split in (("01", "train"), ("02", "val"))
        for seq in [tiny_sequences[name]]
        for t in reversed(range(len(seq.frames)))
    ]
    out = tmp_path_factory.mktemp("lstm") / "targets"
    write_targets(items, out, progress=False)
    return out
