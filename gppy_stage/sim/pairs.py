"""Seeded synthetic image pairs for the subtraction tests and the benchmark.

Stars are rendered analytically (Gaussian or Moffat), each normalised so that its pixels sum
to exactly its flux: the truth a test compares against is then the flux actually in the image.
Noise is Poisson (on sky + stars, in electrons) plus Gaussian read noise; the returned
variance is the *expected* variance of the noiseless model, which is what a subtraction's
noise image should reproduce.
"""

from __future__ import annotations

import numpy as np

from ..science.kernel import SIGMA_PER_FWHM


def psf_stamp(dx: float, dy: float, fwhm: float, half: int, beta: float | None = None) -> np.ndarray:
    """Unit-sum PSF on a (2*half+1)^2 grid, centred at (dx, dy) from the middle pixel."""
    y, x = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    r2 = (x - dx) ** 2 + (y - dy) ** 2
    if beta is None:
        s = fwhm * SIGMA_PER_FWHM
        p = np.exp(-0.5 * r2 / s**2)
    else:
        alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
        p = (1.0 + r2 / alpha**2) ** (-beta)
    return p / p.sum()


def render(shape, x, y, flux, fwhm, *, beta=None, half=None) -> np.ndarray:
    """Noiseless image of point sources; ``fwhm`` may be a scalar or one value per source."""
    img = np.zeros(shape, float)
    fwhm = np.broadcast_to(np.asarray(fwhm, float), np.shape(x))
    ny, nx = shape
    for xi, yi, fi, wi in zip(np.atleast_1d(x), np.atleast_1d(y), np.atleast_1d(flux), np.atleast_1d(fwhm)):
        h = half or int(np.ceil(4 * wi if beta is None else 6 * wi))
        cx, cy = int(round(xi)), int(round(yi))
        p = fi * psf_stamp(xi - cx, yi - cy, wi, h, beta)
        y0, y1, x0, x1 = cy - h, cy + h + 1, cx - h, cx + h + 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1, sx1 = p.shape[0] - max(0, y1 - ny), p.shape[1] - max(0, x1 - nx)
        if sy1 <= sy0 or sx1 <= sx0:
            continue
        img[max(y0, 0):min(y1, ny), max(x0, 0):min(x1, nx)] += p[sy0:sy1, sx0:sx1]
    return img


def noisy(model: np.ndarray, *, gain: float, read_noise: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """(image, expected variance) in ADU for a noiseless model in ADU."""
    electrons = rng.poisson(np.clip(model, 0, None) * gain).astype(float)
    img = (electrons + rng.normal(0.0, read_noise, model.shape)) / gain
    var = np.clip(model, 0, None) / gain + (read_noise / gain) ** 2
    return img, var


def make_pair(
    shape=(512, 512),
    *,
    n_stars: int = 250,
    fwhm_new: float = 4.0,
    fwhm_ref: float = 2.5,
    flux_scale: float = 1.3,
    sky_new: float = 1200.0,
    sky_ref: float = 1000.0,
    gain: float = 1.0,
    read_noise: float = 5.0,
    beta: float | None = None,
    fwhm_new_gradient: float = 0.0,
    inject=(),
    new_only_shift=None,
    flux_range=(2e3, 2e5),
    margin: int = 12,
    seed: int = 0,
) -> dict:
    """A (new, ref) pair on the same grid.

    ``flux_scale`` = new/ref flux ratio of every constant star. ``fwhm_new_gradient`` makes the
    new image's FWHM vary linearly with x by that fraction from left to right edge (a slowly
    varying PSF). ``inject`` is a list of (x, y, flux_in_ref_units) sources present only in the
    new image (rendered there with flux * flux_scale). ``new_only_shift`` = {index: (dx, dy)}
    moves some stars in the new image only (misalignment / motion tests).
    Returns a dict: new, ref, new_var, ref_var, x, y, flux (ref units), inject, and the settings.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    x = rng.uniform(margin, nx - 1 - margin, n_stars)
    y = rng.uniform(margin, ny - 1 - margin, n_stars)
    # log-uniform fluxes: many faint, a few bright, like a real field
    flux = np.exp(rng.uniform(np.log(flux_range[0]), np.log(flux_range[1]), n_stars))
    fw_new = fwhm_new * (1.0 + fwhm_new_gradient * (x / (nx - 1) - 0.5))
    xn, yn = x.copy(), y.copy()
    for i, (dx, dy) in (new_only_shift or {}).items():
        xn[i] += dx
        yn[i] += dy
    ref_model = sky_ref + render(shape, x, y, flux, fwhm_ref, beta=beta)
    new_model = sky_new + render(shape, xn, yn, flux * flux_scale, fw_new, beta=beta)
    inject = [tuple(map(float, s)) for s in inject]
    if inject:
        ix, iy, iflux = (np.array(v) for v in zip(*inject))
        ifw = fwhm_new * (1.0 + fwhm_new_gradient * (ix / (nx - 1) - 0.5))
        new_model += render(shape, ix, iy, iflux * flux_scale, ifw, beta=beta)
    new, new_var = noisy(new_model, gain=gain, read_noise=read_noise, rng=rng)
    ref, ref_var = noisy(ref_model, gain=gain, read_noise=read_noise, rng=rng)
    return dict(new=new, ref=ref, new_var=new_var, ref_var=ref_var, x=x, y=y, flux=flux,
                x_new=xn, y_new=yn, inject=inject, flux_scale=flux_scale, fwhm_new=fwhm_new,
                fwhm_ref=fwhm_ref, sky_new=sky_new, sky_ref=sky_ref)
