"""The calibration arithmetic against an independent implementation (ccdproc), and its masks."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from ccdproc import CCDData, flat_correct, subtract_bias, subtract_dark

from gppy_stage.science.reduce import BAD_PIXEL, SATURATED, calibrate


def _images(seed=0, shape=(64, 96)):
    rng = np.random.default_rng(seed)
    bias = 512 + rng.normal(0, 2, shape)
    dark = np.abs(rng.normal(1.0, 0.3, shape))  # ADU accumulated in 100 s
    flat = 1 + 0.1 * rng.standard_normal(shape).clip(-3, 3)
    raw = bias + dark * 0.5 + 1000 * flat + rng.normal(0, 5, shape)
    return raw.astype(np.float32), bias.astype(np.float32), dark.astype(np.float32), flat.astype(np.float32)


def test_matches_ccdproc_with_a_scaled_dark():
    raw, bias, dark, flat = _images()
    ours = calibrate(raw, bias=bias, dark=dark, dark_exptime=100.0, exptime=50.0, flat=flat,
                     gain=0.78, rdnoise=3.0, saturation=65535)
    ccd = CCDData(raw, unit=u.adu)
    ccd = subtract_bias(ccd, CCDData(bias, unit=u.adu))
    ccd = subtract_dark(ccd, CCDData(dark, unit=u.adu), dark_exposure=100 * u.s, data_exposure=50 * u.s,
                        scale=True)
    ccd = flat_correct(ccd, CCDData(flat, unit=u.adu), norm_value=1.0)
    np.testing.assert_allclose(ours.data, ccd.data, rtol=1e-5, atol=1e-3)
    # a flat-fielded frame of a flat source is flat: the dark was scaled by 50/100, not subtracted whole
    assert abs(float(np.median(ours.data)) - 1000) < 1


def test_masks_and_variance():
    raw, bias, dark, flat = _images(seed=1)
    raw[3, 4] = 65535
    flat[5, 6] = 0.05
    dark[7, 8] = 500.0  # 5 ADU/s x 0.78 e-/ADU: a hot pixel
    cal = calibrate(raw, bias=bias, dark=dark, dark_exptime=100.0, exptime=100.0, flat=flat,
                    gain=0.78, rdnoise=3.0, saturation=65535)
    assert cal.mask[3, 4] & SATURATED and cal.mask[5, 6] & BAD_PIXEL and cal.mask[7, 8] & BAD_PIXEL
    assert (cal.mask != 0).sum() == 3
    # Poisson + read noise in ADU^2, divided by the flat squared
    signal_e = (raw[10, 10] - bias[10, 10] - dark[10, 10]) * 0.78
    expected = (signal_e + 9.0) / 0.78**2 / flat[10, 10] ** 2
    assert abs(cal.variance[10, 10] / expected - 1) < 1e-4


def test_cupy_gives_the_numpy_result():
    from gppy_stage.xp import gpu_available

    if not gpu_available():
        pytest.skip("no CuPy or no CUDA device here: the GPU path runs only where one exists")
    import cupy

    raw, bias, dark, flat = _images(seed=2)
    kw = dict(dark_exptime=100.0, exptime=100.0, gain=0.78, rdnoise=3.0, saturation=65535)
    cpu = calibrate(raw, bias=bias, dark=dark, flat=flat, **kw)
    gpu = calibrate(cupy.asarray(raw), bias=cupy.asarray(bias), dark=cupy.asarray(dark), flat=cupy.asarray(flat),
                    xp=cupy, **kw)
    np.testing.assert_allclose(cupy.asnumpy(gpu.data), cpu.data, rtol=1e-6)
    np.testing.assert_array_equal(cupy.asnumpy(gpu.mask), cpu.mask)


def _cosmic_frame(shape=(700, 300), seed=4):
    from gppy_stage.sim import detector, model, render

    rng = np.random.default_rng(seed)
    img = np.full(shape, 900.0, np.float32)
    n = 60
    render.render_stars(img, rng.uniform(0, shape[1], n), rng.uniform(0, shape[0], n), 10 ** rng.uniform(3, 6, n),
                        3.5, 2.5)
    detector.add_noise_adu(img, 0.78, 5.0, rng)
    idx, val, _ = detector.cosmic_rays(shape, 600.0, rng, rate=3 * model.CR_RATE)
    img.reshape(-1)[idx] += val / 0.78
    mask = np.zeros(shape, np.uint8)
    mask[300:302, 50:90] = BAD_PIXEL
    return img, mask, idx


def test_cosmic_rays_in_strips_are_the_whole_frames():
    """Strips with overlapping borders, in threads, give astroscrappy's whole-frame answer."""
    import astroscrappy

    from gppy_stage.science.reduce import remove_cosmic_rays, strips

    img, mask, idx = _cosmic_frame()
    kw = dict(gain=0.78, rdnoise=5.0, saturation=60000.0)
    assert len(strips(img.shape[0], 150)) == 5
    cleaned, crmask = remove_cosmic_rays(img, mask, workers=2, strip_rows=150, **kw)
    whole_mask, whole_clean = astroscrappy.detect_cosmics(
        img, inmask=mask != 0, gain=0.78, readnoise=5.0, satlevel=60000.0, sigclip=4.5, sigfrac=0.3, objlim=5.0,
        niter=4, sepmed=True, cleantype="meanmask", fsmode="median")
    assert whole_mask.sum() > 200
    np.testing.assert_array_equal(crmask, whole_mask)
    np.testing.assert_allclose(cleaned, whole_clean, atol=1e-3)
    assert cleaned.dtype == np.float32
    truth = np.zeros(img.shape, bool)
    truth.reshape(-1)[idx] = True
    assert (crmask & truth).sum() / truth.sum() > 0.9


def test_cosmic_rays_on_cupy_match_the_cpu():
    from gppy_stage.science.reduce import remove_cosmic_rays
    from gppy_stage.xp import gpu_available

    if not gpu_available():
        pytest.skip("no CuPy or no CUDA device here: the GPU path runs only where one exists")
    import cupy

    img, mask, _ = _cosmic_frame()
    kw = dict(gain=0.78, rdnoise=5.0, saturation=60000.0)
    cpu_clean, cpu_mask = remove_cosmic_rays(img, mask, **kw)
    gpu_clean, gpu_mask = remove_cosmic_rays(cupy.asarray(img), cupy.asarray(mask), xp=cupy, **kw)
    gpu_mask = cupy.asnumpy(gpu_mask)
    assert (gpu_mask & cpu_mask).sum() >= 0.95 * cpu_mask.sum()
    assert (gpu_mask & cpu_mask).sum() >= 0.95 * gpu_mask.sum()
