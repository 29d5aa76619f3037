"""Rendering the sky into pixels: Moffat stars in small stamps, a Sersic galaxy, the sky.

Images here are in flat-fielded ADU (the units in which a frame's zero point is defined);
the detector module turns them into raw counts."""

from __future__ import annotations

import math

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from scipy.signal import fftconvolve

from . import detector, model

MAX_STAMP_RADIUS = 250


def pixel_scale_arcsec(wcs: WCS) -> float:
    return float(math.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)


def stamp_radius(flux: float, alpha: float, beta: float, floor_adu: float = 0.02) -> int:
    """Radius where the Moffat wing falls below floor_adu per pixel (at least 3 FWHM)."""
    peak = max(flux, 1e-9) * (beta - 1.0) / (math.pi * alpha * alpha)
    r = alpha * max(peak / floor_adu, 1.0) ** (1.0 / (2.0 * beta))
    fwhm = 2.0 * alpha * math.sqrt(2.0 ** (1.0 / beta) - 1.0)
    return int(min(MAX_STAMP_RADIUS, max(3.0 * fwhm, r)) + 1)


def add_moffat(image: np.ndarray, x: float, y: float, flux: float, alpha: float, beta: float,
               radius: int | None = None) -> None:
    """Add one Moffat source of total flux `flux` centred at 0-based (x, y), in a stamp, in place."""
    ny, nx = image.shape
    r = radius if radius is not None else stamp_radius(flux, alpha, beta)
    ix, iy = int(round(x)), int(round(y))
    x0, x1 = max(0, ix - r), min(nx, ix + r + 1)
    y0, y1 = max(0, iy - r), min(ny, iy + r + 1)
    if x0 >= x1 or y0 >= y1:
        return
    dx = np.arange(x0, x1, dtype=np.float64) - x
    dy = np.arange(y0, y1, dtype=np.float64) - y
    r2 = dy[:, None] ** 2 + dx[None, :] ** 2
    norm = flux * (beta - 1.0) / (math.pi * alpha * alpha)
    image[y0:y1, x0:x1] += (norm * (1.0 + r2 / (alpha * alpha)) ** (-beta)).astype(image.dtype)


def moffat_kernel(alpha: float, beta: float, radius: int) -> np.ndarray:
    k = np.zeros((2 * radius + 1, 2 * radius + 1))
    add_moffat(k, radius, radius, 1.0, alpha, beta, radius)
    return k / k.sum()


def render_stars(image: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                 fwhm_px: float, beta: float) -> int:
    """Add point sources at 0-based pixel positions; sources whose stamp misses the image are
    skipped. Returns how many were drawn."""
    alpha = model.moffat_alpha(fwhm_px, beta)
    ny, nx = image.shape
    drawn = 0
    for xi, yi, fi in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float)):
        if not (np.isfinite(xi) and np.isfinite(yi)) or fi <= 0:
            continue
        r = stamp_radius(fi, alpha, beta)
        if xi < -r or yi < -r or xi > nx - 1 + r or yi > ny - 1 + r:
            continue
        add_moffat(image, xi, yi, fi, alpha, beta, r)
        drawn += 1
    return drawn


def render_galaxy(image: np.ndarray, x: float, y: float, flux: float, r_eff_px: float, sersic_n: float,
                  axis_ratio: float, pa_deg: float, fwhm_px: float, beta: float) -> None:
    """Add a PSF-convolved Sersic galaxy of total flux `flux` (within 6 r_eff) at 0-based (x, y)."""
    half = int(6 * r_eff_px + 4 * fwhm_px) + 2
    sub = 3  # sub-sample the cuspy centre
    ax = (np.arange(-half * sub, (half + 1) * sub) + 0.5) / sub - 0.5 - (x - round(x))
    ay = (np.arange(-half * sub, (half + 1) * sub) + 0.5) / sub - 0.5 - (y - round(y))
    yy, xx = np.meshgrid(ay, ax, indexing="ij")
    pa = math.radians(pa_deg)
    u = xx * math.cos(pa) + yy * math.sin(pa)
    v = -xx * math.sin(pa) + yy * math.cos(pa)
    rr = np.sqrt(u**2 + (v / axis_ratio) ** 2)
    bn = 2.0 * sersic_n - 1.0 / 3.0 + 0.009876 / sersic_n
    prof = np.exp(-bn * ((rr / r_eff_px) ** (1.0 / sersic_n) - 1.0)) * (rr <= 6 * r_eff_px)
    n = 2 * half + 1
    prof = prof.reshape(n, sub, n, sub).sum(axis=(1, 3))
    prof *= flux / prof.sum()
    alpha = model.moffat_alpha(fwhm_px, beta)
    conv = fftconvolve(prof, moffat_kernel(alpha, beta, int(4 * fwhm_px) + 2), mode="same")
    ix, iy = int(round(x)), int(round(y))
    ny, nx = image.shape
    x0, x1 = ix - half, ix + half + 1
    y0, y1 = iy - half, iy + half + 1
    cx0, cy0 = max(0, -x0), max(0, -y0)
    cx1, cy1 = n - max(0, x1 - nx), n - max(0, y1 - ny)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    image[max(0, y0):min(ny, y1), max(0, x0):min(nx, x1)] += conv[cy0:cy1, cx0:cx1].astype(image.dtype)


def render_sky(shape: tuple[int, int], wcs: WCS, stars: Table, fwhm_arcsec: float, sky_adu: float, zp: float,
               *, beta: float = 2.8, mag_col: str = "mag", rng: np.random.Generator | None = None,
               gain: float = 0.78, rdnoise: float = 3.0, sky_gradient: tuple[float, float] = (0.0, 0.0),
               dtype=np.float32) -> np.ndarray:
    """A frame of stars on a sky, in flat-fielded ADU.

    stars: a table with `ra`, `dec` (deg) and `mag_col` (AB); flux = 10**(-0.4 (mag - zp)) ADU.
    The sky is sky_adu per pixel times (1 + gx * x' + gy * y'), x', y' in -0.5..0.5 across the frame.
    Without rng the image is the noise-free expectation; with rng it gets Poisson noise (in
    electrons, through gain) and Gaussian read noise, and is returned in ADU, bias-free.
    """
    ny, nx = shape
    image = np.empty(shape, dtype)
    gx, gy = sky_gradient
    xs = (np.arange(nx) / max(nx - 1, 1) - 0.5) * gx
    ys = (np.arange(ny) / max(ny - 1, 1) - 0.5) * gy
    image[...] = (sky_adu * (1.0 + ys[:, None] + xs[None, :])).astype(dtype)
    if len(stars):
        x, y = wcs.all_world2pix(np.asarray(stars["ra"], float), np.asarray(stars["dec"], float), 0)
        flux = 10 ** (-0.4 * (np.asarray(stars[mag_col], float) - zp))
        render_stars(image, x, y, flux, fwhm_arcsec / pixel_scale_arcsec(wcs), beta)
    if rng is not None:
        detector.add_noise_adu(image, gain, rdnoise, rng)
    return image
