"""Transient candidates on a difference image: detection, flags a person can filter on, a score.

``detect_candidates(diff, noise, mask, fwhm=...)`` finds positive *and* negative sources above
an S/N threshold (a matched-filter S/N map, thresholded by sep), measures them, and flags what
gppy-gpu flags: near the edge or a masked pixel, dipole (a misalignment or PSF-mismatch
residual), elongated, FWHM far from the PSF's, negative, on a reference-catalogue star, moving
between the frames of the stack. Each flag is a boolean column and a bit of ``flags``
(``FLAG_BITS``), its rule one function of ``candidate_flags`` (measured by ``candidate_measure``,
tracked by ``candidate_motion``); ``score`` in 0-1 folds S/N and flags into one number to sort
by. It is a transparent heuristic, not a trained real-bogus classifier.

Pixel positions are 0-based (NumPy/sep); DS9 regions (``stamps.region_text``) add 1.
Magnitudes are ``zp - 2.5 log10(|flux|)`` with the flux in the difference's units, so the
zero point to pass is the reference's (the difference is in the reference's scale). The flux is
an aperture's of ``APER_FWHM`` FWHM times the PSF's aperture correction: a total flux, as the
zero point calibrates, with little of a host galaxy's residual in it.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.table import Table

from gppy_stage.science import candidate_flags as flags
from gppy_stage.science import candidate_motion as motion
from gppy_stage.science.candidate_measure import extract, half_light_fwhm, positions, psf_flux
from gppy_stage.science.kernel import SIGMA_PER_FWHM
from gppy_stage.science.mapped_copy import copy_released
from gppy_stage.science.photometry import NMAD

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
PENALTY = {"near_edge": 0.3, "near_mask": 0.5, "dipole": 0.15, "elongated": 0.5, "bad_fwhm": 0.4, "negative": 0.1,
           "ref_star": 0.6, "moving": 0.3}
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


def _noise_factor(snr, good, max_samples: int = 4_000_000) -> float:
    """Measured / nominal scatter of the matched-filter S/N map ``snr`` where ``good``.

    A difference image's noise is correlated (one input was convolved), so a matched filter
    built for white noise underestimates its own noise; this robust (MAD) ratio, 1 for white
    noise, rescales the threshold and the S/N so that "5 sigma" means 5 sigma.
    """
    step = max(1, int(good.size // max_samples))
    f = snr.reshape(-1)[::step][good.reshape(-1)[::step]]  # a regular subsample pins a MAD down as well
    if f.size < 1000:
        return 1.0
    med = np.median(f)
    return float(np.clip(NMAD * np.median(np.abs(f - med)), 0.5, 5.0))


def _prepared(diff, noise, mask):
    """float32 (data with 0 where bad, noise with 0 where bad, bad): one copy of each, so a
    caller's arrays are never written to. The noise is finite everywhere, as sep needs it for an
    error. Memory-mapped inputs are read once here, strip by strip, and let go of
    (``mapped_copy.copy_released``), so a caller need not hold them in memory."""
    d = copy_released(diff, np.float32)
    n = copy_released(noise, np.float32)
    bad = np.zeros(d.shape, bool) if mask is None else copy_released(mask, bool)
    with np.errstate(invalid="ignore"):
        bad |= ~np.isfinite(d)
        bad |= ~(n > 0)
        bad |= ~np.isfinite(n)
    d[bad] = 0
    n[bad] = 0
    return d, n, bad


def box_any(mask, r: int):
    from scipy.ndimage import maximum_filter

    return maximum_filter(mask.astype(np.uint8), size=2 * r + 1) > 0


def find_sources(diff, noise, mask=None, *, fwhm: float, threshold: float = 5.0, minarea: int = 3, sign: int = 1,
                 noise_factor: float | None = 1.0):
    """sep detections of ``sign * diff`` above ``threshold`` (matched-filter S/N): structured array.

    ``noise_factor`` (see ``_noise_factor``; measured when None) scales the noise.
    Positions are refined with sep's windowed centroid (better than isophotal to ~0.1 px).
    """
    d, n, bad = _prepared(diff, noise, mask)
    snr, _ = _scaled_snr(d, n, bad, fwhm, noise_factor)
    return extract(d, snr, bad, fwhm=fwhm, threshold=threshold, minarea=minarea, sign=sign)


def _scaled_snr(d, n, bad, fwhm: float, noise_factor: float | None):
    """(S/N map divided by the noise factor, that factor): ``noise_factor``, or measured on the map when None."""
    snr, good = snr_map(d, n, bad, fwhm)
    c = _noise_factor(snr, good) if noise_factor is None else float(noise_factor)
    del good
    snr /= np.float32(c)
    return snr, c


def _nearest(xa, ya, xb, yb, radius):
    """(distance, index in b) of the nearest b closer than ``radius`` to each a; inf and -1 where none."""
    from scipy.spatial import cKDTree

    if len(xb) == 0 or len(xa) == 0:
        return np.full(len(xa), np.inf), np.full(len(xa), -1)
    d, j = cKDTree(np.c_[xb, yb]).query(np.c_[xa, ya], distance_upper_bound=radius)
    return d, np.where(np.isfinite(d), j, -1)


def detect_candidates(diff, noise, mask=None, *, fwhm: float, wcs=None, zp: float = 0.0, threshold: float = 5.0,
                      minarea: int = 3, ref_catalog=None, frame_detections=None, frame_diffs=None,
                      aper_radius: float | None = None, aper_corr: float = 1.0, ref_match_arcsec: float = 1.0,
                      pixel_scale: float | None = None, edge_radius: float | None = None,
                      dipole_radius: float | None = None, dipole_frac: float = 0.35, elong_max: float = 2.0,
                      fwhm_range: tuple[float, float] = (0.5, 2.0), move_radius: float | None = None,
                      move_tol: float | None = None, noise_factor: float | None = None, frame_times=None,
                      frame_groups=None, span=None, max_rate_arcsec_h: float = 400.0) -> Table:
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
    x, y, sign, a, b, c = _detections(dd, n, bad, fwhm=fwhm, threshold=threshold, minarea=minarea,
                                      noise_factor=noise_factor)
    t = Table({"id": np.arange(1, len(x) + 1), "x": x, "y": y})
    if len(x) == 0:
        return _finish(t, wcs, zp, threshold, c, empty=True)
    if pixel_scale is None and wcs is not None:
        pixel_scale = _pixel_scale(wcs)
    edge_radius, dipole_radius = edge_radius or 1.5 * fwhm, dipole_radius or 2.0 * fwhm
    negative = flags.negative(sign)
    t["flux"], t["fluxerr"], t["snr"], t["fwhm"] = _measure(dd, n, bad, x, y, sign, fwhm=fwhm, noise_cor=c,
                                                            radius=aper_radius or APER_FWHM * fwhm, corr=aper_corr)
    t["elongation"] = flags.elongation(a, b)
    t["near_edge"] = flags.near_edge(x, y, dd.shape, edge_radius)
    t["near_mask"] = flags.near_mask(x, y, bad, edge_radius)
    t["dipole"] = flags.dipole(x, y, sign, _opposite_distance(x, y, negative, dipole_radius), dd, n, bad,
                               dipole_radius, dipole_frac)
    t["elongated"] = flags.elongated(a, b, elong_max)
    t["bad_fwhm"] = flags.bad_fwhm(t["fwhm"], fwhm, fwhm_range)
    t["negative"] = negative
    t["ref_star"] = flags.ref_star(*_star_distance(x, y, ref_catalog, wcs, pixel_scale, ref_match_arcsec))
    frames = _frame_positions(frame_detections, frame_diffs, wcs, fwhm=fwhm, threshold=threshold, minarea=minarea)
    timed = frame_times is not None and span is not None and wcs is not None and pixel_scale is not None
    move_radius = move_radius or 3.0 * fwhm
    t["n_frames"] = _frames_near(x, y, frames, move_radius)
    track = motion.tracks(x, y, frames, fwhm, move_radius, move_tol or max(1.0, 0.3 * fwhm), groups=frame_groups,
                          times=frame_times if timed else None, span=span if timed else None,
                          vmax=max_rate_arcsec_h * 24.0 / pixel_scale if timed else None)  # px/day
    t["moving"] = moving = flags.moving(track["moving"], sign)
    nan = np.full(len(x), np.nan)
    t["rate_arcsec_h"], t["pa_deg"] = motion.sky_rate(wcs, track, moving) if timed else (nan, nan)
    return _finish(t, wcs, zp, threshold, c)


def _detections(dd, n, bad, *, fwhm, threshold, minarea, noise_factor):
    """(x, y, sign, a, b, noise factor): the sources above ``threshold`` on the S/N map, the
    positive ones (sign 1) first, then the negative ones (-1); a, b: semi-axes on the S/N map."""
    snr, c = _scaled_snr(dd, n, bad, fwhm, noise_factor)
    pos = extract(dd, snr, bad, fwhm=fwhm, threshold=threshold, minarea=minarea, sign=1)
    neg = extract(dd, snr, bad, fwhm=fwhm, threshold=threshold, minarea=minarea, sign=-1)
    del snr  # a frame-sized map: gone before the measurements
    sign = np.r_[np.ones(len(pos)), -np.ones(len(neg))]
    return (np.r_[pos["x"], neg["x"]], np.r_[pos["y"], neg["y"]], sign, np.r_[pos["a"], neg["a"]],
            np.r_[pos["b"], neg["b"]], c)


def _measure(dd, n, bad, x, y, sign, *, fwhm, noise_cor, radius, corr):
    """(flux, fluxerr, snr, fwhm) of each candidate: the aperture flux within ``radius`` times the
    aperture correction ``corr``, its error scaled for the image's correlated noise; the S/N of
    the PSF-weighted flux (sign-corrected, scaled by the S/N map's ``noise_cor``); the half-light FWHM."""
    import sep

    err0 = np.where(bad, np.float32(0), n)  # sep's per-pixel error; masked pixels are left out anyway
    flux, fluxerr, _ = sep.sum_circle(dd, x, y, radius, err=err0, mask=bad, subpix=5)
    pflux, pferr = psf_flux(dd, n, bad, x, y, fwhm)
    fluxerr = fluxerr * aperture_noise_factor(dd, err0, bad, radius, x, y)
    del err0  # a frame-sized copy: gone before the half-light radii
    cand_fwhm = half_light_fwhm(dd, bad, x, y, flags.negative(sign), fwhm)
    return flux * corr, fluxerr * corr, sign * pflux / (pferr * noise_cor), cand_fwhm


def _pixel_scale(wcs) -> float:
    """Mean pixel scale of a celestial WCS, arcsec/px."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)


def _opposite_distance(x, y, negative, radius: float) -> np.ndarray:
    """Distance from each candidate to the nearest of the other sign, px; inf from ``radius`` on."""
    dist = np.full(len(x), np.inf)
    dist[~negative], _ = _nearest(x[~negative], y[~negative], x[negative], y[negative], radius)
    dist[negative], _ = _nearest(x[negative], y[negative], x[~negative], y[~negative], radius)
    return dist


def _star_distance(x, y, ref_catalog, wcs, pixel_scale, arcsec: float) -> tuple[np.ndarray, float]:
    """(distance from each candidate to the nearest reference star, px, inf from the radius on;
    the match radius of ``arcsec``, px)."""
    if ref_catalog is None or not len(ref_catalog):
        return np.full(len(x), np.inf), 0.0
    rx, ry = positions(ref_catalog, wcs)
    if pixel_scale is None:
        raise ValueError("matching the reference catalogue within arcsec needs a WCS or pixel_scale")
    return _nearest(x, y, rx, ry, arcsec / pixel_scale)[0], arcsec / pixel_scale


def _frame_positions(frame_detections, frame_diffs, wcs, **find) -> list[tuple[np.ndarray, np.ndarray]]:
    """(x, y) of the sources of each single frame on the candidates' grid: from its detection
    table, or found on its (diff, noise[, mask]) with ``find_sources``'s options ``find``."""
    if frame_detections is not None:
        return [positions(fc, wcs) for fc in frame_detections]
    frames = []
    for fd in frame_diffs or ():
        o = find_sources(fd[0], fd[1], fd[2] if len(fd) > 2 else None, sign=1, noise_factor=None, **find)
        frames.append((np.asarray(o["x"], float), np.asarray(o["y"], float)))
    return frames


def _frames_near(x, y, frames, radius: float) -> np.ndarray:
    """How many of the frames hold a source within ``radius`` of each candidate."""
    n_frames = np.zeros(len(x), int)
    for fx, fy in frames:
        n_frames += np.isfinite(_nearest(x, y, fx, fy, radius)[0])
    return n_frames


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
    return float(max(1.0, NMAD * np.median(np.abs(z - np.median(z)))))


def _finish(t: Table, wcs, zp, threshold, noise_cor: float, empty=False) -> Table:
    m = len(t)
    if empty:
        for c in ("flux", "fluxerr", "snr", "fwhm", "elongation", "n_frames", "rate_arcsec_h", "pa_deg"):
            t[c] = np.zeros(0, int if c == "n_frames" else float)
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
    t.meta["NOISECOR"] = noise_cor
    return t


def candidate_score(t: Table, threshold: float = 5.0) -> np.ndarray:
    """0-1: a logistic in S/N (0.5 at 1.5x the threshold) times one penalty per raised flag."""
    snr = np.abs(np.asarray(t["snr"], float)) if len(t) else np.zeros(0)
    s = 1.0 / (1.0 + np.exp(-(np.nan_to_num(snr) - 1.5 * threshold) / (0.3 * threshold)))
    for name, p in PENALTY.items():
        s = s * np.where(np.asarray(t[name], bool), p, 1.0)
    return np.clip(s, 0.0, 1.0)
