import numpy as np
import pytest

from microseg.errors import AnnotationError, MicrosegError, ShapeMismatchError
from microseg.utils.units import to_nm, voxel_size


def test_bad_points_and_voxel_sizes_are_named() -> None:
    with pytest.raises(ShapeMismatchError, match="shape"):
        to_nm(np.zeros((2, 2)), (1, 1, 1))
    with pytest.raises(AnnotationError, match="1 row"):
        to_nm([[0, 0, np.nan]], (1, 1, 1))
    for bad in ((1, 1), (1, 0, 1), (1, np.inf, 1)):
        with pytest.raises(MicrosegError, match="voxel_size_nm"):
            voxel_size(bad)


def test_old_import_path_still_works() -> None:
    from microseg.evaluate import points
    from microseg.utils import units

    assert points.to_nm is units.to_nm and points.VoxelSize is units.VoxelSize
