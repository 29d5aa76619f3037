"""Host association: each candidate's most likely host, an extended source of the reference image.

``associate(ref, x, y, fwhm=..., pixel_scale=..., zp=...)`` extracts the sources of the reference
around each candidate (a cut-out, so a full-size reference is never copied whole), keeps the
extended ones (half-light radius above ``EXTENDED_RH`` FWHM) and picks the one
of smallest *directional light radius* offset (Sullivan et al. 2006; Gupta et al. 2016): the
offset divided by the host's isophotal ellipse (SExtractor's A, B, THETA scaled by 3) in the
direction of the candidate, so a big galaxy farther away beats a small one nearer. Its columns:
``host_x``, ``host_y`` (px on the reference's grid), ``host_sep`` (arcsec), ``host_dlr``
(offset / directional light radius: about 1 at the galaxy's visible edge), ``host_mag`` (Kron
magnitude on ``zp``), ``host_rh`` (half-light radius, arcsec). A candidate with no extended
source within ``search_arcsec`` has NaN there and ``host_x`` = -1.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.table import Table

EXTENDED_RH = 1.0  # half-light radius / PSF FWHM above which a source is a galaxy (a Moffat star's is 0.5-0.75)
ELLIPSE_SCALE = 3.0  # SExtractor's A, B are second-moment sizes; 3 of them reach the isophotal edge
COLUMNS = ("host_x", "host_y", "host_sep", "host_dlr", "host_mag", "host_rh")


def _sources(cut, bad, fwhm: float, threshold: float):
    import sep

    data = np.ascontiguousarray(cut, dtype=np.float32)
    bkg = sep.Background(data, mask=bad, bw=64, bh=64)
    data = data - bkg.back()
    rms = bkg.globalrms
    objs = sep.extract(data, threshold, err=rms, mask=bad, minarea=max(5, int(fwhm**2)), deblend_cont=0.01)
    if len(objs) == 0:
        return data, objs, np.zeros(0), np.zeros(0)
    rh, _ = sep.flux_radius(data, objs["x"], objs["y"], 6.0 * np.maximum(objs["a"], 1.0), 0.5, mask=bad,
                            normflux=None, subpix=5)
    kr, _ = sep.kron_radius(data, objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"], 6.0, mask=bad)
    kr = np.where(np.isfinite(kr) & (kr > 0), kr, 3.5)
    flux, _, _ = sep.sum_ellipse(data, objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"], 2.5 * kr,
                                 mask=bad, subpix=1)
    return data, objs, rh, flux


def associate(ref, x, y, *, fwhm: float, pixel_scale: float, zp: float, mask=None, search_arcsec: float = 15.0,
              threshold: float = 3.0) -> Table:
    """Each candidate's host (see module docstring): one row per (x, y), 0-based px of ``ref``."""
    x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    out = Table({c: np.full(len(x), np.nan) for c in COLUMNS})
    out["host_x"][:] = out["host_y"][:] = -1
    ny, nx = ref.shape
    r_search = search_arcsec / pixel_scale
    half = int(math.ceil(max(3 * r_search, 64)))  # room for a host's own extent and a background around it
    for i, (xi, yi) in enumerate(zip(x, y)):
        if not (np.isfinite(xi) and np.isfinite(yi)):
            continue
        x0, x1 = max(int(xi) - half, 0), min(int(xi) + half + 1, nx)
        y0, y1 = max(int(yi) - half, 0), min(int(yi) + half + 1, ny)
        if x1 - x0 < 16 or y1 - y0 < 16:
            continue
        cut = np.asarray(ref[y0:y1, x0:x1], dtype=np.float32)
        bad = ~np.isfinite(cut)
        if mask is not None:
            bad |= np.asarray(mask[y0:y1, x0:x1], bool)
        cut = np.where(bad, 0, cut).astype(np.float32)
        _, objs, rh, flux = _sources(cut, bad, fwhm, threshold)
        if len(objs) == 0:
            continue
        dx, dy = xi - x0 - objs["x"], yi - y0 - objs["y"]
        dist = np.hypot(dx, dy)
        ext = np.isfinite(rh) & (rh > EXTENDED_RH * fwhm) & (dist <= r_search) & (flux > 0)
        if not ext.any():
            continue
        # the ellipse's own equation: 1 at (a, b) along its axes
        r_ell = np.sqrt(np.maximum(objs["cxx"] * dx**2 + objs["cyy"] * dy**2 + objs["cxy"] * dx * dy, 0))
        dlr = r_ell / ELLIPSE_SCALE
        j = int(np.flatnonzero(ext)[np.argmin(dlr[ext])])
        out["host_x"][i], out["host_y"][i] = objs["x"][j] + x0, objs["y"][j] + y0
        out["host_sep"][i] = dist[j] * pixel_scale
        out["host_dlr"][i] = dlr[j]
        out["host_mag"][i] = zp - 2.5 * math.log10(flux[j])
        out["host_rh"][i] = rh[j] * pixel_scale
    return out
