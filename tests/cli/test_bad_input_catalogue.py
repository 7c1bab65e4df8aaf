"""Issue 18's bad-input catalogue, run through the real ``microseg`` command in-process.

Every case builds the smallest input that shows one mistake (a COCO polygon with a NaN, a
pickle in place of weights, a ``../`` dataset name, ...) in a fresh working folder with a copy
of params.yaml, runs ``microseg.cli.main`` as a user would, and checks the four promises of
issue 18: the exit status, no traceback, a message that names the file or field, and no
partial output (the command's output does not exist or is unchanged, nothing new but logs,
and no ``*.tmp*`` leftover anywhere). The few cases whose right answer is to succeed say so.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
#: what a failing command may leave: its log, and the MLflow run (or Optuna study) that
#: records the failure; none of them is a stage output
ALLOWED_NEW = ("logs/", "mlflow.db", "mlruns/", "optuna.db")


# ------------------------------------------------------------------------------ inputs
def write_params(tmp: Path, datasets: dict | None = None, **sections: dict) -> None:
    """tmp/params.yaml: the repo's, with extra ``datasets`` entries and top-level changes."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["datasets"].update(datasets or {})
    for key, value in sections.items():
        raw[key] = value
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def tif(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, **kw)
    return path


def blob_image(h: int = 32, w: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with two bright squares and their instance labels."""
    image = np.full((h, w), 20, np.uint8)
    labels = np.zeros((h, w), np.uint16)
    image[4:12, 4:12], labels[4:12, 4:12] = 200, 1
    image[18:28, 16:26], labels[18:28, 16:26] = 180, 2
    return image, labels


def coco_case(ann_change: dict | None = None, image_change: dict | None = None,
              extra_images: list[dict] | None = None, drop: str | None = None,
              raw_text: str | None = None) -> Callable[[Path], list[str]]:  # fmt: skip
    """A COCO dataset ``coco`` (one 32x32 image, one square polygon) with one thing changed."""

    def build(tmp: Path) -> list[str]:
        src = tmp / "raw" / "coco"
        png(src / "a.png", blob_image()[0])
        image = {"id": 1, "file_name": "a.png", "height": 32, "width": 32, **(image_change or {})}
        ann = {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
               "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]], "area": 64,
               "bbox": [4, 4, 8, 8], **(ann_change or {})}  # fmt: skip
        for key in (drop,) if drop else ():
            (image if key in image else ann).pop(key)
        doc = {"images": [image, *(extra_images or [])], "annotations": [ann],
               "categories": [{"id": 1, "name": "nucleus"}]}  # fmt: skip
        text = raw_text if raw_text is not None else json.dumps(doc)  # NaN stays NaN
        (src / "annotations.json").write_text(text)
        write_params(tmp, {"coco": {"format": "coco", "source": "raw/coco", "task": "nuclei"}})
        return ["ingest", "coco"]

    return build


def pairs_case(
    mask: np.ndarray | bool | None = None, image: np.ndarray | None = None, bomb: bool = False
) -> Callable[[Path], list[str]]:
    """A ``png_pairs`` dataset ``pairs`` of one image and its mask."""

    def build(tmp: Path) -> list[str]:
        src = tmp / "raw" / "pairs"
        img, lab = blob_image()
        png(src / "images" / "a.png", img if image is None else image)
        if mask is not False:
            png(src / "masks" / "a.png", (lab > 0).astype(np.uint8) * 255 if mask is None else mask)
        if bomb:
            png(src / "images" / "a.png", np.zeros((400, 400), np.uint8))
            png(src / "masks" / "a.png", np.zeros((400, 400), np.uint8))
        write_params(
            tmp, {"pairs": {"format": "png_pairs", "source": "raw/pairs", "task": "nuclei"}}
        )
        return ["ingest", "pairs"]

    return build


def bomb_tiff(path: Path, side: int = 60000) -> Path:
    """A few hundred bytes whose header declares a ``side`` x ``side`` uint8 image."""
    tif(path, np.zeros((16, 16), np.uint8), compression="zlib", metadata=None)
    with tifffile.TiffFile(path) as t:
        tags = t.pages[0].tags
        spots = [(tags[n].valueoffset, tags[n].dtype) for n in
                 ("ImageWidth", "ImageLength", "RowsPerStrip")]  # fmt: skip
    data = bytearray(path.read_bytes())
    for offset, dtype in spots:
        fmt = "<H" if int(dtype) == 3 else "<I"
        data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, side)
    path.write_bytes(bytes(data))
    return path


def stack(path: Path, array: np.ndarray | None = None, nan_plane: int | None = None) -> Path:
    """A small ZYX float32 stack with voxel size (a NaN voxel on ``nan_plane``)."""
    from microseg.io.tiff import write_stack

    if array is None:
        rng = np.random.default_rng(0)
        array = rng.normal(300, 40, (4, 32, 32)).astype(np.float32)
        array[1, 10:14, 10:14] += 2000
    if nan_plane is not None:
        array = array.astype(np.float32)
        array[nan_plane, 5, 5] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    write_stack(path, array, (500.0, 94.0, 94.0))
    return path


#: where tiny untrained weights are written, once per module, by the first case needing them
WEIGHTS: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _weights_dir(tmp_path_factory) -> None:
    WEIGHTS.clear()
    WEIGHTS["dir"] = tmp_path_factory.mktemp("weights")


def punet_weights(path: Path) -> Path:
    """A tiny untrained Prob-UNet saved as the pipeline saves one (a state dict)."""
    cached = WEIGHTS["dir"] / "punet.pt"
    if not cached.exists():
        import torch

        from microseg.models.punet import ProbUNet, save_punet

        torch.manual_seed(0)
        net = ProbUNet(filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2, head_convs=2)
        save_punet(net, cached)
    return Path(shutil.copy(cached, path))


def yolo_weights(path: Path) -> Path:
    """An untrained YOLO-n saved as the pipeline saves one."""
    cached = WEIGHTS["dir"] / "yolo.pt"
    if not cached.exists():
        from microseg.models.yolo import YoloSpineDetector

        YoloSpineDetector.build("n").save(cached)
    return Path(shutil.copy(cached, path))


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: the test then checks the marker is absent."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payload(path: Path) -> Path:
    """A torch-style file whose unpickling would create ``path.parent / PWNED``."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(path.parent / "PWNED")}, path)
    return path


def raw_pickle(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload(path.parent / "PWNED")))
    return path


def junk(path: Path, data: bytes = b"this is not a weights file\n" * 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def d3set_case(change: str) -> Callable[[Path], list[str]]:
    """A ``synthetic_spines`` folder whose train.d3set has one defect."""

    def build(tmp: Path) -> list[str]:
        import flammkuchen as fl
        import pandas as pd

        from microseg.io.d3set import _numpy2_aliases, meta_row

        src = tmp / "raw" / "spines"
        src.mkdir(parents=True)
        rng = np.random.default_rng(1)
        shape = (3, 16, 16)
        stacks = {"x0": rng.integers(0, 4096, shape).astype(np.uint16)}
        dend = {"x0": rng.random(shape) > 0.7}
        spines = {"x0": rng.random(shape) > 0.95}
        if change == "ignore":
            spines["x0"] = spines["x0"].astype(np.int8)
            spines["x0"][0, :3, :3] = -1
        elif change == "float64":
            stacks["x0"] = stacks["x0"].astype(np.float64)
            stacks["x0"][1, 2, 2] = np.nan
        meta = pd.DataFrame([meta_row(shape, 0.094, 0.5, "s.tif", timestamp="20240101_120000")])
        payload = {"data": {"stacks": stacks, "dendrites": dend, "spines": spines}, "meta": meta}
        if change == "junk":
            junk(src / "train.d3set", b"not hdf5" * 100)
        else:
            with _numpy2_aliases():
                fl.save(str(src / "train.d3set"), payload, compression="blosc")
        entry = {"format": "synthetic_spines", "source": "raw/spines", "task": "spines"}
        write_params(tmp, {"spines": {**entry, "voxel_size_nm": [500.0, 94.0, 94.0]}})
        return ["ingest", "spines"]

    return build


def ome_params(tmp: Path) -> None:
    write_params(tmp, {"ome": {"format": "ome-tiff", "source": "raw/ome", "task": "nuclei"}})


def bad_manifest(tmp: Path) -> None:
    """A prepared dsb2018 whose manifest names a sample ``../../x``."""
    from microseg.data.manifest import write_manifest

    row = {"sample_id": "../../x", "split": "test", "task": "nuclei",
           "image_path": "images/a.tif", "label_path": "labels/a.tif",
           "label_kind": "instance"}  # fmt: skip
    folder = tmp / "data" / "prepared" / "dsb2018"
    folder.mkdir(parents=True)
    write_manifest([row], folder)


def registry_json(tmp: Path) -> None:
    reg = tmp / "reports" / "registry"
    reg.mkdir(parents=True)
    (reg / "spines.mlflow.json").write_text("{broken")


# -------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    id: str
    command: str
    case: str
    before: str
    build: Callable[[Path], list[str]]
    #: phrases the output must hold (the file or field named)
    said: tuple[str, ...]
    code: int | None = None  # None: any non-zero status
    #: outputs (relative to the working folder) that must not exist afterwards
    absent: tuple[str, ...] = ()
    allowed_new: tuple[str, ...] = ()
    marker: bool = False  # a pickle payload's PWNED file must not appear
    one_line: bool = False  # the message is one line
    #: a defect this catalogue found whose fix lies outside the files its author could edit
    xfail: str = ""


NOT_LISTED = "not in the issue's list"


def _argv(*argv: str, setup: Callable[[Path], None] | None = None):
    def build(tmp: Path) -> list[str]:
        if setup is not None:
            setup(tmp)
        return list(argv)

    return build


def _with(setup: Callable[[Path], object], *argv: str):
    return _argv(*argv, setup=setup)


# Each row: id, command, the mistake, the behaviour issue 18 recorded before its fixes,
# the command line (its inputs written first), and the phrases the message must hold.
# fmt: off
CASES: list[Case] = [
    # ---------------------------------------------------------------- ingest: COCO
    Case("coco-nan-polygon", "ingest", "COCO polygon with a NaN coordinate",
         "OOM/segfault, .tmp left",
         coco_case({"segmentation": [[4, 4, float("nan"), 4, 12, 12, 4, 12]]}),
         ("annotations.json", "annotation id 1", "NaN"), absent=("data/prepared/coco",)),
    Case("coco-huge-polygon", "ingest", "COCO polygon with a 1e12 coordinate",
         "OOM/segfault, .tmp left",
         coco_case({"segmentation": [[4, 4, 1e12, 4, 12, 12, 4, 12]]}),
         ("annotations.json", "annotation id 1", "outside"), absent=("data/prepared/coco",)),
    Case("coco-string-polygon", "ingest", "COCO polygon given as a string",
         "traceback", coco_case({"segmentation": ["4,4,12,4,12,12"]}),
         ("annotations.json", "polygon 0 must be a list of numbers"),
         absent=("data/prepared/coco",)),
    Case("coco-odd-polygon", "ingest", "COCO polygon with an odd number of coordinates",
         "data dropped silently", coco_case({"segmentation": [[4, 4, 12, 4, 12, 12, 4]]}),
         ("annotations.json", "7 coordinates"), absent=("data/prepared/coco",)),
    Case("coco-short-polygon", "ingest", "COCO polygon of two points",
         "data dropped silently", coco_case({"segmentation": [[4, 4, 12, 4]]}),
         ("annotations.json", "4 coordinates"), absent=("data/prepared/coco",)),
    Case("coco-outside-polygon", "ingest", "COCO polygon outside its image",
         "data dropped silently", coco_case({"segmentation": [[40, 40, 60, 40, 60, 60]]}),
         ("annotations.json", "outside the 32x32 image"), absent=("data/prepared/coco",)),
    Case("coco-no-segmentation", "ingest", "COCO annotation without 'segmentation'",
         "traceback", coco_case(drop="segmentation"),
         ("annotations.json", "no 'segmentation'"), absent=("data/prepared/coco",)),
    Case("coco-no-file-name", "ingest", "COCO image without 'file_name'",
         "traceback", coco_case(drop="file_name"),
         ("annotations.json", "images [1] have no 'file_name'"),
         absent=("data/prepared/coco",)),
    Case("coco-bad-rle", "ingest", "COCO RLE whose counts do not cover the image",
         "traceback", coco_case({"segmentation": {"size": [32, 32], "counts": [10, 5]}}),
         ("annotations.json", "RLE counts sum to 15"), absent=("data/prepared/coco",)),
    Case("coco-negative-height", "ingest", "COCO image with height -32",
         "traceback", coco_case(image_change={"height": -32}),
         ("annotations.json", "height must be a whole number"),
         absent=("data/prepared/coco",)),
    Case("coco-same-stem", "ingest", "two COCO images with the same file stem",
         "data dropped silently",
         coco_case(extra_images=[{"id": 2, "file_name": "a.tif", "height": 32, "width": 32}]),
         ("annotations.json", "share the file stem", "'a'"), absent=("data/prepared/coco",)),
    Case("coco-file-name-traversal", "ingest", "COCO file_name '../../x.png'",
         NOT_LISTED, coco_case(image_change={"file_name": "../../x.png"}),
         ("annotations.json", "leaves the dataset folder"), absent=("data/prepared/coco",)),
    Case("coco-not-json", "ingest", "annotations.json that is not JSON",
         NOT_LISTED, coco_case(raw_text="{ not json"),
         ("annotations.json", "expected JSON"), absent=("data/prepared/coco",)),
    # ---------------------------------------------------------- ingest: PNG pairs
    Case("pairs-binary-mask-ok", "ingest", "binary 0/255 mask read as instances (succeeds)",
         NOT_LISTED, pairs_case(), ("pairs: 1 samples",), code=0),
    Case("pairs-decompression-bomb", "ingest", "PNG above Pillow's pixel limit",
         "traceback", pairs_case(bomb=True),
         ("a.png", "decompression bomb"), absent=("data/prepared/pairs",)),
    Case("pairs-shape-mismatch", "ingest", "mask 16x16 for a 32x32 image",
         NOT_LISTED, pairs_case(mask=np.zeros((16, 16), np.uint8)),
         ("masks/a.png", "shape (16, 16)"), absent=("data/prepared/pairs",)),
    Case("pairs-missing-masks", "ingest", "images/ without masks/",
         NOT_LISTED, pairs_case(mask=False), ("raw/pairs/masks",),
         absent=("data/prepared/pairs",)),
    Case("pairs-rgb-mask", "ingest", "RGB mask",
         NOT_LISTED, pairs_case(mask=np.zeros((32, 32, 3), np.uint8)),
         ("masks/a.png", "single-channel"), absent=("data/prepared/pairs",)),
    # ------------------------------------------------------------------ ingest: others
    Case("ctc-no-sequences", "ingest", "CTC folder without sequence folders", NOT_LISTED,
         _with(lambda t: ((t / "raw/ctc").mkdir(parents=True), write_params(
             t, {"ctc": {"format": "ctc", "source": "raw/ctc", "task": "tracking"}})),
               "ingest", "ctc"),
         ("raw/ctc", "no CTC sequence folders"), absent=("data/prepared/ctc",)),
    Case("d3set-ignore-patch", "ingest", "d3set spine mask with a -1 ignore patch",
         "-1 ignore patch passed as spine", d3set_case("ignore"),
         ("train.d3set", "data/spines/x0", "binary"), absent=("data/prepared/spines",)),
    Case("d3set-not-hdf5", "ingest", "d3set that is not HDF5",
         "20-line HDF5 trace in the message", d3set_case("junk"),
         ("train.d3set", "no HDF5 signature"), absent=("data/prepared/spines",), one_line=True),
    Case("d3set-float64-nan", "ingest", "float64 d3set stack with a NaN voxel",
         "float64 d3set reported against a temp path", d3set_case("float64"),
         ("raw/spines/train.d3set", "1 NaN"), absent=("data/prepared/spines",)),
    Case("dsb-missing-source", "ingest", "dsb2018 source folder missing", NOT_LISTED,
         _with(lambda t: write_params(
             t, {"dsb2018": {"format": "dsb2018", "source": "raw/nope", "task": "nuclei"}}),
               "ingest", "dsb2018"),
         ("raw/nope", "not found"), absent=("data/prepared/dsb2018",)),
    Case("dsb-half-compact", "ingest", "dsb2018 folder with images/ but no labels/", NOT_LISTED,
         _with(lambda t: (png(t / "raw/dsb/images/a.png", blob_image()[0]), write_params(
             t, {"dsb2018": {"format": "dsb2018", "source": "raw/dsb", "task": "nuclei"}})),
               "ingest", "dsb2018"),
         ("raw/dsb", "labels"), absent=("data/prepared/dsb2018",)),
    Case("ome-tiff-bomb-header", "ingest", "tiny TIFF declaring 60000x60000 (ome-tiff)",
         "139-byte TIFF declaring 60000x60000 allocated 3.6 GB",
         _with(lambda t: (bomb_tiff(t / "raw/ome/images/a.tif"),
                          tif(t / "raw/ome/masks/a.tif", np.zeros((16, 16), np.uint8)),
                          ome_params(t)), "ingest", "ome"),
         ("images/a.tif", "declares 3.4 GiB"), absent=("data/prepared/ome",)),
    Case("ome-tiff-3d", "ingest", "ZYX stack where a 2D image is needed", NOT_LISTED,
         _with(lambda t: (tif(t / "raw/ome/images/a.tif", np.zeros((5, 16, 16), np.uint8),
                              metadata={"axes": "ZYX"}),
                          tif(t / "raw/ome/masks/a.tif", np.zeros((16, 16), np.uint8)),
                          ome_params(t)), "ingest", "ome"),
         ("images/a.tif", "2D"), absent=("data/prepared/ome",)),
    Case("ingest-unknown-dataset", "ingest", "dataset name not in params.yaml", NOT_LISTED,
         _argv("ingest", "nope"), ("'nope'", "params.yaml")),
    # ------------------------------------------------------------------------ validate
    Case("validate-not-ingested", "validate", "dataset never ingested", NOT_LISTED,
         _argv("validate", "dsb2018"), ("data/prepared/dsb2018", "ingest"),
         absent=("reports/validation",)),
    Case("validate-traversal-manifest", "validate", "manifest with sample_id '../../x'",
         "path traversal (manifest sample_id `../../x`)",
         _with(lambda t: bad_manifest(t), "validate", "dsb2018"),
         ("manifest.parquet", "sample_id '../../x'"), absent=("reports/validation",)),
    # ------------------------------------------------------------------------- predict
    Case("predict-missing-file", "predict", "input that does not exist", NOT_LISTED,
         _with(lambda t: punet_weights(t / "p.pt"),
               "predict", "nope.tif", "--out", "out", "-m", "punet", "--weights", "p.pt"),
         ("nope.tif",), absent=("out",)),
    Case("predict-junk-weights", "predict", "--weights not a weights file (punet)",
         NOT_LISTED,
         _with(lambda t: (stack(t / "s.tif"), junk(t / "w.pt")),
               "predict", "s.tif", "--out", "out", "-m", "punet", "--weights", "w.pt"),
         ("w.pt",), absent=("out",)),
    Case("predict-missing-weights", "predict", "no --weights and no trained model",
         NOT_LISTED, _with(lambda t: stack(t / "s.tif"),
                           "predict", "s.tif", "--out", "out", "-m", "punet"),
         ("models/punet/best.pt", "microseg train"), absent=("out",)),
    Case("predict-pickle-punet", "predict", "--weights a pickle payload (punet)",
         "torch.load(weights_only=False) ran payloads (predict --weights)",
         _with(lambda t: (stack(t / "s.tif"), pickle_payload(t / "w" / "evil.pt")),
               "predict", "s.tif", "--out", "out", "-m", "punet", "--weights", "w/evil.pt"),
         ("evil.pt",), absent=("out",), marker=True),
    Case("predict-pickle-yolo", "predict", "--weights a raw pickle (yolo)",
         "torch.load(weights_only=False) ran payloads (predict --weights)",
         _with(lambda t: (stack(t / "s.tif"), raw_pickle(t / "w" / "evil.pt")),
               "predict", "s.tif", "--out", "out", "-m", "yolo", "--weights", "w/evil.pt"),
         ("evil.pt",), absent=("out",), marker=True),
    Case("predict-pickle-nuclei", "predict", "nuclei model (unet) weights a pickle payload",
         "torch.load(weights_only=False) ran payloads (predict --weights)",
         _with(lambda t: (png(t / "n.png", blob_image()[0]), pickle_payload(t / "w" / "evil.pt")),
               "predict", "n.png", "--out", "out", "-m", "unet", "--weights", "w/evil.pt"),
         ("evil.pt",), absent=("out",), marker=True),
    Case("predict-pickle-tracking", "predict", "tracking model (unet) weights a pickle payload",
         "torch.load(weights_only=False) ran payloads (predict --weights)",
         _with(lambda t: (stack(t / "seq.tif", np.zeros((3, 32, 32), np.uint16)),
                          pickle_payload(t / "w" / "evil.pt")),
               "predict", "seq.tif", "--out", "out", "--task", "tracking", "-m", "unet",
               "--weights", "w/evil.pt"),
         ("evil.pt",), absent=("out",), marker=True),
    Case("predict-nan-stack", "predict", "stack with one NaN voxel (-m punet)",
         "all-NaN predictions silently (predict -m punet wrote NaN JSON)",
         _with(lambda t: (stack(t / "nan.tif", nan_plane=2), punet_weights(t / "p.pt")),
               "predict", "nan.tif", "--out", "out", "-m", "punet", "--weights", "p.pt"),
         ("nan.tif", "plane 2"), absent=("out",)),
    Case("predict-nan-stack-yolo", "predict", "stack with one NaN voxel (yolo)",
         "all-NaN predictions silently (predict)",
         _with(lambda t: (stack(t / "nan.tif", nan_plane=1), yolo_weights(t / "y.pt")),
               "predict", "nan.tif", "--out", "out", "-m", "yolo", "--weights", "y.pt"),
         ("nan.tif", "plane 1"), absent=("out",)),
    Case("predict-2d-for-spines", "predict", "2D image where a ZYX stack is needed",
         NOT_LISTED,
         _with(lambda t: (tif(t / "flat.tif", np.zeros((32, 32), np.uint16)),
                          punet_weights(t / "p.pt")),
               "predict", "flat.tif", "--out", "out", "-m", "punet", "--weights", "p.pt"),
         ("flat.tif", "expected a 3D image"), absent=("out",)),
    Case("predict-rgb-stack", "predict", "RGB ZYX stack for the spine model",
         NOT_LISTED,
         _with(lambda t: (tif(t / "rgb.tif", np.zeros((4, 32, 32, 3), np.uint8),
                              photometric="rgb", metadata={"axes": "ZYXS"}),
                          punet_weights(t / "p.pt")),
               "predict", "rgb.tif", "--out", "out", "-m", "punet", "--weights", "p.pt"),
         ("rgb.tif",), absent=("out",)),
    Case("predict-mixed-folder", "predict", "folder of a text file and a broken TIFF",
         NOT_LISTED,
         _with(lambda t: (junk(t / "in" / "notes.txt", b"hello"),
                          junk(t / "in" / "broken.tif", b"II*\x00 not a tiff"),
                          punet_weights(t / "p.pt")),
               "predict", "in", "--out", "out", "-m", "punet", "--weights", "p.pt"),
         ("broken.tif", "0 of 1 stacks predicted"), code=1, allowed_new=("out/summary.csv",)),
    # ---------------------------------------------------------------------- fuse --input
    Case("fuse-nan-stack", "fuse", "fuse --input on a stack with a NaN voxel",
         "all-NaN predictions silently (fuse --input)",
         _with(lambda t: (stack(t / "nan.tif", nan_plane=1), punet_weights(t / "p.pt"),
                          yolo_weights(t / "y.pt")),
               "fuse", "--input", "nan.tif", "--out", "out", "--yolo-weights", "y.pt",
               "--punet-weights", "p.pt"),
         ("nan.tif", "plane 1", "0 done"), code=1, allowed_new=("out/summary.csv",)),
    Case("fuse-no-out", "fuse", "fuse --input without --out", NOT_LISTED,
         _with(lambda t: stack(t / "s.tif"), "fuse", "--input", "s.tif"), ("--out",)),
    Case("fuse-pickle-weights", "fuse", "fuse --input with pickled YOLO weights",
         NOT_LISTED,
         _with(lambda t: (stack(t / "s.tif"), punet_weights(t / "p.pt"),
                          raw_pickle(t / "w" / "evil.pt")),
               "fuse", "--input", "s.tif", "--out", "out", "--yolo-weights", "w/evil.pt",
               "--punet-weights", "p.pt"),
         ("evil.pt",), absent=("out",), marker=True),
    # ----------------------------------------------------------------------- batch-eval
    Case("batch-eval-unknown-model", "batch-eval", "models:/ URI of no registered model",
         NOT_LISTED,
         _with(lambda t: stack(t / "in" / "s.tif"), "batch-eval", "--model",
               "models:/nope@champion", "--input", "in", "--out", "out"),
         ("nope",), absent=("out",)),
    Case("batch-eval-pickle-model", "batch-eval", "--model a pickle payload file",
         "torch.load(weights_only=False) ran payloads (batch-eval --model)",
         _with(lambda t: (stack(t / "in" / "s.tif"), pickle_payload(t / "w" / "evil.pt")),
               "batch-eval", "--model", "w/evil.pt", "--input", "in", "--out", "out"),
         ("evil.pt",), absent=("out",), marker=True),
    # ---------------------------------------------------------------------------- train
    Case("train-unknown-model", "train", "--model not a family or cells.models entry",
         NOT_LISTED, _argv("train", "--model", "resnet9000"), ("resnet9000",)),
    Case("train-bad-epochs", "train", "-S punet.train.epochs=many",
         "traceback (bad `-S` overrides)",
         _argv("train", "--model", "punet", "-S", "punet.train.epochs=many"), ("epochs",)),
    # ----------------------------------------------------------------------------- tune
    Case("tune-bad-section", "tune", "tune.yolo with an unknown key (n_trails)",
         "traceback (bad `tune.yolo` section)",
         _argv("tune", "--target", "yolo", "-S", "tune.yolo.n_trails=3"), ("n_trails",)),
    Case("tune-unknown-target", "tune", "--target resnet", NOT_LISTED,
         _argv("tune", "--target", "resnet"), ("resnet",)),
    # -------------------------------------------------------------------------- promote
    Case("promote-no-model", "promote", "nothing registered yet", NOT_LISTED,
         _argv("promote", "--task", "spines"), ("microseg-spines",)),
    Case("promote-no-version", "promote", "--version 7 of no registered model", NOT_LISTED,
         _argv("promote", "--task", "nuclei", "--version", "7"), ("microseg-nuclei",)),
    # --------------------------------------------------------------------------- params
    Case("params-set-no-equals", "params", "-S without '='", NOT_LISTED,
         _argv("train", "-S", "seed"), ("--set", "'seed'")),
    Case("params-set-into-value", "params", "-S seed.x=1 (into a value)",
         "traceback (bad `-S` overrides)", _argv("train", "-S", "seed.x=1"),
         ("seed.x", "seed is a value")),
    Case("params-unknown-top-key", "params", "unknown top-level key yollo:",
         "typo ignored",
         _with(lambda t: write_params(t, yollo={"train": {"epochs": 3}}), "where"),
         ("params.yaml", "yollo")),
    Case("params-negative-distance", "params", "spines.match_dist_nm: -1000",
         "typo ignored (accepted)",
         _argv("evaluate", "--model", "otsu", "-S", "spines.match_dist_nm=-1000"),
         ("match_dist_nm",)),
    Case("params-dataset-traversal", "params", "dataset key '../../x'",
         "path traversal (params dataset key `../../x`)",
         _with(lambda t: write_params(t, {"../../x": {"format": "ctc", "source": "x",
                                                      "task": "tracking"}}),
               "ingest", "../../x"),
         ("../../x",)),
    Case("params-unknown-link-key", "params", "unknown tracking.link key", "traceback",
         _argv("track", "--model", "unet", "-S", "tracking.link.foo=1"), ("foo",)),
    Case("params-missing-file", "params", "--params file that does not exist", NOT_LISTED,
         _argv("where", "--params", "nope.yaml"), ("nope.yaml",)),
    Case("params-not-yaml", "params", "params file that is not YAML", NOT_LISTED,
         _with(lambda t: (t / "bad.yaml").write_text("seed: [1, 2\n"),
               "where", "--params", "bad.yaml"), ("bad.yaml",)),
    # ---------------------------------------------------------------------------- where
    Case("where-corrupt-registry", "where", "reports/registry/*.mlflow.json not JSON",
         "traceback (`where` with a corrupt registry JSON)", _with(registry_json, "where"),
         ("spines.mlflow.json", "JSON")),
    # ------------------------------------------------------------------------ visualize
    Case("visualize-scale-200", "visualize", "--scale 200 on a 40x300x300 stack",
         "wrote 8.3 GB (no size limits)",
         _with(lambda t: (stack(t / "s.tif", np.zeros((40, 300, 300), np.uint16)),
                          (t / "p.csv").write_text("z,y,x\n1,10,10\n")),
               "visualize", "s.tif", "p.csv", "--out", "ov", "--scale", "200"),
         ("GiB",), absent=("ov",)),
    Case("visualize-missing-csv", "visualize", "predictions CSV missing", NOT_LISTED,
         _with(lambda t: stack(t / "s.tif"), "visualize", "s.tif", "nope.csv", "--out", "ov"),
         ("nope.csv",), absent=("ov",)),
    # -------------------------------------------------------------------------- dataset
    Case("dataset-add-bad-task", "dataset add", "--task cells", NOT_LISTED,
         _argv("dataset", "add", "x", "--task", "cells", "--format", "coco", "--source", "raw"),
         ("--task", "'cells'")),
    Case("dataset-add-traversal", "dataset add", "name '../../x'",
         "path traversal (params dataset key `../../x`)",
         _argv("dataset", "add", "../../x", "--task", "nuclei", "--format", "png_pairs",
               "--source", "raw"), ("../../x",)),
    Case("dataset-add-bad-split", "dataset add", "--split with two numbers", NOT_LISTED,
         _argv("dataset", "add", "x", "--task", "nuclei", "--format", "png_pairs", "--source",
               "raw", "--split", "0.5,0.5"), ("--split",)),
    Case("dataset-verify-unknown", "dataset verify", "dataset not in params.yaml", NOT_LISTED,
         _argv("dataset", "verify", "nope"), ("nope",)),
]
# fmt: on


# ----------------------------------------------------------------------------- runner
def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``microseg <argv>`` in-process: the exit status and stdout + stderr; an exception that
    escapes ``main`` is returned as its traceback (status -1), which the test then reports."""
    import microseg.cli as cli

    monkeypatch.setattr(sys, "argv", ["microseg", *argv])
    monkeypatch.setattr(cli, "_log_files", False)
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        code, tb = -1, traceback.format_exc()
        captured = capsys.readouterr()
        return code, captured.out + captured.err + tb
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    monkeypatch.chdir(work)
    monkeypatch.setenv("MICROSEG_LOG_DIR", str(work / "logs"))
    monkeypatch.delenv("MICROSEG_DEBUG", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MICROSEG_ALLOW_LARGE", raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # the bomb case's 400x400 PNG
    return work


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail
                  else []) for c in CASES],
)  # fmt: skip
def test_bad_input(case: Case, workdir: Path, monkeypatch, capsys, record_property) -> None:
    argv = case.build(workdir)
    before = _files(workdir)
    code, output = run_main(argv, monkeypatch, capsys)
    record_property("exit_code", code)
    record_property("output", output.strip())
    assert "Traceback" not in output, output
    if case.code is None:
        assert code not in (0, -1), output
    else:
        assert code == case.code, output
    if case.one_line:
        assert len(output.strip().splitlines()) <= 3, output  # (2 lines: MLflow's store)
    for phrase in case.said:
        assert phrase in output, f"{phrase!r} not in: {output}"
    leftovers = [p for p in workdir.parent.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    if case.marker:
        assert not any(workdir.rglob("PWNED")), "the pickle payload ran"
    if code == 0:
        return
    for out in case.absent:
        assert not (workdir / out).exists(), f"{out} was written"
    after = _files(workdir)
    changed = {p for p, stat in after.items() if before.get(p) != stat}
    allowed = (*ALLOWED_NEW, *case.allowed_new)
    unexpected = sorted(p for p in changed if not p.startswith(allowed) and p not in allowed)
    assert not unexpected, f"partial outputs: {unexpected}"
