"""Finding and measuring sources on a difference image, for ``science.detect.detect_candidates``.

``extract`` finds them on the matched-filter S/N map (``detect.snr_map``) and refines their
centroids on the data; ``psf_flux`` and ``half_light_fwhm`` measure them. Each takes the arrays
``detect._prepared`` makes (data and noise 0 where bad, a bad-pixel mask) and positions in
0-based pixels; a negative source (``sign`` -1) is measured as its negation.
"""

from __future__ import annotations

import math

import numpy as np

from gppy_stage.science.kernel import SIGMA_PER_FWHM


def extract(d, snr, bad, *, fwhm, threshold, minarea, sign):
    """Sources where ``sign * snr`` stays above ``threshold`` on ``minarea`` pixels; shapes from
    the S/N map (the PSF convolved once more), centroids refined on the data itself with sep's
    windowed centroid (better than isophotal to ~0.1 px)."""
    import sep

    # a difference image holds few sources: a bounded pixel stack, not one sized by the frame.
    # sep allocates and touches the whole stack on every extract, so the setting is put back
    # after: left at 5 M pixels it cost each 180-px cut-out of host association 0.2 GB of faults.
    pixstack = sep.get_extract_pixstack()
    sep.set_extract_pixstack(int(min(max(300000, snr.size // 4), 5_000_000)))
    if sign < 0:  # the caller's own working copies: flipped in place and back, not copied
        np.negative(d, out=d)
        np.negative(snr, out=snr)
    try:
        objs = sep.extract(snr, threshold, mask=bad, minarea=minarea, filter_kernel=None, deblend_cont=0.005,
                           clean=True)
        if len(objs):
            xw, yw, f = sep.winpos(d, objs["x"], objs["y"], fwhm * SIGMA_PER_FWHM, mask=bad)
            ok = (f == 0) & np.isfinite(xw) & (np.hypot(xw - objs["x"], yw - objs["y"]) < fwhm)
            objs["x"] = np.where(ok, xw, objs["x"])
            objs["y"] = np.where(ok, yw, objs["y"])
    finally:
        sep.set_extract_pixstack(pixstack)
        if sign < 0:
            np.negative(d, out=d)
            np.negative(snr, out=snr)
    return objs


def psf_flux(data, err, bad, x, y, fwhm):
    """Optimal (PSF-weighted, Gaussian PSF) flux and error at each position."""
    h = int(math.ceil(2 * fwhm))
    ny, nx = data.shape
    s2 = (fwhm * SIGMA_PER_FWHM) ** 2
    out = np.full((len(x), 2), np.nan)
    for i, (xi, yi) in enumerate(zip(x, y)):
        cx, cy = int(round(xi)), int(round(yi))
        y0, y1, x0, x1 = max(cy - h, 0), min(cy + h + 1, ny), max(cx - h, 0), min(cx + h + 1, nx)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        p = np.exp(-((xx - xi) ** 2 + (yy - yi) ** 2) / (2 * s2)) / (2 * np.pi * s2)
        good = ~bad[y0:y1, x0:x1]
        w = np.where(good, 1.0 / np.where(good, err[y0:y1, x0:x1], 1.0).astype(float) ** 2, 0.0)
        den = (p * p * w).sum()
        if den > 0:
            out[i] = (p * data[y0:y1, x0:x1] * w).sum() / den, 1.0 / math.sqrt(den)
    return out[:, 0], out[:, 1]


def half_light_fwhm(data, bad, x, y, negative, fwhm):
    """Twice the half-light radius of each sign-corrected source within 2 ``fwhm``: its FWHM for
    a Gaussian. ``data`` is negated in place for the negative ones and put back: a second
    full-frame copy only for the few negatives would cost more."""
    rh = np.full(len(x), np.nan)
    if (~negative).any():
        rh[~negative] = _half_light_radius(data, bad, x[~negative], y[~negative], fwhm)
    if negative.any():
        np.negative(data, out=data)
        try:
            rh[negative] = _half_light_radius(data, bad, x[negative], y[negative], fwhm)
        finally:
            np.negative(data, out=data)
    return 2.0 * rh


def _half_light_radius(data, bad, x, y, fwhm):
    import sep

    r, _ = sep.flux_radius(data, x, y, np.full(len(x), 2.0 * fwhm), 0.5, mask=bad, subpix=5)
    return r


def positions(cat, wcs) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) pixel arrays from a table/structured array with x,y or ra,dec (+ wcs)."""
    names = cat.colnames if hasattr(cat, "colnames") else cat.dtype.names
    if "x" in names:
        return np.asarray(cat["x"], float), np.asarray(cat["y"], float)
    if "ra" in names and wcs is not None:
        x, y = wcs.world_to_pixel_values(np.asarray(cat["ra"], float), np.asarray(cat["dec"], float))
        return np.asarray(x, float), np.asarray(y, float)
    raise ValueError("a catalogue needs x,y columns, or ra,dec columns and a WCS")
