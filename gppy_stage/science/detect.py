"""Transient candidates on a difference image: detection, flags a person can filter on, a score.

``detect_candidates(diff, noise, mask, fwhm=...)`` finds positive *and* negative sources above
an S/N threshold (sep, matched filter on the noise image), measures them, and flags what
gppy-gpu flags: near the edge or a masked pixel, dipole (a misalignment or PSF-mismatch
residual), elongated, FWHM far from the PSF's, negative, on a reference-catalogue star, moving
between the frames of the stack. Each flag is a boolean column and a bit of ``flags``
(``FLAG_BITS``); ``score`` in 0-1 folds S/N and flags into one number to sort by. It is a
transparent heuristic, not a trained real-bogus classifier.

Pixel positions are 0-based (NumPy/sep); DS9 regions (``stamps.region_text``) add 1.
Magnitudes are ``zp - 2.5 log10(|flux|)`` with the flux in the difference's units, so the
zero point to pass is the reference's (the difference is in the reference's scale).
"""

from __future__ import annotations

import math

import numpy as np
from astropy.table import Table

from gppy_stage.xp import to_numpy

FLAG_BITS = {
    "near_edge": 1,
    "near_mask": 2,
    "dipole": 4,
    "elongated": 8,
    "bad_fwhm": 16,
    "negative": 32,
    "ref_star": 64,
    "moving": 128,
}
# How much each flag lowers the score; a dipole or a negative is almost never a new transient
PENALTY = {
    "near_edge": 0.3,
    "near_mask": 0.5,
    "dipole": 0.15,
    "elongated": 0.5,
    "bad_fwhm": 0.4,
    "negative": 0.1,
    "ref_star": 0.6,
    "moving": 0.3,
}
SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _gauss_kernel(fwhm: float) -> np.ndarray:
    h = max(1, int(math.ceil(1.5 * fwhm)))
    y, x = np.mgrid[-h:h + 1, -h:h + 1]
    k = np.exp(-(x**2 + y**2) / (2 * (fwhm * SIGMA_PER_FWHM) ** 2))
    return k / k.sum()


def matched_noise_factor(diff, noise, mask, fwhm: float) -> float:
    """Measured / nominal scatter of the matched-filter S/N map.

    A difference image's noise is correlated (one input was convolved), so a matched filter
    built for white noise underestimates its own noise; this robust (MAD) ratio, 1 for white
    noise, rescales the threshold and the S/N so that "5 sigma" means 5 sigma.
    """
    from scipy.signal import fftconvolve

    d = np.asarray(to_numpy(diff), np.float64)
    n = np.asarray(to_numpy(noise), np.float64)
    bad = np.zeros(d.shape, bool) if mask is None else np.asarray(to_numpy(mask), bool)
    bad = bad | ~np.isfinite(d) | ~np.isfinite(n) | ~(n > 0)
    ivar = np.where(bad, 0.0, 1.0 / np.where(bad, 1.0, n) ** 2)
    k = _gauss_kernel(fwhm)
    num = fftconvolve(np.where(bad, 0.0, d) * ivar, k, mode="same")
    den = fftconvolve(ivar, k * k, mode="same")
    good = ~box_any(bad, k.shape[0] // 2) & (den > 0)
    if good.sum() < 1000:
        return 1.0
    f = num[good] / np.sqrt(den[good])
    med = np.median(f)
    return float(np.clip(1.4826 * np.median(np.abs(f - med)), 0.5, 5.0))


def box_any(mask, r: int):
    from scipy.ndimage import maximum_filter

    return maximum_filter(mask.astype(np.uint8), size=2 * r + 1) > 0


def find_sources(diff, noise, mask=None, *, fwhm: float, threshold: float = 5.0, minarea: int = 3, sign: int = 1,
                 noise_factor: float = 1.0):
    """sep detections of ``sign * diff`` above ``threshold`` (matched-filter S/N): structured array.

    ``noise_factor`` (see ``matched_noise_factor``) scales the noise. Positions are refined
    with sep's windowed centroid (better than isophotal to ~0.1 px).
    """
    import sep

    data = np.ascontiguousarray(sign * to_numpy(diff), dtype=np.float64)
    err = np.ascontiguousarray(to_numpy(noise), dtype=np.float64) * noise_factor
    bad = np.zeros(data.shape, bool) if mask is None else np.asarray(to_numpy(mask), bool)
    bad = np.ascontiguousarray(bad | ~np.isfinite(err) | ~np.isfinite(data))
    data = np.where(bad, 0.0, data)
    err = np.where(bad, np.inf, err)
    sep.set_extract_pixstack(max(300000, data.size // 4))
    objs = sep.extract(data, threshold, err=err, mask=bad, minarea=minarea, filter_kernel=_gauss_kernel(fwhm),
                       filter_type="matched", deblend_cont=0.005, clean=True)
    if len(objs):
        xw, yw, f = sep.winpos(data, objs["x"], objs["y"], fwhm * SIGMA_PER_FWHM, mask=bad)
        ok = (f == 0) & np.isfinite(xw) & (np.hypot(xw - objs["x"], yw - objs["y"]) < fwhm)
        objs["x"] = np.where(ok, xw, objs["x"])
        objs["y"] = np.where(ok, yw, objs["y"])
    return objs


def _psf_flux(data, err, bad, x, y, fwhm):
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
        w = np.where(good, 1.0 / err[y0:y1, x0:x1] ** 2, 0.0)
        den = (p * p * w).sum()
        if den > 0:
            out[i] = (p * data[y0:y1, x0:x1] * w).sum() / den, 1.0 / math.sqrt(den)
    return out[:, 0], out[:, 1]


def _positions(cat, wcs):
    """(x, y) pixel arrays from a table/structured array with x,y or ra,dec (+ wcs)."""
    names = cat.colnames if hasattr(cat, "colnames") else cat.dtype.names
    if "x" in names:
        return np.asarray(cat["x"], float), np.asarray(cat["y"], float)
    if "ra" in names and wcs is not None:
        x, y = wcs.world_to_pixel_values(np.asarray(cat["ra"], float), np.asarray(cat["dec"], float))
        return np.asarray(x, float), np.asarray(y, float)
    raise ValueError("a catalogue needs x,y columns, or ra,dec columns and a WCS")


def _nearest(xa, ya, xb, yb, radius):
    from scipy.spatial import cKDTree

    if len(xb) == 0 or len(xa) == 0:
        return np.full(len(xa), np.inf), np.full(len(xa), -1)
    d, j = cKDTree(np.c_[xb, yb]).query(np.c_[xa, ya], distance_upper_bound=radius)
    return d, np.where(np.isfinite(d), j, -1)


def detect_candidates(
    diff,
    noise,
    mask=None,
    *,
    fwhm: float,
    wcs=None,
    zp: float = 0.0,
    threshold: float = 5.0,
    minarea: int = 3,
    ref_catalog=None,
    frame_detections=None,
    frame_diffs=None,
    aper_radius: float | None = None,
    ref_match_arcsec: float = 1.0,
    pixel_scale: float | None = None,
    edge_radius: float | None = None,
    dipole_radius: float | None = None,
    dipole_frac: float = 0.35,
    elong_max: float = 2.0,
    fwhm_range: tuple[float, float] = (0.5, 2.0),
    move_radius: float | None = None,
    move_tol: float | None = None,
    noise_factor: float | None = None,
) -> Table:
    """Candidates on a difference image (see module docstring). Radii are px unless named.

    ``fwhm``: PSF FWHM of the difference (the broader input's), px. ``ref_catalog``: stars of
    the reference (x,y or ra,dec). ``frame_detections``: per-frame detection tables (x,y on this
    grid, or ra,dec) or ``frame_diffs``: per-frame (diff, noise[, mask]) on this grid, for the
    moving flag. ``pixel_scale`` (arcsec/px) defaults to the WCS's; needed without a WCS only for
    ``ref_match_arcsec``.
    """
    d = np.asarray(to_numpy(diff), np.float64)
    n = np.asarray(to_numpy(noise), np.float64)
    bad = np.zeros(d.shape, bool) if mask is None else np.asarray(to_numpy(mask), bool)
    bad = bad | ~np.isfinite(d) | ~np.isfinite(n) | ~(n > 0)
    ny, nx = d.shape
    aper_radius = aper_radius or 2.5 * fwhm
    edge_radius = edge_radius or 1.5 * fwhm
    dipole_radius = dipole_radius or 2.0 * fwhm
    move_radius = move_radius or 3.0 * fwhm
    move_tol = move_tol or max(1.0, 0.3 * fwhm)
    if pixel_scale is None and wcs is not None:
        from astropy.wcs.utils import proj_plane_pixel_scales

        pixel_scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)

    c = matched_noise_factor(d, n, bad, fwhm) if noise_factor is None else float(noise_factor)
    pos = find_sources(d, n, bad, fwhm=fwhm, threshold=threshold, minarea=minarea, sign=1, noise_factor=c)
    neg = find_sources(d, n, bad, fwhm=fwhm, threshold=threshold, minarea=minarea, sign=-1, noise_factor=c)
    x = np.r_[pos["x"], neg["x"]]
    y = np.r_[pos["y"], neg["y"]]
    negative = np.r_[np.zeros(len(pos), bool), np.ones(len(neg), bool)]
    a = np.r_[pos["a"], neg["a"]]
    b = np.r_[pos["b"], neg["b"]]
    m = len(x)
    t = Table()
    t["id"] = np.arange(1, m + 1)
    t["x"], t["y"] = x, y
    if m == 0:
        t = _finish(t, wcs, zp, threshold, empty=True)
        t.meta["NOISECOR"] = c
        return t

    import sep

    dd = np.where(bad, 0.0, d)
    err = np.where(bad, np.inf, n)
    sgn = np.where(negative, -1.0, 1.0)
    flux, fluxerr, _ = sep.sum_circle(dd, x, y, aper_radius, err=np.where(bad, 0.0, n), mask=bad, subpix=5)
    pflux, pferr = _psf_flux(dd, err, bad, x, y, fwhm)
    snr = sgn * pflux / (pferr * c)
    fluxerr = fluxerr * aperture_noise_factor(dd, n, bad, aper_radius, x, y)
    # half-light diameter of the sign-corrected source (FWHM for a Gaussian)
    rh = np.full(m, np.nan)
    for s, sel in ((1.0, ~negative), (-1.0, negative)):
        if sel.any():
            rh[sel], _ = sep.flux_radius(np.ascontiguousarray(s * dd), x[sel], y[sel],
                                         np.full(sel.sum(), 2.0 * fwhm), 0.5, mask=bad, subpix=5)
    cand_fwhm = 2.0 * rh

    # flags
    near_edge = (x < edge_radius) | (y < edge_radius) | (x > nx - 1 - edge_radius) | (y > ny - 1 - edge_radius)
    near_mask = np.zeros(m, bool)
    r = int(math.ceil(edge_radius))
    for i in range(m):
        cx, cy = int(round(x[i])), int(round(y[i]))
        yy, xx = np.mgrid[max(cy - r, 0):min(cy + r + 1, ny), max(cx - r, 0):min(cx + r + 1, nx)]
        near_mask[i] = bad[yy, xx][(xx - x[i]) ** 2 + (yy - y[i]) ** 2 <= edge_radius**2].any()
    # dipole: an opposite-sign detection close by, or a strong opposite-sign lobe in the
    # aperture that stayed under the detection threshold
    dipole = np.zeros(m, bool)
    dist, _ = _nearest(x[~negative], y[~negative], x[negative], y[negative], dipole_radius)
    dipole[~negative] = np.isfinite(dist)
    dist, _ = _nearest(x[negative], y[negative], x[~negative], y[~negative], dipole_radius)
    dipole[negative] = np.isfinite(dist)
    z = dd / np.where(bad, np.inf, n)
    rr = int(math.ceil(dipole_radius))
    for i in range(m):
        cx, cy = int(round(x[i])), int(round(y[i]))
        sl = (slice(max(cy - rr, 0), min(cy + rr + 1, ny)), slice(max(cx - rr, 0), min(cx + rr + 1, nx)))
        zs = sgn[i] * z[sl]
        same = dd[sl][zs > 2.5] * sgn[i]
        opp = -dd[sl][zs < -2.5] * sgn[i]
        if same.sum() > 0 and opp.sum() > dipole_frac * same.sum():
            dipole[i] = True
    elongated = (a / np.maximum(b, 1e-3)) > elong_max
    bad_fwhm = ~np.isfinite(cand_fwhm) | (cand_fwhm < fwhm_range[0] * fwhm) | (cand_fwhm > fwhm_range[1] * fwhm)

    ref_star = np.zeros(m, bool)
    if ref_catalog is not None and len(ref_catalog):
        rx, ry = _positions(ref_catalog, wcs)
        if pixel_scale is None:
            raise ValueError("matching the reference catalogue within arcsec needs a WCS or pixel_scale")
        dist, _ = _nearest(x, y, rx, ry, ref_match_arcsec / pixel_scale)
        ref_star = np.isfinite(dist)

    moving = np.zeros(m, bool)
    n_frames = np.zeros(m, int)
    frames = []
    if frame_detections is not None:
        frames = [_positions(c, wcs) for c in frame_detections]
    elif frame_diffs is not None:
        for fd in frame_diffs:
            fdiff, fnoise = fd[0], fd[1]
            fmask = fd[2] if len(fd) > 2 else None
            fc = matched_noise_factor(fdiff, fnoise, fmask, fwhm)
            o = find_sources(fdiff, fnoise, fmask, fwhm=fwhm, threshold=threshold, minarea=minarea, sign=1,
                             noise_factor=fc)
            frames.append((np.asarray(o["x"]), np.asarray(o["y"])))
    if frames:
        px = np.full((m, len(frames)), np.nan)
        py = np.full((m, len(frames)), np.nan)
        for k, (fx, fy) in enumerate(frames):
            _, j = _nearest(x, y, fx, fy, move_radius)
            hit = j >= 0
            px[hit, k], py[hit, k] = fx[j[hit]], fy[j[hit]]
        n_frames = np.isfinite(px).sum(axis=1)
        for i in range(m):
            ok = np.isfinite(px[i])
            if ok.sum() >= 2:
                sep_max = np.max(np.hypot(px[i, ok][:, None] - px[i, ok][None], py[i, ok][:, None] - py[i, ok][None]))
                moving[i] = sep_max > move_tol
        # only positive sources are searched in single frames
        moving &= ~negative

    t["flux"], t["fluxerr"] = flux, fluxerr
    t["snr"] = snr
    t["fwhm"] = cand_fwhm
    t["elongation"] = a / np.maximum(b, 1e-3)
    t["n_frames"] = n_frames
    for name, val in (("near_edge", near_edge), ("near_mask", near_mask), ("dipole", dipole),
                      ("elongated", elongated), ("bad_fwhm", bad_fwhm), ("negative", negative),
                      ("ref_star", ref_star), ("moving", moving)):
        t[name] = val
    t = _finish(t, wcs, zp, threshold)
    t.meta["NOISECOR"] = c
    return t


def aperture_noise_factor(data, noise, bad, radius, avoid_x, avoid_y, n_apertures: int = 400, seed: int = 0):
    """Measured / nominal scatter of aperture sums at random places away from the sources.

    The nominal aperture error (sum of per-pixel variances) ignores the difference image's
    pixel-to-pixel correlation; this MAD ratio (>= 1) corrects it. Seeded: a pure function.
    """
    import sep

    ny, nx = data.shape
    rng = np.random.default_rng(seed)
    px = rng.uniform(2 * radius, nx - 1 - 2 * radius, 4 * n_apertures)
    py = rng.uniform(2 * radius, ny - 1 - 2 * radius, 4 * n_apertures)
    d, _ = _nearest(px, py, np.asarray(avoid_x, float), np.asarray(avoid_y, float), 3 * radius)
    keep = ~np.isfinite(d)
    px, py = px[keep][:n_apertures], py[keep][:n_apertures]
    if len(px) < 50:
        return 1.0
    f, fe, flag = sep.sum_circle(data, px, py, radius, err=np.where(bad, 0.0, noise), mask=bad, subpix=5)
    ok = (flag == 0) & (fe > 0)
    if ok.sum() < 50:
        return 1.0
    z = f[ok] / fe[ok]
    return float(max(1.0, 1.4826 * np.median(np.abs(z - np.median(z)))))


def _finish(t: Table, wcs, zp, threshold, empty=False) -> Table:
    m = len(t)
    if empty:
        for c in ("flux", "fluxerr", "snr", "fwhm", "elongation"):
            t[c] = np.zeros(0)
        t["n_frames"] = np.zeros(0, int)
        for name in FLAG_BITS:
            t[name] = np.zeros(0, bool)
    if wcs is not None and m:
        ra, dec = wcs.pixel_to_world_values(np.asarray(t["x"]), np.asarray(t["y"]))
    else:
        ra = dec = np.full(m, np.nan)
    t["ra"], t["dec"] = np.asarray(ra, float), np.asarray(dec, float)
    af = np.abs(np.asarray(t["flux"], float))
    with np.errstate(divide="ignore", invalid="ignore"):
        t["mag"] = np.where(af > 0, zp - 2.5 * np.log10(af), np.nan)
        t["magerr"] = np.where(af > 0, 2.5 / np.log(10) * np.asarray(t["fluxerr"], float) / af, np.nan)
    bits = np.zeros(m, np.int32)
    for name, bit in FLAG_BITS.items():
        bits |= np.where(np.asarray(t[name], bool), bit, 0).astype(np.int32)
    t["flags"] = bits
    t["score"] = candidate_score(t, threshold)
    order = ["id", "ra", "dec", "x", "y", "mag", "magerr", "flux", "fluxerr", "snr", "fwhm", "elongation",
             "n_frames", *FLAG_BITS, "flags", "score"]
    t = t[order]
    t.meta["FLAGBITS"] = ",".join(f"{k}={v}" for k, v in FLAG_BITS.items())
    t.meta["ZP"] = zp
    return t


def candidate_score(t: Table, threshold: float = 5.0) -> np.ndarray:
    """0-1: a logistic in S/N (0.5 at 1.5x the threshold) times one penalty per raised flag."""
    snr = np.abs(np.asarray(t["snr"], float)) if len(t) else np.zeros(0)
    s = 1.0 / (1.0 + np.exp(-(np.nan_to_num(snr) - 1.5 * threshold) / (0.3 * threshold)))
    for name, p in PENALTY.items():
        s = s * np.where(np.asarray(t[name], bool), p, 1.0)
    return np.clip(s, 0.0, 1.0)
