"""Readers and writers per file format; they know formats only (no models, no training).

Every reader validates and raises the :mod:`microseg.errors` family with the file's name;
every writer writes atomically (temp sibling + rename).
"""

from microseg.io.coco import (
    coco_to_labels,
    labels_to_coco,
    labels_to_coco_results,
    read_coco,
    validate_coco,
    write_coco,
)
from microseg.io.ctc import (
    CtcResult,
    CtcSequence,
    check_tracks,
    read_ctc_gt,
    read_ctc_result,
    read_track_file,
    write_ctc_gt,
    write_ctc_result,
    write_track_file,
)
from microseg.io.d3set import D3Set, meta_row, read_d3set, write_d3set
from microseg.io.dsb import (
    DsbSample,
    iter_dsb_samples,
    list_dsb_samples,
    read_dsb_sample,
    write_dsb_sample,
)
from microseg.io.png import list_png_pairs, read_png_pair, write_png_pair
from microseg.io.points import read_points, write_points
from microseg.io.tiff import TiffStack, check_finite, open_stack, read_stack, write_stack
from microseg.io.yolo import read_yolo_labels, write_yolo_labels

__all__ = [
    "CtcResult",
    "CtcSequence",
    "D3Set",
    "DsbSample",
    "TiffStack",
    "check_finite",
    "check_tracks",
    "coco_to_labels",
    "iter_dsb_samples",
    "labels_to_coco",
    "labels_to_coco_results",
    "list_dsb_samples",
    "list_png_pairs",
    "meta_row",
    "open_stack",
    "read_coco",
    "read_ctc_gt",
    "read_ctc_result",
    "read_d3set",
    "read_dsb_sample",
    "read_png_pair",
    "read_points",
    "read_stack",
    "read_track_file",
    "read_yolo_labels",
    "validate_coco",
    "write_coco",
    "write_ctc_gt",
    "write_ctc_result",
    "write_d3set",
    "write_dsb_sample",
    "write_png_pair",
    "write_points",
    "write_stack",
    "write_track_file",
    "write_yolo_labels",
]
