"""Which kind of microscopy image this is, from its pixels alone.

The DSB 2018 kinds: colour (H&E-stained tissue), greyscale with a bright background
(brightfield) and greyscale with a dark one (fluorescence). Post-processing chosen per kind on
validation (:class:`~microseg.infer.watershed.PostprocessConfig` ``by_modality``) needs the
same answer at prediction time, where no manifest says what an image is, so the search and the
predictor both ask this function.
"""

from __future__ import annotations

import numpy as np

MODALITIES = ("fluorescence", "brightfield", "tissue")

#: share of the value range by which colour channels must differ to count as colour (a grey
#: image saved as RGB repeats one value, up to rounding)
COLOUR_TOLERANCE = 0.02


def image_modality(image: np.ndarray) -> str:
    """``tissue`` for a colour image (``YXC``, 3 or 4 channels whose first three differ),
    ``brightfield`` for grey on a bright background (median above half the maximum), else
    ``fluorescence``."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        rgb = img[..., :3].astype(np.float32)
        span = float(rgb.max() - rgb.min()) or 1.0
        if float(np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).mean()) > COLOUR_TOLERANCE * span:
            return "tissue"
        img = rgb.mean(axis=-1)
    elif img.ndim != 2:
        img = img.reshape(-1, *img.shape[-2:]).mean(axis=0)  # CYX / ZYX: their mean plane
    img = img.astype(np.float32)
    return "brightfield" if float(np.median(img)) > 0.5 * float(img.max()) else "fluorescence"
