"""Transient candidates on a difference image: detection, flags a person can filter on, a score.

``detect_candidates(diff, noise, mask, fwhm=...)`` finds positive *and* negative sources above
an S/N threshold (a matched-filter S/N map, thresholded by sep), measures them, and flags what
gppy-gpu flags: near the edge or a masked pixel, dipole (a misalignment or PSF-mismatch
residual), elongated, FWHM far from the PSF's, negative, on a reference-catalogue star, moving
between the frames of the stack. Each flag is a boolean column and a bit of ``flags``
(``FLAG_BITS``); ``score`` in 0-1 folds S/N and flags into one number to sort by. It is a
transparent heuristic, not a trained real-bogus classifier.

Pixel positions are 0-based (NumPy/sep); DS9 regions (``stamps.region_text``) add 1.
Magnitudes are ``zp - 2.5 log10(|flux|)`` with the flux in the difference's units, so the
zero point to pass is the reference's (the difference is in the reference's scale). The flux is
an aperture's of ``APER_FWHM`` FWHM times the PSF's aperture correction: a total flux, as the
zero point calibrates, with little of a host galaxy's residual in it.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import sys

import numpy as np
from astropy.table import Table

from gppy_stage.science.kernel import SIGMA_PER_FWHM
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
# Aperture radius of candidate fluxes, in FWHM: small enough that a host galaxy's residuals and
# the sky's noise stay out (a 2.5-FWHM aperture held 2.8 times the noise), large enough that an
# aperture correction measured on stars holds for a centroid off by a few tenths of a pixel.
APER_FWHM = 1.5


def _gauss_kernel_1d(fwhm: float) -> np.ndarray:
    """The 1-D factor of ``_gauss_kernel``: its outer product with itself is that kernel."""
    h = max(1, int(math.ceil(1.5 * fwhm)))
    x = np.arange(-h, h + 1)
    g = np.exp(-(x**2) / (2 * (fwhm * SIGMA_PER_FWHM) ** 2))
    return (g / g.sum()).astype(np.float32)


def _gauss_kernel(fwhm: float) -> np.ndarray:
    h = max(1, int(math.ceil(1.5 * fwhm)))
    y, x = np.mgrid[-h:h + 1, -h:h + 1]
    k = np.exp(-(x**2 + y**2) / (2 * (fwhm * SIGMA_PER_FWHM) ** 2))
    return k / k.sum()


def snr_map(d, n, bad, fwhm: float, *, strip_rows: int = 512, workers: int | None = None):
    """Matched-filter S/N map of prepared data (see ``_prepared``) and where it is trustworthy.

    S/N = (d/n^2 * k) / sqrt(1/n^2 * k^2) with k the truncated Gaussian PSF (``_gauss_kernel``,
    outside the image counting as no data). The kernel is separable, so each convolution is two
    1-D passes in float32: seconds on a 61-Mpix frame, where sep's own matched filter (a full
    2-D kernel per pixel) takes minutes. It runs on strips of ``strip_rows`` rows with the
    kernel's half-width of borders, ``workers`` at a time (scipy's filters release the GIL):
    the inverse variance and the smoothed images then exist per strip, not per frame, and a
    strip's core comes out as the whole frame's would.
    """
    from concurrent.futures import ThreadPoolExecutor

    from scipy.ndimage import correlate1d

    from .reduce import strips, usable_cpus

    g = _gauss_kernel_1d(fwhm)
    g2 = g * g
    h = len(g) // 2
    snr = np.empty(d.shape, np.float32)
    good = np.empty(d.shape, bool)

    def smooth(img, kernel):
        out = correlate1d(img, kernel, axis=0, mode="constant", cval=0.0)
        return correlate1d(out, kernel, axis=1, mode="constant", cval=0.0, output=out)

    def one(strip):
        lo, start, stop, hi = strip
        core = slice(start - lo, stop - lo)
        ivar = np.square(n[lo:hi], dtype=np.float32)
        with np.errstate(divide="ignore"):
            np.divide(np.float32(1), ivar, out=ivar)
        ivar[bad[lo:hi]] = 0
        den = smooth(ivar, g2)[core]
        ivar *= d[lo:hi]
        num = smooth(ivar, g)[core]
        del ivar
        ok = den > 0
        np.sqrt(den, out=den)
        out = snr[start:stop]
        out[...] = 0
        np.divide(num, den, out=out, where=ok)
        good[start:stop] = ok & ~box_any(bad[lo:hi], h)[core]

    with ThreadPoolExecutor(max(1, workers or usable_cpus())) as pool:
        list(pool.map(one, strips(d.shape[0], strip_rows, overlap=h)))  # list(): a strip's error is raised here
    return snr, good


def matched_noise_factor(diff, noise, mask, fwhm: float) -> float:
    """Measured / nominal scatter of the matched-filter S/N map.

    A difference image's noise is correlated (one input was convolved), so a matched filter
    built for white noise underestimates its own noise; this robust (MAD) ratio, 1 for white
    noise, rescales the threshold and the S/N so that "5 sigma" means 5 sigma.
    """
    snr, good = snr_map(*_prepared(diff, noise, mask), fwhm)
    return _noise_factor(snr, good)


def _noise_factor(snr, good, max_samples: int = 4_000_000) -> float:
    step = max(1, int(good.size // max_samples))
    f = snr.reshape(-1)[::step][good.reshape(-1)[::step]]  # a regular subsample pins a MAD down as well
    if f.size < 1000:
        return 1.0
    med = np.median(f)
    return float(np.clip(1.4826 * np.median(np.abs(f - med)), 0.5, 5.0))


def _prepared(diff, noise, mask):
    """float32 (data with 0 where bad, noise with 0 where bad, bad): one copy of each, so a
    caller's arrays are never written to. The noise is finite everywhere, as sep needs it for an
    error. Memory-mapped inputs are read once here, strip by strip, and let go of (see
    ``_copy_released``), so a caller need not hold them in memory."""
    d = _copy_released(diff, np.float32)
    n = _copy_released(noise, np.float32)
    bad = np.zeros(d.shape, bool) if mask is None else _copy_released(mask, bool)
    with np.errstate(invalid="ignore"):
        bad |= ~np.isfinite(d)
        bad |= ~(n > 0)
        bad |= ~np.isfinite(n)
    d[bad] = 0
    n[bad] = 0
    return d, n, bad


def _copy_released(a, dtype, rows: int = 512) -> np.ndarray:
    """``a`` as a new ``dtype`` array. When ``a`` lies in a memory-mapped file (a FITS image
    opened with ``memmap=True``), each strip's pages are let go once copied: they would otherwise
    stay in the process's resident set beside the copy until the file is closed (a full-size
    difference, noise and mask: 0.6 GiB). Only a strip whose pages all still hold the file's own
    bytes is let go (re-read from the file if touched again); a strip written to in memory (a
    copy-on-write page) is kept as it is."""
    a = to_numpy(a)
    out = np.empty(a.shape, dtype)
    mm = _mapped_file(a)
    if mm is None or a.ndim < 1:
        out[...] = a
        return out
    base = np.frombuffer(mm, np.uint8, count=1).__array_interface__["data"][0]
    try:
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)
    except OSError:  # no way to tell a changed page: nothing is let go
        pagemap = None
    with pagemap or contextlib.nullcontext():
        for y0 in range(0, a.shape[0], rows):
            part = a[y0:y0 + rows]
            out[y0:y0 + rows] = part
            addr = part.__array_interface__["data"][0]
            first, last = addr // _PAGE, (addr + part.nbytes - 1) // _PAGE
            if pagemap is not None and _file_pages_only(pagemap, first, last):
                with contextlib.suppress(OSError, ValueError):  # advice only: refused, it costs memory, not data
                    mm.madvise(mmap.MADV_DONTNEED, first * _PAGE - base, (last - first + 1) * _PAGE)
    return out


_PAGE = mmap.PAGESIZE


def _file_pages_only(pagemap, first: int, last: int) -> bool:
    """Whether every resident page from ``first`` to ``last`` (page numbers in this process) is
    the file's page (Linux pagemap bit 61) rather than a private copy made by a write (or swapped)."""
    pagemap.seek(first * 8)
    raw = pagemap.read((last - first + 1) * 8)
    if len(raw) != (last - first + 1) * 8:
        return False
    e = np.frombuffer(raw, np.uint64)
    present, swapped, file = (e >> np.uint64(63)) & 1, (e >> np.uint64(62)) & 1, (e >> np.uint64(61)) & 1
    return not np.any(swapped == 1) and not np.any((present == 1) & (file == 0))


def _mapped_file(a):
    """The ``mmap.mmap`` a NumPy array's memory belongs to, or None."""
    while a is not None and not isinstance(a, mmap.mmap):
        a = getattr(a, "base", None)
    if a is None or not sys.platform.startswith("linux") or not hasattr(a, "madvise") or a.closed:
        return None
    return a


def box_any(mask, r: int):
    from scipy.ndimage import maximum_filter

    return maximum_filter(mask.astype(np.uint8), size=2 * r + 1) > 0


def find_sources(diff, noise, mask=None, *, fwhm: float, threshold: float = 5.0, minarea: int = 3, sign: int = 1,
                 noise_factor: float = 1.0):
    """sep detections of ``sign * diff`` above ``threshold`` (matched-filter S/N): structured array.

    ``noise_factor`` (see ``matched_noise_factor``) scales the noise. Positions are refined
    with sep's windowed centroid (better than isophotal to ~0.1 px).
    """
    d, n, bad = _prepared(diff, noise, mask)
    snr, _ = snr_map(d, n, bad, fwhm)
    snr /= np.float32(noise_factor)
    return _extract(d, snr, bad, fwhm=fwhm, threshold=threshold, minarea=minarea, sign=sign)


def _extract(d, snr, bad, *, fwhm, threshold, minarea, sign):
    """Sources where ``sign * snr`` stays above ``threshold`` on ``minarea`` pixels; shapes from
    the S/N map (the PSF convolved once more), centroids refined on the data itself."""
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
        w = np.where(good, 1.0 / np.where(good, err[y0:y1, x0:x1], 1.0).astype(float) ** 2, 0.0)
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
    aper_corr: float = 1.0,
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
    frame_times=None,
    frame_groups=None,
    span=None,
    max_rate_arcsec_h: float = 400.0,
) -> Table:
    """Candidates on a difference image (see module docstring). Radii are px unless named.

    ``fwhm``: PSF FWHM of the difference (the broader input's), px. ``aper_corr``: total /
    aperture flux of the difference's PSF within ``aper_radius`` (``growth_correction``),
    which ``flux`` is multiplied by; 1 for a PSF without wings. ``ref_catalog``: stars of the
    reference (x,y or ra,dec). ``frame_detections``: per-frame detection tables (x,y on this
    grid, or ra,dec) or ``frame_diffs``: per-frame (diff, noise[, mask]) on this grid, for the
    moving flag. ``pixel_scale`` (arcsec/px) defaults to the WCS's; needed without a WCS only for
    ``ref_match_arcsec``. With ``frame_times`` (MJD of each frame's mid-exposure), ``span`` (MJD
    start and end of this stack) and a WCS, the frames may be the whole night's of the field (every
    filter; ``frame_groups`` names each one's stack) and moving candidates get ``rate_arcsec_h``
    and ``pa_deg`` (east of north) of their track, up to ``max_rate_arcsec_h``; without times each frame is one time step and a mover may
    shift by up to ``move_radius`` per step (NaN rate and angle).
    """
    dd, n, bad = _prepared(diff, noise, mask)
    ny, nx = dd.shape
    aper_radius = aper_radius or APER_FWHM * fwhm
    edge_radius = edge_radius or 1.5 * fwhm
    dipole_radius = dipole_radius or 2.0 * fwhm
    move_radius = move_radius or 3.0 * fwhm
    move_tol = move_tol or max(1.0, 0.3 * fwhm)
    if pixel_scale is None and wcs is not None:
        from astropy.wcs.utils import proj_plane_pixel_scales

        pixel_scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)

    snr_img, good = snr_map(dd, n, bad, fwhm)
    c = _noise_factor(snr_img, good) if noise_factor is None else float(noise_factor)
    del good
    snr_img /= np.float32(c)
    opts = dict(fwhm=fwhm, threshold=threshold, minarea=minarea)
    pos = _extract(dd, snr_img, bad, sign=1, **opts)
    neg = _extract(dd, snr_img, bad, sign=-1, **opts)
    del snr_img
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

    sgn = np.where(negative, -1.0, 1.0)
    err0 = np.where(bad, np.float32(0), n)  # sep's per-pixel error; masked pixels are left out anyway
    flux, fluxerr, _ = sep.sum_circle(dd, x, y, aper_radius, err=err0, mask=bad, subpix=5)
    pflux, pferr = _psf_flux(dd, n, bad, x, y, fwhm)
    snr = sgn * pflux / (pferr * c)
    fluxerr = fluxerr * aperture_noise_factor(dd, err0, bad, aper_radius, x, y)
    flux, fluxerr = flux * aper_corr, fluxerr * aper_corr
    del err0
    # half-light diameter of the sign-corrected source (FWHM for a Gaussian)
    rh = np.full(m, np.nan)
    if (~negative).any():
        rh[~negative], _ = sep.flux_radius(dd, x[~negative], y[~negative], np.full((~negative).sum(), 2.0 * fwhm),
                                           0.5, mask=bad, subpix=5)
    if negative.any():
        np.negative(dd, out=dd)  # in place: a second full-frame copy only for the few negatives
        try:
            rh[negative], _ = sep.flux_radius(dd, x[negative], y[negative], np.full(negative.sum(), 2.0 * fwhm),
                                              0.5, mask=bad, subpix=5)
        finally:
            np.negative(dd, out=dd)
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
    rr = int(math.ceil(dipole_radius))
    for i in range(m):
        cx, cy = int(round(x[i])), int(round(y[i]))
        sl = (slice(max(cy - rr, 0), min(cy + rr + 1, ny)), slice(max(cx - rr, 0), min(cx + rr + 1, nx)))
        ds, good = dd[sl] * sgn[i], ~bad[sl]
        zs = np.where(good, ds / np.where(good, n[sl], 1.0), 0.0)
        same = ds[zs > 2.5]
        opp = -ds[zs < -2.5]
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

    frames = []
    if frame_detections is not None:
        frames = [_positions(fc, wcs) for fc in frame_detections]
    elif frame_diffs is not None:
        for fd in frame_diffs:
            fdiff, fnoise = fd[0], fd[1]
            fmask = fd[2] if len(fd) > 2 else None
            fc = matched_noise_factor(fdiff, fnoise, fmask, fwhm)
            o = find_sources(fdiff, fnoise, fmask, fwhm=fwhm, threshold=threshold, minarea=minarea, sign=1,
                             noise_factor=fc)
            frames.append((np.asarray(o["x"]), np.asarray(o["y"])))
    timed = frame_times is not None and span is not None and wcs is not None and pixel_scale is not None
    n_frames, track = motion(x, y, frames, move_radius, move_tol, r0=max(move_tol, fwhm),
                             track_tol=max(1.5, 0.5 * fwhm), fit_tol=max(1.0, 0.25 * fwhm), groups=frame_groups,
                             times=frame_times if timed else None,
                             span=span if timed else None,
                             vmax=max_rate_arcsec_h * 24.0 / pixel_scale if timed else None)  # px/day
    moving = track["moving"] & ~negative  # only positive sources are searched in single frames
    rate = pa = np.full(m, np.nan)
    if timed:
        from gppy_stage.science.moving import rate_and_pa

        rate, pa = rate_and_pa(wcs, track["x0"], track["y0"], track["vx"], track["vy"], per_hour=24.0)
        rate, pa = np.where(moving, rate, np.nan), np.where(moving, pa, np.nan)

    t["flux"], t["fluxerr"] = flux, fluxerr
    t["snr"] = snr
    t["fwhm"] = cand_fwhm
    t["elongation"] = a / np.maximum(b, 1e-3)
    t["n_frames"] = n_frames
    t["rate_arcsec_h"], t["pa_deg"] = rate, pa
    for name, val in (("near_edge", near_edge), ("near_mask", near_mask), ("dipole", dipole),
                      ("elongated", elongated), ("bad_fwhm", bad_fwhm), ("negative", negative),
                      ("ref_star", ref_star), ("moving", moving)):
        t[name] = val
    t = _finish(t, wcs, zp, threshold)
    t.meta["NOISECOR"] = c
    return t


def motion(x, y, frames, radius: float, tol: float, *, r0: float | None = None, track_tol: float | None = None,
           fit_tol: float | None = None, groups=None, times=None, span=None,
           vmax: float | None = None) -> tuple[np.ndarray, dict]:
    """(frames with a source within ``radius`` of each candidate, the track of each:
    ``science.moving.link_tracks``'s dict) from per-frame source positions on the candidates' grid.

    Sources found at the same place (within ``tol``) in most frames are static (a star, a galaxy,
    a transient that stays put) and cannot show motion: dropping them first is what lets
    whole-frame catalogues serve, so a galaxy beside a transient, found in every frame, never pairs
    with the transient found in only one. Without ``times`` frame k is at time k, the candidates'
    span covers every frame and a mover shifts by at most ``radius`` per frame.
    """
    from gppy_stage.science.moving import link_tracks

    m = len(x)
    n_frames = np.zeros(m, int)
    frames = [(np.asarray(fx, float), np.asarray(fy, float)) for fx, fy in frames]
    for fx, fy in frames:
        n_frames += np.isfinite(_nearest(x, y, fx, fy, radius)[0])
    if times is None:
        times, span, vmax = np.arange(len(frames), dtype=float), (0.0, max(len(frames) - 1.0, 0.0)), radius
    track = link_tracks(x, y, span, frames, times, vmax=vmax, tol=track_tol or tol, r0=r0 or tol, static_tol=tol,
                        fit_tol=fit_tol, groups=groups)
    return n_frames, track


APERTURE_KEYS = ("APER", "APER_1", "APER_2", "APER_3", "APER_4", "APER_5")


def growth_radii(header, pixscale: float) -> tuple[np.ndarray, np.ndarray]:
    """(radius px, aperture correction mag) pairs of the photometry stage's growth curve, as it
    writes them in a product's header (``APER_k`` diameters in arcsec, ``APC_APER_k``), by radius."""
    pairs = sorted({(float(header[k]) / 2 / pixscale, float(header[f"APC_{k}"])) for k in APERTURE_KEYS
                    if k in header and f"APC_{k}" in header and float(header[k]) > 0})
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def growth_correction(header, radius: float, pixscale: float) -> float | None:
    """Total / aperture flux within ``radius`` px by the photometry stage's growth curve of the
    image ``header`` belongs to (interpolated in log radius), or None without one. The total is
    what the zero point ZPTOT (= ZP_APER_1 + APC_APER_1) calibrates, so a candidate measured in
    any aperture and corrected by this is on the same scale as the zero point."""
    r, apc = growth_radii(header, pixscale)
    if len(r) < 2 or not r[0] <= radius <= r[-1]:
        return None
    return float(10 ** (0.4 * np.interp(math.log(radius), np.log(r), apc)))


def aperture_noise_factor(data, noise, bad, radius, avoid_x, avoid_y, n_apertures: int = 400, seed: int = 0):
    """Measured / nominal scatter of aperture sums at random places away from the sources.

    The nominal aperture error (sum of per-pixel variances) ignores the difference image's
    pixel-to-pixel correlation; this MAD ratio (>= 1) corrects it. ``noise`` is finite
    everywhere (0 where ``bad``), as sep needs it. Seeded: a pure function.
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
    f, fe, flag = sep.sum_circle(data, px, py, radius, err=noise, mask=bad, subpix=5)
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
        t["rate_arcsec_h"], t["pa_deg"] = np.zeros(0), np.zeros(0)
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
             "n_frames", "rate_arcsec_h", "pa_deg", *FLAG_BITS, "flags", "score"]
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
