"""data/transforms.py reproduces every normalisation it replaced, bit for bit.

The ``_old_*`` functions are the implementations as they were at commit 610e2b0 (the call
sites in data/targets.py, data/patches.py, data/yolo_convert.py, models/classical/dog.py and
infer/blobs.py); each is pinned against the function that now serves that call site.
"""

import numpy as np
import pytest
from scipy import ndimage as ndi

from microseg.data import transforms as tf
from microseg.errors import ConfigError, ShapeMismatchError


# -- the replaced implementations, verbatim -----------------------------------------------------
def _old_targets_percentile_normalise(image, lower=1.0, upper=99.0, eps=1e-6):
    x = tf.to_chw(image).astype(np.float32)
    out = np.empty_like(x)
    for c in range(x.shape[0]):
        lo, hi = np.percentile(x[c], (lower, upper))
        scale = float(hi - lo)
        if not np.isfinite(scale) or scale <= eps:
            out[c] = 0.0
            continue
        out[c] = (x[c] - np.float32(lo)) * np.float32(1.0 / scale)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _old_patches_normalize(x, lo, hi):
    scale = hi - lo if hi > lo else 1.0
    return ((np.asarray(x, dtype=np.float32) - np.float32(lo)) / np.float32(scale)).astype(
        np.float32, copy=False
    )


def _old_percentile_range(values, percentiles=(1.0, 99.8)):
    lo, hi = np.percentile(np.asarray(values, dtype=np.float32), list(percentiles))
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def _old_to_uint8(plane, lo, hi):
    scaled = (np.asarray(plane, dtype=np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _old_normalise_percentiles(stack, percentiles=(1.0, 99.8)):
    x = np.asarray(stack, dtype=np.float32)
    lo, hi = np.percentile(x, percentiles)
    scale = float(hi - lo)
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    x = x - np.float32(lo)
    x *= np.float32(1.0 / scale)
    return x


def _old_normalize_stack(stack, mode="stack", percentiles=(1.0, 99.8), background_sigma=None):
    img = np.asarray(stack, dtype=np.float32)
    if background_sigma:
        img = img - ndi.gaussian_filter(img, sigma=(0, background_sigma, background_sigma))
    if mode is None:
        return img
    axis = None if mode == "stack" else (1, 2)
    lo, hi = np.percentile(img, percentiles, axis=axis, keepdims=True)
    scale = np.where(hi > lo, hi - lo, 1.0)
    return np.clip((img - lo) / scale, 0.0, 1.0).astype(np.float32)


# -- inputs -------------------------------------------------------------------------------------
def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 4000, (24, 31)).astype(np.uint16)
    extreme = grey.copy()
    extreme[0, :3] = (0, 65535, 65535)
    extreme[5:9, 5:9] = 65535
    floats = rng.normal(100.0, 20.0, (24, 31)).astype(np.float32)
    floats[0, 0], floats[1, 1] = -3e37, 3e37
    tiny = np.full((24, 31), 1.0, np.float32)
    tiny[::2] += np.float32(1e-7)  # a contrast below eps = 1e-6
    colour = rng.integers(0, 256, (24, 31, 3)).astype(np.uint8)
    colour[..., 1] = 17  # one flat channel
    return {
        "grey": grey,
        "extreme": extreme,
        "floats": floats,
        "flat": np.full((24, 31), 7, np.uint16),
        "tiny": tiny,
        "colour_yxc": colour,
        "colour_cyx": np.moveaxis(colour, -1, 0).copy(),
        "rgba": rng.random((24, 31, 4)).astype(np.float32),
    }


def _stacks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    stack = rng.poisson(30.0, (5, 20, 22)).astype(np.uint16)
    stack[2, 3, 4:6] = 60000  # a bright spine far above p99.8
    one_flat = stack.astype(np.float32)
    one_flat[3] = 12.0  # a plane without contrast (per-plane normalisation)
    extreme = rng.normal(0.0, 1.0, (4, 16, 16)).astype(np.float32)
    extreme[0, 0, :4] = (-1e30, 1e30, 3e35, -3e35)
    return {
        "stack": stack,
        "one_flat_plane": one_flat,
        "extreme": extreme,
        "flat": np.full((3, 8, 9), 250, np.uint8),
    }


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()  # bit for bit, signed zeros included


# -- pins ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(_images()))
@pytest.mark.parametrize("q", [(1.0, 99.0), (0.0, 100.0), (2.0, 98.5)])
def test_nuclei_input_normalisation_unchanged(name: str, q: tuple[float, float]) -> None:
    image = _images()[name]
    want = _old_targets_percentile_normalise(image, *q)
    _same(tf.percentile_normalise(image, *q), want)
    norm = tf.PercentileNormalise(q, clip=True, flat="zero", channel_wise=True, eps=1e-6)
    _same(norm(tf.to_chw(image)), want)


def test_flat_and_low_contrast_channels_become_zero() -> None:
    imgs = _images()
    assert not tf.percentile_normalise(imgs["flat"]).any()
    assert not tf.percentile_normalise(imgs["tiny"]).any()
    out = tf.percentile_normalise(imgs["colour_yxc"])
    assert not out[1].any() and out[0].max() == 1.0 and out[2].min() == 0.0


@pytest.mark.parametrize("name", list(_stacks()))
@pytest.mark.parametrize("q", [(1.0, 99.8), (0.0, 100.0)])
def test_spine_stack_normalisations_unchanged(name: str, q: tuple[float, float]) -> None:
    stack = _stacks()[name]
    lo, hi = tf.intensity_range(stack, q)
    _same(tf.normalize(stack, lo, hi), _old_patches_normalize(stack, lo, hi))
    assert tf.percentile_range(stack, q) == _old_percentile_range(stack, q)
    lo8, hi8 = tf.sample_percentiles(stack, q)
    assert (lo8, hi8) == _old_percentile_range(stack, q)  # small stacks: every pixel sampled
    for z in range(len(stack)):
        _same(tf.to_uint8(stack[z], lo8, hi8), _old_to_uint8(stack[z], lo8, hi8))
    _same(tf.normalise_percentiles(stack, q), _old_normalise_percentiles(stack, q))
    for mode in ("stack", "plane", None):
        for bg in (None, 2.0):
            _same(tf.normalize_stack(stack, mode, q, bg), _old_normalize_stack(stack, mode, q, bg))


def test_old_import_paths_are_the_new_functions() -> None:
    from microseg.data import patches, targets, yolo_convert
    from microseg.infer import blobs, yolo_predict
    from microseg.models.classical import dog

    for module, names in (
        (targets, ("to_chw", "percentile_normalise", "match_channels")),
        (patches, ("intensity_range", "normalize")),
        (yolo_convert, ("percentile_range", "to_uint8")),
        (dog, ("normalise_percentiles",)),
        (blobs, ("normalize_stack",)),
        (yolo_predict, ("sample_percentiles",)),
    ):
        for name in names:
            assert getattr(module, name) is getattr(tf, name), (module.__name__, name)


def test_unclipped_modes_keep_bright_outliers() -> None:
    stack = _stacks()["stack"]
    lo, hi = tf.intensity_range(stack)
    out = tf.rescale(stack, lo, hi, clip=False, flat="shift", arithmetic="divide32")
    assert out.max() > 100 and out.dtype == np.float32
    np.testing.assert_allclose(out, (stack - lo) / (hi - lo), rtol=1e-6)


def test_flat_rules() -> None:
    x = np.array([[5.0, 5.0], [5.0, 9.0]])
    # "shift": scale 1, so the flat bulk is 0 and the outlier keeps its offset
    np.testing.assert_array_equal(tf.rescale(x, 5.0, 5.0, clip=False, flat="shift"), x - 5.0)
    assert not tf.rescale(x, 5.0, 5.0, clip=False, flat="zero").any()
    # per row: only the flat row is affected
    lo, hi = np.array([[0.0], [5.0]]), np.array([[10.0], [5.0]])
    got = tf.rescale(x, lo, hi, clip=True, flat="zero")
    np.testing.assert_allclose(got, [[0.5, 0.5], [0.0, 0.0]])
    assert tf.percentile_range(np.full(10, 3.0)) == (3.0, 4.0)
    for arithmetic in ("reciprocal", "divide32", "divide64"):
        got = tf.rescale(np.array([0.0, 2.0, 4.0]), 0.0, 4.0, clip=True, flat="shift",
                         gain=255.0, arithmetic=arithmetic)  # fmt: skip
        np.testing.assert_allclose(got, [0.0, 127.5, 255.0])
    with pytest.raises(ConfigError, match="flat"):
        tf.rescale(x, 0, 1, clip=True, flat="none")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="arithmetic"):
        tf.PercentileNormalise(clip=True, flat="zero", arithmetic="exact")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="percentiles"):
        tf.PercentileNormalise((99.0, 1.0), clip=True, flat="zero")


def test_percentile_normalise_is_a_plain_callable() -> None:
    norm = tf.PercentileNormalise((1.0, 99.8), clip=False, flat="shift")
    stack = _stacks()["stack"]
    _same(norm(stack), _old_normalise_percentiles(stack))
    assert "flat='shift'" in repr(norm)


def test_channels() -> None:
    rng = np.random.default_rng(0)
    yxc = rng.random((20, 30, 3)).astype(np.float32)
    assert tf.to_chw(yxc).shape == (3, 20, 30)
    assert tf.to_chw(yxc[..., 0]).shape == (1, 20, 30)
    assert tf.to_chw(np.zeros((20, 30, 4))).shape == (3, 20, 30)
    assert tf.to_chw(np.zeros((2, 20, 30))).shape == (2, 20, 30)
    with pytest.raises(ShapeMismatchError):
        tf.to_chw(np.zeros((2, 3, 4, 5)))
    grey = tf.to_chw(yxc[..., 0])
    np.testing.assert_array_equal(tf.match_channels(grey, 3), np.repeat(grey, 3, axis=0))
    np.testing.assert_allclose(tf.match_channels(tf.to_chw(yxc), 1)[0], yxc.mean(-1), rtol=1e-6)
    assert tf.match_channels(grey, 1) is grey
    with pytest.raises(ShapeMismatchError):
        tf.match_channels(np.zeros((2, 4, 4)), 3)
