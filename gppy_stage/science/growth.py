"""The growth curve of a frame's bright stars: median flux in growing apertures and its Moffat
fit, which give the seeing, the aperture of best signal-to-noise and each aperture's correction
to total flux (the first SExtractor pass of :func:`photometry.photometry`).

Pure functions on arrays and Tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from scipy.optimize import least_squares


def growth_diameters(pixscale: float, n: int = 30) -> np.ndarray:
    """First-pass aperture diameters (pixels): 1 px to 40" (at least 40 px)."""
    dmax = max(40.0 / pixscale, 40.0)
    return np.geomspace(1.0, dmax, n)


def moffat_fraction(radius, alpha: float, beta: float):
    """Fraction of a Moffat profile's flux inside ``radius``."""
    return 1.0 - (1.0 + (np.asarray(radius, float) / alpha) ** 2) ** (1.0 - beta)


def moffat_fwhm(alpha: float, beta: float) -> float:
    return 2.0 * alpha * np.sqrt(2.0 ** (1.0 / beta) - 1.0)


@dataclass
class GrowthCurve:
    diameters: np.ndarray  # px
    curve: np.ndarray  # median flux(d) / flux(d_ref)
    snr: np.ndarray  # median S/N at each diameter
    best_diameter: float  # px, the aperture of best S/N
    alpha: float  # Moffat fit (px)
    beta: float
    reference_diameter: float
    nstars: int

    @property
    def fwhm(self) -> float:
        return moffat_fwhm(self.alpha, self.beta)

    def correction(self, diameter: float) -> float:
        """Aperture correction (mag, >= 0) from ``diameter`` to total flux."""
        return float(-2.5 * np.log10(moffat_fraction(diameter / 2.0, self.alpha, self.beta)))


def growth_curve(cat: Table, stars: np.ndarray, diameters: np.ndarray, fwhm_px: float) -> GrowthCurve:
    """Median growth curve of ``stars`` and its Moffat fit (apertures beyond ~6 FWHM are left
    out of the fit: there a small background error outweighs the missing wings)."""
    flux = np.asarray(cat["FLUX_APER"], float)[stars]
    err = np.asarray(cat["FLUXERR_APER"], float)[stars]
    d_ref = diameters[np.argmin(np.abs(diameters - 4.0 * fwhm_px))]
    iref = int(np.argmin(np.abs(diameters - d_ref)))
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = flux / flux[:, iref:iref + 1]
        snr = np.where(err > 0, flux / err, 0)
    curve = np.nanmedian(norm, axis=0)
    snr_med = np.nanmedian(snr, axis=0)
    best = float(diameters[int(np.nanargmax(snr_med))])
    use = (diameters <= 6.0 * fwhm_px) & (diameters >= 0.5 * fwhm_px) & np.isfinite(curve)

    def resid(p):
        alpha, beta = np.exp(p[0]), 1.0 + np.exp(p[1])
        model = moffat_fraction(diameters[use] / 2, alpha, beta) / moffat_fraction(d_ref / 2, alpha, beta)
        return model - curve[use]

    alpha0 = fwhm_px / (2 * np.sqrt(2 ** (1 / 3.0) - 1))
    fit = least_squares(resid, [np.log(alpha0), np.log(2.0)], bounds=([np.log(0.1), np.log(0.05)], [np.log(1e3), np.log(50.0)]))
    alpha, beta = float(np.exp(fit.x[0])), float(1.0 + np.exp(fit.x[1]))
    return GrowthCurve(diameters, curve, snr_med, best, alpha, beta, float(d_ref), int(stars.sum()))
