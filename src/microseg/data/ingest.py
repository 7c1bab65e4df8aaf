"""``microseg ingest``: native datasets into the canonical layout of DESIGN.md.

Each native format has an ingester registered by name; it writes ``images/``, ``labels/`` and
``points/`` into a temporary folder and returns manifest rows. Only when every sample has been
read and checked is the folder renamed to ``data/prepared/<dataset>``: bad input raises a
:class:`~microseg.errors.MicrosegError` and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from microseg.config import DatasetConfig, SplitConfig
from microseg.data.manifest import normalise, write_manifest
from microseg.data.stats import image_stats, label_stats
from microseg.errors import (
    AnnotationError,
    DataFormatError,
    MissingFileError,
    ShapeMismatchError,
)
from microseg.io import coco, ctc, d3set, deepd3, dsb, png, points, tiff
from microseg.utils.atomic import atomic_path
from microseg.utils.processes import worker_pool
from microseg.utils.registry import Registry

log = logging.getLogger(__name__)

Ingester = Callable[[str, DatasetConfig, Path, int, int], list[dict]]
#: dataset format -> its ingester (``@register("format")``)
INGESTERS: Registry[Ingester] = Registry("dataset format")

#: semantic classes of the spine task's label image
SPINE_CLASSES = {"background": 0, "dendrite": 1, "spine": 2}


def register(name: str) -> Callable[[Ingester], Ingester]:
    return INGESTERS.register(name)


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def assign_splits(
    ids: list[str], split: SplitConfig, seed: int, strata: list[str] | None = None
) -> dict[str, str]:
    """Deterministic, stratified split: order by a seeded hash, then cut by the fractions.

    Hash order (not a RNG over list position) keeps a sample's split stable when others are
    added or removed, so a growing dataset does not leak test images into training.
    """
    strata = strata or ["all"] * len(ids)
    out: dict[str, str] = {}
    for stratum in sorted(set(strata)):
        members = [i for i, s in zip(ids, strata, strict=True) if s == stratum]
        members.sort(key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
        n = len(members)
        n_val = round(n * split.val)
        n_test = round(n * split.test)
        if n >= 3:  # every split gets a member of every stratum that can afford it
            n_val, n_test = (
                max(n_val, 1 if split.val > 0 else 0),
                max(n_test, 1 if split.test > 0 else 0),
            )
        for k, sid in enumerate(members):
            out[sid] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return out


def ingest(
    name: str, cfg: DatasetConfig, prepared_root: Path, seed: int, workers: int | None = None
) -> Path:
    """Ingest one dataset; returns the prepared folder."""
    source = Path(cfg.source)
    if not source.exists():
        raise MissingFileError(
            "dataset source not found (run `dvc pull` for raw data or `microseg synth`)", source
        )
    out = Path(prepared_root) / name
    with atomic_path(out) as tmp:
        for sub in ("images", "labels", "points"):
            (tmp / sub).mkdir(parents=True)
        workers = workers or min(4, os.cpu_count() or 1)
        rows = INGESTERS.get(cfg.format)(name, cfg, tmp, seed, workers)
        manifest = normalise(rows).sort_values("sample_id").reset_index(drop=True)
        write_manifest(manifest, tmp)
    log.info("ingested %d samples of %s into %s", len(rows), name, out)
    return out


def _row(name: str, cfg: DatasetConfig, sample_id: str, split: str, source: Path, **fields) -> dict:
    return {
        "sample_id": sample_id,
        "dataset": name,
        "task": cfg.task,
        "split": split,
        "source_path": str(source),
        "source_md5": file_md5(source) if source.is_file() else "",
        **fields,
    }


def _voxel_fields(voxel_size_nm: tuple[float, float, float] | None) -> dict[str, float]:
    z, y, x = voxel_size_nm if voxel_size_nm is not None else (np.nan,) * 3
    return {"voxel_size_z_nm": z, "voxel_size_y_nm": y, "voxel_size_x_nm": x}


# ------------------------------------------------------------------------- 2D instances
def _instance_2d_row(
    out: Path, sid: str, image: np.ndarray, labels: np.ndarray, src: Path, modality: str
) -> dict:
    """Write one 2D image + instance label pair and describe it (DSB, COCO, PNG pairs)."""
    if image.shape[:2] != labels.shape:
        raise ShapeMismatchError(f"labels have shape {labels.shape}, image {image.shape}", src)
    tiff.check_finite(image, src)
    tiff.write_stack(out / "images" / f"{sid}.tif", image)
    tiff.write_stack(out / "labels" / f"{sid}.tif", labels)
    channel_axis = 2 if image.ndim == 3 else None
    return {
        "sample_id": sid,
        "image_path": f"images/{sid}.tif",
        "label_path": f"labels/{sid}.tif",
        "label_kind": "instance",
        "axes": "YXC" if channel_axis is not None else "YX",
        "modality": modality,
        "source_path": str(src),
        "source_md5": file_md5(src),
        **image_stats(image, channel_axis),
        **label_stats(labels),
    }


def _finish_2d(name: str, cfg: DatasetConfig, rows: list[dict], seed: int) -> list[dict]:
    ids = [r["sample_id"] for r in rows]
    splits = assign_splits(ids, cfg.split, seed, strata=[r["modality"] for r in rows])
    for r in rows:
        r.update(dataset=name, task=cfg.task, split=splits[r["sample_id"]])
        r.update(_voxel_fields(cfg.voxel_size_nm))
    return rows


def _dsb_one(args: tuple[Path, str, Path]) -> dict:
    root, sid, out = args
    sample = dsb.read_dsb_sample(root, sid)
    src = sample.image_path if sample.image_path is not None else root / sid
    return _instance_2d_row(out, sid, sample.image, sample.labels, src, sample.modality)


@register("dsb2018")
def ingest_dsb(name: str, cfg: DatasetConfig, out: Path, seed: int, workers: int) -> list[dict]:
    """DSB 2018 folders, published or compact layout (detected); split stratified by modality
    so tissue images reach every split."""
    root = Path(cfg.source)
    ids = dsb.list_dsb_samples(root)
    jobs = [(root, sid, out) for sid in ids]
    if workers > 1:
        with worker_pool(workers) as pool:
            rows = list(tqdm(pool.map(_dsb_one, jobs, chunksize=4), total=len(jobs), desc=name))
    else:
        rows = [_dsb_one(j) for j in tqdm(jobs, desc=name)]
    return _finish_2d(name, cfg, rows, seed)


@register("coco")
def ingest_coco(name: str, cfg: DatasetConfig, out: Path, seed: int, workers: int) -> list[dict]:
    """COCO instance JSON (``cfg.annotations``) with its images under ``cfg.source``."""
    ann_path = Path(cfg.annotations or Path(cfg.source) / "annotations.json")
    coco_dict = coco.read_coco(ann_path)
    missing = [a["id"] for a in coco_dict["annotations"] if "segmentation" not in a]
    if missing:
        raise AnnotationError(
            f"annotations {missing[:10]} have no 'segmentation': nuclei need instance masks",
            ann_path,
        )
    nameless = [im["id"] for im in coco_dict["images"] if "file_name" not in im]
    if nameless:  # valid COCO for results, but ingest reads each image from its file
        raise AnnotationError(
            f"images {nameless[:10]} have no 'file_name': ingest reads each image from it",
            ann_path,
        )
    stems = Counter(Path(im["file_name"]).stem for im in coco_dict["images"])
    clash = sorted(s for s, n in stems.items() if n > 1)
    if clash:  # one sample id per image: a second image would overwrite the first
        raise AnnotationError(
            f"images share the file stem(s) {clash[:10]} (sample ids); rename them", ann_path
        )
    rows = []
    for img in tqdm(coco_dict["images"], desc=name):
        src = Path(cfg.source) / img["file_name"]
        image = png.read_image(src)
        labels = coco.coco_to_labels(coco_dict, img["id"])
        sid = Path(img["file_name"]).stem
        rows.append(_instance_2d_row(out, sid, image, labels, src, dsb.modality_of(image)))
    return _finish_2d(name, cfg, rows, seed)


@register("png_pairs")
def ingest_png_pairs(
    name: str, cfg: DatasetConfig, out: Path, seed: int, workers: int
) -> list[dict]:
    """``images/*.png`` with masks ``masks/<same stem>.png``, read as ``cfg.mask_kind`` says:
    instance ids kept, or binary masks split into 4-connected components (objects that share
    an edge merge: see :func:`microseg.io.png.instance_labels`). The manifest records which."""
    rows = []
    for image_path, mask_path in tqdm(png.list_png_pairs(cfg.source), desc=name):
        image, mask = png.read_png_pair(image_path, mask_path)
        labels, kind = png.instance_labels(mask, cfg.mask_kind, mask_path)
        row = _instance_2d_row(
            out, image_path.stem, image, labels, image_path, dsb.modality_of(image)
        )
        rows.append(row | {"mask_kind": kind})
    kinds = Counter(r["mask_kind"] for r in rows)
    log.info(
        "%s: masks read as %s (mask_kind %s; binary = 4-connected components)",
        name,
        ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
        cfg.mask_kind,
    )
    return _finish_2d(name, cfg, rows, seed)


#: image files of format ``ome-tiff`` (anything io.bioformats reads); masks: same stem
MICROSCOPE_SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".czi", ".nd2", ".lif")


def _microscope_stem(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in (*MICROSCOPE_SUFFIXES, ".png"):
        if name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _microscope_pairs(source: Path) -> list[tuple[Path, Path]]:
    """``images/<stem>.<ext>`` with ``masks/<stem>.<tif|png|...>``; unmatched stems named."""
    images_dir, masks_dir = source / "images", source / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise MissingFileError("expected images/ and masks/ folders", d)
    images = {s: p for p in sorted(images_dir.iterdir()) if (s := _microscope_stem(p))}
    masks = {s: p for p in sorted(masks_dir.iterdir()) if (s := _microscope_stem(p))}
    if not images:
        raise MissingFileError(f"no images ({', '.join(MICROSCOPE_SUFFIXES)})", images_dir)
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        raise ShapeMismatchError(
            f"images and masks must pair by stem; unmatched: {unmatched[:10]}", source
        )
    return [(images[s], masks[s]) for s in sorted(images)]


@register("ome-tiff")
def ingest_microscope(
    name: str, cfg: DatasetConfig, out: Path, seed: int, workers: int
) -> list[dict]:
    """Microscope files (OME-TIFF, CZI, ND2, LIF, TIFF) through bioio: ``cfg.channel`` of each
    image, its pixel size from the metadata (``voxel_size_nm`` overrides), masks read as
    ``cfg.mask_kind`` says (as ``png_pairs``)."""
    from microseg.io.bioformats import read_image

    rows, sizes = [], {}
    for image_path, mask_path in tqdm(_microscope_pairs(Path(cfg.source)), desc=name):
        data = read_image(image_path, channel=cfg.channel, keep_time=False)
        if str(data.dims) not in ("YX", "YXC"):
            raise ShapeMismatchError(
                f"expected a 2D image (YX), this file's selection has axes {data.dims}", image_path
            )
        mask = np.squeeze(read_image(mask_path, keep_time=False).array)
        labels, kind = png.instance_labels(np.asarray(mask), cfg.mask_kind, mask_path)
        image = np.asarray(data.array)
        sid = _microscope_stem(image_path) or image_path.stem
        row = _instance_2d_row(out, sid, image, labels, image_path, dsb.modality_of(image))
        rows.append(row | {"mask_kind": kind})
        if data.pixel_size_um is not None:
            sizes[sid] = (np.nan, *(1e3 * float(v) for v in data.pixel_size_um[-2:]))
    rows = _finish_2d(name, cfg, rows, seed)
    if cfg.voxel_size_nm is None:  # each file's own pixel size
        for r in rows:
            if r["sample_id"] in sizes:
                r.update(_voxel_fields(sizes[r["sample_id"]]))
    return rows


# ------------------------------------------------------------------------------------ spines
def semantic_spine_labels(dendrite: np.ndarray, spine: np.ndarray) -> np.ndarray:
    """One uint8 label volume: 0 background, 1 dendrite, 2 spine (spine wins on overlap)."""
    lab = np.zeros(dendrite.shape, np.uint8)
    lab[dendrite.astype(bool)] = SPINE_CLASSES["dendrite"]
    lab[spine.astype(bool)] = SPINE_CLASSES["spine"]
    return lab


def _spine_sample(
    name: str,
    cfg: DatasetConfig,
    out: Path,
    sid: str,
    split: str,
    source: Path,
    image: np.ndarray,
    labels: np.ndarray,
    voxel_nm: tuple[float, float, float],
    pts: pd.DataFrame | None,
) -> dict:
    tiff.check_finite(image, source)
    tiff.write_stack(out / "images" / f"{sid}.tif", image, voxel_size_nm=voxel_nm)
    tiff.write_stack(out / "labels" / f"{sid}.tif", labels, voxel_size_nm=voxel_nm)
    n_inst = None
    points_path = ""
    if pts is not None:
        points.write_points(out / "points" / f"{sid}.csv", pts)
        points_path, n_inst = f"points/{sid}.csv", len(pts)
    else:
        from scipy import ndimage

        n_inst = int(ndimage.label(labels == SPINE_CLASSES["spine"])[1])
    return _row(
        name,
        cfg,
        sid,
        split,
        source,
        image_path=f"images/{sid}.tif",
        label_path=f"labels/{sid}.tif",
        label_kind="semantic",
        points_path=points_path,
        axes="ZYX",
        modality="two-photon",
        **image_stats(image),
        **label_stats(labels, n_inst),
        **_voxel_fields(voxel_nm),
    )


@register("synthetic_spines")
def ingest_spines(name: str, cfg: DatasetConfig, out: Path, seed: int, workers: int) -> list[dict]:
    """d3set train/val stacks keep their split; the benchmark stack is the test split."""
    root = Path(cfg.source)
    rows = []
    for split in ("train", "val"):
        path = root / f"{split}.d3set"
        ds = d3set.read_d3set(path)
        for i, key in enumerate(tqdm(sorted(ds.stacks, key=lambda k: int(k[1:])), desc=split)):
            meta = ds.meta.iloc[i]
            voxel = (float(meta.Resolution_Z) * 1000, *(float(meta.Resolution_XY) * 1000,) * 2)
            labels = semantic_spine_labels(ds.dendrites[key], ds.spines[key])
            pts_path = root / "points" / f"{split}_{key}.csv"
            pts = (
                points.read_points(pts_path, shape=labels.shape, allow_empty=True)
                if pts_path.exists()
                else None
            )
            rows.append(
                _spine_sample(
                    name,
                    cfg,
                    out,
                    f"{split}_{key}",
                    split,
                    path,
                    ds.stacks[key],
                    labels,
                    voxel,
                    pts,
                )
            )
    bench = root / "benchmark"
    stack_path = bench / "stack.tif"
    with tiff.open_stack(stack_path) as st:
        image = st.asarray()
        voxel = st.voxel_size_nm or cfg.voxel_size_nm
    masks = {}
    for part in ("dendrite", "spine"):
        path = bench / f"{part}_mask.tif"
        masks[part] = tiff.read_stack(path)
        if masks[part].shape != image.shape:
            raise ShapeMismatchError(
                f"mask has shape {masks[part].shape}, expected the stack's {image.shape}", path
            )
    labels = semantic_spine_labels(masks["dendrite"], masks["spine"])
    pts = points.read_points(bench / "spines.csv", shape=image.shape)
    rows.append(
        _spine_sample(name, cfg, out, "benchmark", "test", stack_path, image, labels, voxel, pts)
    )
    return rows


def _spine_voxel(
    stack_voxel: tuple[float, float, float] | None,
    cfg_voxel: tuple[float, float, float] | None,
    path: Path,
) -> tuple[float, float, float]:
    """The TIFF's own voxel size, axes it leaves out (NaN) taken from the dataset entry."""
    if stack_voxel is None and cfg_voxel is None:
        raise DataFormatError(
            "no voxel size in the TIFF metadata; set voxel_size_nm (z, y, x) in the dataset "
            "entry (DeepD3's benchmark pitch is 94 nm in xy)",
            path,
        )
    own = stack_voxel if stack_voxel is not None else (np.nan,) * 3
    fill = cfg_voxel if cfg_voxel is not None else (np.nan,) * 3
    voxel = tuple(float(a) if np.isfinite(a) else float(b) for a, b in zip(own, fill, strict=True))
    if not np.isfinite(voxel).all():
        raise DataFormatError(
            f"the TIFF metadata gives the voxel size {own} (z, y, x) nm; set voxel_size_nm in "
            "the dataset entry for the missing axes",
            path,
        )
    return voxel  # type: ignore[return-value]


def _write_spine_layout(
    out: Path,
    files: deepd3.DeepD3Files,
    image: np.ndarray,
    voxel: tuple[float, float, float],
    pts: pd.DataFrame,
    raters: dict[str, tuple[np.ndarray, np.ndarray]],
    consensus: tuple[np.ndarray, np.ndarray],
) -> None:
    """The ``synthetic_spines`` source layout inside the prepared folder: the stages that read
    a spine dataset's native files (YOLO conversion, Prob-UNet data, inter-rater) find them
    there (``Params.dataset_source``), and every rater mask is kept."""
    shutil.copyfile(files.training, out / "train.d3set")  # d3sets as they are
    shutil.copyfile(files.validation, out / "val.d3set")
    tiff.write_stack(out / "benchmark" / "stack.tif", image, voxel_size_nm=voxel)
    points.write_points(out / "benchmark" / "spines.csv", pts)
    spine, dendrite = consensus
    for stem, mask in (("spine_mask", spine), ("dendrite_mask", dendrite)):
        tiff.write_stack(out / "benchmark" / f"{stem}.tif", mask.astype(np.uint8), voxel)
    for rater, (sp, de) in raters.items():
        for head, mask in (("spines", sp), ("dendrites", de)):
            tiff.write_stack(
                out / "raters" / f"rater{rater}_{head}.tif", mask.astype(np.uint8), voxel
            )
    for head, mask in (("spines", spine), ("dendrites", dendrite)):
        tiff.write_stack(out / "raters" / f"consensus_{head}.tif", mask.astype(np.uint8), voxel)


@register("deepd3")
def ingest_deepd3(name: str, cfg: DatasetConfig, out: Path, seed: int, workers: int) -> list[dict]:
    """The DeepD3 dataset's own files (io/deepd3.py): training/validation d3sets keep their
    split, the benchmark stack is the test split with the raters' majority vote as its labels
    and one point per annotation cluster (centroid; pixels and nm).

    DeepD3 has no points for the d3set stacks; ``points/{train,val}_x<i>.csv`` beside the
    files (the synthetic generator writes them) give them theirs, which validation needs;
    without them each stack's points are its spine mask's 3D components (centroids)."""
    files = deepd3.find_files(cfg.source)
    with tiff.open_stack(files.benchmark, expect_ndim=3) as st:
        image = st.asarray()
        voxel = _spine_voxel(st.voxel_size_nm, cfg.voxel_size_nm, files.benchmark)
    clicks = deepd3.read_annotations(files.annotations, image.shape)
    pts = deepd3.collapse_clusters(clicks, voxel)
    raters = {
        r: (deepd3.read_rater_mask(sp, image.shape), deepd3.read_rater_mask(de, image.shape))
        for r, (sp, de) in files.raters.items()
    }
    consensus = (
        deepd3.majority([sp for sp, _ in raters.values()]),
        deepd3.majority([de for _, de in raters.values()]),
    )
    rows = []
    for split, path in (("train", files.training), ("val", files.validation)):
        ds = d3set.read_d3set(path)
        for i, key in enumerate(tqdm(ds.stack_keys(), desc=split)):
            meta = ds.meta.iloc[i]
            stack_voxel = (
                float(meta.Resolution_Z) * 1000,
                *(float(meta.Resolution_XY) * 1000,) * 2,
            )
            labels = semantic_spine_labels(ds.dendrites[key], ds.spines[key])
            pts_path = Path(cfg.source) / "points" / f"{split}_{key}.csv"
            if pts_path.is_file():
                stack_pts = points.read_points(pts_path, shape=labels.shape, allow_empty=True)
            else:  # a real DeepD3 download: the spine mask's components are the points
                stack_pts = deepd3.points_from_mask(ds.spines[key], stack_voxel)
            rows.append(
                _spine_sample(
                    name, cfg, out, f"{split}_{key}", split, path, ds.stacks[key], labels,
                    stack_voxel, stack_pts,
                )
            )  # fmt: skip
    labels = semantic_spine_labels(consensus[1], consensus[0])
    rows.append(
        _spine_sample(
            name, cfg, out, "benchmark", "test", files.benchmark, image, labels, voxel, pts
        )
    )
    (out / "benchmark").mkdir()
    (out / "raters").mkdir()
    _write_spine_layout(out, files, image, voxel, pts, raters, consensus)
    return rows


# ---------------------------------------------------------------------------------- tracking
@register("ctc")
def ingest_ctc(name: str, cfg: DatasetConfig, out: Path, seed: int, workers: int) -> list[dict]:
    """Whole sequences are samples: the last is test, the one before val, the rest train."""
    root = Path(cfg.source)
    seqs = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    if not seqs:
        raise MissingFileError("no CTC sequence folders (01, 02, ...) found", root)
    splits = {s: "train" for s in seqs}
    if len(seqs) >= 3:
        splits[seqs[-1]], splits[seqs[-2]] = "test", "val"
    rows = []
    for s in tqdm(seqs, desc=name):
        seq = ctc.read_ctc_gt(root, s)
        tiff.check_finite(seq.frames, root / s)
        sid = f"seq{s}"
        tiff.write_stack(out / "images" / f"{sid}.tif", seq.frames)
        tiff.write_stack(out / "labels" / f"{sid}.tif", seq.tra)
        ctc.write_track_file(out / "labels" / f"{sid}_tracks.txt", seq.tracks)
        rows.append(
            _row(
                name,
                cfg,
                sid,
                splits[s],
                root / f"{s}_GT" / "TRA" / "man_track.txt",
                image_path=f"images/{sid}.tif",
                label_path=f"labels/{sid}.tif",
                label_kind="instance",
                axes="TYX",
                modality="fluorescence",
                **image_stats(seq.frames),
                **label_stats(seq.tra, n_instances=len(seq.tracks)),
                **_voxel_fields(cfg.voxel_size_nm),
            )
        )
    return rows
