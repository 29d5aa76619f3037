"""The master combine against an independent implementation (ccdproc), and bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from gppy_stage.science.combine import sigma_clipped_median
from gppy_stage.xp import gpu_available


def _frames(seed=0, n=9, shape=(200, 300)):
    rng = np.random.default_rng(seed)
    stack = rng.normal(512.0, 3.85, size=(n, *shape)).astype(np.float32)
    # outliers of the kind a combine must reject: cosmic rays, a satellite trail in one frame
    for i in range(n):
        y, x = rng.integers(0, shape[0], 40), rng.integers(0, shape[1], 40)
        stack[i, y, x] += rng.uniform(200, 3000, 40)
    stack[2, min(50, shape[0] - 1), :] += 800
    return stack


def test_matches_ccdproc_sigma_clipped_median():
    import astropy.units as u
    from ccdproc import CCDData, combine

    stack = _frames()
    ours, n = sigma_clipped_median(stack, sigma=3.0, iterations=1)
    theirs = combine([CCDData(f, unit=u.adu) for f in stack], method="median", sigma_clip=True,
                     sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
                     sigma_clip_func=np.ma.median, sigma_clip_dev_func=np.ma.std)
    # ccdproc clips around the median with the std, then takes the median of what is left: the same method
    np.testing.assert_allclose(ours, theirs.data, atol=1e-3)
    assert n.min() >= 6 and (n[50] <= 8).mean() > 0.95  # the trail was rejected nearly everywhere


def test_rejects_outliers_and_keeps_noise_of_a_median():
    stack = _frames(seed=1)
    med, _ = sigma_clipped_median(stack)
    assert abs(float(np.mean(med)) - 512.0) < 0.05
    assert float(med[50].max()) < 530  # no trail left
    assert float(med.std()) < 1.3 * 3.85 / 3  # about a median's efficiency over 9 frames


def test_nan_pixels_are_ignored():
    stack = _frames(seed=2, n=5, shape=(20, 20))
    stack[:, 0, 0] = np.nan
    stack[0, 1, 1] = np.nan
    med, n = sigma_clipped_median(stack)
    assert np.isnan(med[0, 0]) and n[0, 0] == 0
    assert np.isfinite(med[1, 1]) and n[1, 1] <= 4


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CuPy or no CUDA device here: the GPU path runs only where one exists")
def test_cupy_gives_the_numpy_result():
    import cupy

    stack = _frames(seed=3)
    cpu, ncpu = sigma_clipped_median(stack)
    gpu, ngpu = sigma_clipped_median(cupy.asarray(stack), xp=cupy)
    np.testing.assert_allclose(cupy.asnumpy(gpu), cpu, atol=1e-4)
    np.testing.assert_array_equal(cupy.asnumpy(ngpu), ncpu)
