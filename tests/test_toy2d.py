"""The four 2-D toy sets: shapes, dtype, determinism, the first values (stable across runs/versions), structure."""
import numpy as np
import pytest

from moekernels.data.toy2d import DATASETS, dino_points, get_dataset

FIRST = {  # first two rows of the 100,000-point sets (float32)
    "circle": [[1.3061609268188477, 2.7078216075897217], [-0.028793690726161003, 3.023280143737793]],
    "dino": [[-2.347043991088867, 0.7537657022476196], [0.5299329161643982, -2.4447245597839355]],
    "line": [[1.0958242416381836, 3.510985851287842], [-0.2444862425327301, 3.5809781551361084]],
    "moons": [[1.7407301664352417, -1.5832256078720093], [2.2178232669830322, -1.4060792922973633]],
}


@pytest.fixture(scope="module")
def sets():
    return {k: get_dataset(k) for k in DATASETS}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_shape_dtype_finite(sets, name):
    a = sets[name]
    assert a.shape == (100_000, 2) and a.dtype == np.float32
    assert np.isfinite(a).all()


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_deterministic_and_first_values(sets, name):
    np.testing.assert_array_equal(sets[name], get_dataset(name))
    np.testing.assert_allclose(sets[name][:2], np.array(FIRST[name], dtype=np.float32), rtol=0, atol=1e-6)


def test_small_n_is_a_different_draw_but_valid():
    for k in DATASETS:
        a = get_dataset(k, 1000)
        assert a.shape == (1000, 2)


def test_line_ranges(sets):
    a = sets["line"]
    assert a[:, 0].min() >= -2 and a[:, 0].max() <= 2 and a[:, 1].min() >= -4 and a[:, 1].max() <= 4
    # uniform: the means are near 0 and the variances near (4^2/12, 8^2/12)
    np.testing.assert_allclose(a.var(0), [16 / 12, 64 / 12], rtol=0.02)


def test_circle_is_16_blobs_plus_origin(sets):
    a = sets["circle"].astype(np.float64)
    g = np.arange(-2, 3) * 0.2  # the rounded grid of the generator, times 2
    dirs = np.array([(x, y) for x in g for y in g if (x, y) != (0, 0)])
    dirs = np.unique(np.round(dirs / np.linalg.norm(dirs, axis=1, keepdims=True), 9), axis=0)
    assert len(dirs) == 16
    centres = np.vstack([3 * dirs, [[0.0, 0.0]]])
    d = np.linalg.norm(a[:, None, :] - centres[None], axis=2)
    assert d.min(1).max() <= 3 * 0.03 + 1e-5  # every point lies in a blob of radius 0.09
    counts = np.bincount(d.argmin(1), minlength=17)
    assert (counts > 0).all()


def test_dino_points_and_scaling(sets):
    pts = dino_points()
    assert pts.shape == (142, 2)
    np.testing.assert_allclose(pts[0], [55.3846, 97.1795])
    a = sets["dino"].astype(np.float64)
    raw = np.stack(((pts[:, 0] / 54 - 1) * 4, (pts[:, 1] / 48 - 1) * 4), 1)
    d = np.abs(a[:, None, :] - raw[None]).max(2).min(1)
    assert np.median(d) < 0.15 * 4 / 48 * 3  # each point is a jittered copy of a dino point


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("spiral")
