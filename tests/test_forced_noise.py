"""Errors of forced photometry where the difference's noise is correlated by its kernel.

Truth: synthetic cut-outs with a point source of known flux on sky (Gaussian PSFs, Gaussian
noise of known variance). Where the frame is sharper than the reference, the difference
convolves the frame: its per-pixel variance shrinks by the kernel's sum of squares while an
aperture sum's does not, so errors from the per-pixel variance alone are several times too small.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gppy_stage.science import forced
from gppy_stage.science.kernel import SIGMA_PER_FWHM
from test_forced import _gauss as _gauss_on

SHAPE = (160, 160)
X0, Y0 = 80.3, 79.6


def _gauss(xs, ys, fluxes, fwhm):
    return _gauss_on(SHAPE, xs, ys, fluxes, fwhm)


def _pulls(method: str, fwhm_frame: tuple[float, float], fwhm_ref: float, n_epochs: int, seed: int):
    """(pulls with the correlation, pulls with the per-pixel errors alone, whose image was convolved)."""
    rng = np.random.default_rng(seed)
    # stamp stars for the native engine, clear of the source
    gx, gy = np.meshgrid(np.arange(16, SHAPE[1], 32) + 0.3, np.arange(16, SHAPE[0], 32) - 0.2)
    sx, sy = gx.ravel() + rng.uniform(-3, 3, gx.size), gy.ravel() + rng.uniform(-3, 3, gx.size)
    keep = np.hypot(sx - X0, sy - Y0) > 20
    sx, sy, sf = sx[keep], sy[keep], rng.uniform(3e4, 1e5, keep.sum())
    ref_model = _gauss(sx, sy, sf, fwhm_ref)
    ref_var = np.full(SHAPE, 3.0) + ref_model / 20  # deeper than a frame
    none = np.zeros(SHAPE, bool)
    pulls, raw, convolved = [], [], set()
    for f_true in np.linspace(0, 4000, n_epochs):
        fwhm = rng.uniform(*fwhm_frame)
        model = 200.0 + _gauss(np.r_[sx, X0], np.r_[sy, Y0], np.r_[sf, f_true], fwhm)
        var = model + 25.0
        new = model + rng.normal(0, np.sqrt(var))
        ref = ref_model + rng.normal(0, np.sqrt(ref_var))
        if method == "native":
            d = forced.native_difference(new, var, none, ref, ref_var, none,
                                         settings={"new_fwhm": fwhm, "ref_fwhm": fwhm_ref})
        else:
            d = forced.gaussian_difference(new, var, none, ref, ref_var, none, fwhm, fwhm_ref)
        assert d.method == method
        convolved.add(d.convolved)
        broad = max(fwhm, fwhm_ref)  # the difference's PSF
        radius = 1.5 * broad
        corr = 1 / (1 - math.exp(-radius**2 / (2 * (broad * SIGMA_PER_FWHM) ** 2)))
        flux, err, ok = forced.forced_flux(d, X0, Y0, radius, corr)
        assert ok
        pulls.append((flux - f_true) / err)
        raw.append((flux - f_true) / forced.aperture_flux(d.diff, d.noise, d.mask, X0, Y0, radius, corr)[1])
    (which,) = convolved
    return np.array(pulls), np.array(raw), which


@pytest.mark.parametrize("method", ["native", "gaussian"])
@pytest.mark.parametrize("fwhm_frame,fwhm_ref,convolved", [((2.4, 3.0), 4.6, "new"), ((4.6, 5.2), 3.0, "ref")])
def test_forced_errors_include_the_kernels_correlation(method, fwhm_frame, fwhm_ref, convolved):
    """Pulls against the injected fluxes have zero mean and unit spread whichever image the
    difference convolved; where it was the frame, the per-pixel errors alone give a spread > 2."""
    pulls, raw, which = _pulls(method, fwhm_frame, fwhm_ref, n_epochs=60, seed=1)
    print(f"{method}, {which} convolved: mean pull {pulls.mean():+.3f}, spread {pulls.std():.3f}; "
          f"per-pixel errors alone: spread {raw.std():.3f}")
    assert which == convolved
    assert abs(pulls.mean()) <= 0.3
    assert 0.8 <= pulls.std() <= 1.25
    if convolved == "new":
        assert raw.std() > 2.0  # the test sees the correlation


def test_aperture_variance_matches_the_scatter_of_convolved_noise():
    """An off-centre kernel on noise whose variance grows across the box, two aperture pixels
    masked: the variance of 4000 aperture sums (as ``aperture_flux`` takes them) matches
    ``aperture_variance`` within 5 % (its sampling error is 2.2 %), where a kernel applied the
    wrong way round is 14 % off."""
    import sep
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(3)
    shape, x, y, radius = (48, 48), 23.3, 24.6, 5.5
    var = np.linspace(1.0, 12.0, shape[1])[None, :].repeat(shape[0], 0)
    yy, xx = np.mgrid[-5:6, -5:6]
    k = np.exp(-((xx - 2.0) ** 2 + (yy + 1.0) ** 2) / (2 * 1.6**2))
    k /= k.sum()
    mask = np.zeros(shape, bool)
    mask[24, 21:23] = True
    other = np.full(shape, 0.5)
    sums = []
    for _ in range(4000):
        img = fftconvolve(rng.normal(0, np.sqrt(var)), k, mode="same") + rng.normal(0, np.sqrt(other))
        img = np.ascontiguousarray(np.where(mask, 0.0, img))
        sums.append(sep.sum_circle(img, [x], [y], radius, subpix=5)[0][0])
    d = forced.Difference(np.zeros(shape), np.ones(shape), mask, "gaussian", "new", 1.0, 3.0,
                          kernel=k, var_convolved=var, var_other=other)
    predicted = forced.aperture_variance(d, x, y, radius)
    flipped = forced.aperture_variance(forced.Difference(**(vars(d) | {"kernel": k[::-1, ::-1]})), x, y, radius)
    measured = float(np.var(sums))
    print(f"aperture variance: measured {measured:.1f}, predicted {predicted:.1f}, kernel flipped {flipped:.1f}")
    assert predicted == pytest.approx(measured, rel=0.05)
    assert abs(flipped / measured - 1) > 0.1
