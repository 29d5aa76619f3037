"""Completeness of a transient search: artificial stars made from the image's own PSF, and the
fraction of them the search finds, against magnitude.

The PSF is empirical (``empirical_psf``): the median of bright, unsaturated, isolated stars of
the image itself, each centred by a sub-pixel shift and normalised, so it carries whatever the
stack's PSF is (Moffat wings, ellipticity, a resampling's blur) rather than an assumed Gaussian.
Artificial stars (``inject``) are that PSF shifted to their sub-pixel positions, with the
Poisson noise of their own light, on copies of the image and its variance. Sites
(``injection_sites``) are on a jittered grid spaced so no two blend, clear of bad pixels, of the
border and of sources the real difference already holds, so that a recovery can only be an
artificial star. ``fit_completeness`` fits ``top / (1 + exp((m - m0) / w))`` to the recovered
(1) and missed (0) stars by maximum likelihood and gives the 50 % and 90 % magnitudes.

Pure functions on host arrays; the stage (``stages/completeness.py``) runs the real
subtraction and detection in between.
"""

from __future__ import annotations

import math

import numpy as np

from gppy_stage.science import plots
from gppy_stage.science.kernel import find_stars, sky_level

PSF_MIN_STARS = 5


def _nearest_distance(xa, ya, xb, yb) -> np.ndarray:
    from scipy.spatial import cKDTree

    if len(xb) == 0 or len(xa) == 0:
        return np.full(len(xa), np.inf)
    d, _ = cKDTree(np.c_[xb, yb]).query(np.c_[xa, ya])
    return d


def _centred(cut, dx: float, dy: float, half: int):
    """The cut-out shifted by (-dx, -dy) so its star sits on the central pixel, cropped to ``half``."""
    from scipy.ndimage import shift

    moved = shift(cut, (-dy, -dx), order=3, mode="nearest")
    c = cut.shape[0] // 2
    return moved[c - half:c + half + 1, c - half:c + half + 1]


def empirical_psf(image, var, bad, *, fwhm: float, saturation: float | None = None, half: int | None = None,
                  snr_min: float = 30.0, max_stars: int = 100) -> tuple[np.ndarray | None, int, np.ndarray]:
    """(PSF of unit sum, (2 half + 1)^2 px, centred, or None with fewer than ``PSF_MIN_STARS``
    stars; the number of stars it was made from; (n, 2) x, y of every source above ``snr_min``,
    the stars a subtraction may take as stamps).

    ``image`` has its sky in it (measured here); stars are sep detections with flag 0, S/N at
    least ``snr_min`` (as the subtraction's stamp stars), a peak under half of ``saturation``,
    no other detection and no bad pixel in their box. The default box, 3.5 FWHM each side, holds
    all but 1-3 % of a Moffat star's light (beta 3 to 2.5), where a wider one would find few
    isolated stars in a crowded field.
    """
    half = half or int(min(max(math.ceil(3.5 * fwhm), 8), 40))
    img = np.asarray(image, np.float32)
    bad = np.asarray(bad, bool) | ~np.isfinite(img)
    sky, _ = sky_level(img, bad)
    data = np.where(bad, np.float32(0), img - np.float32(sky))
    objs, snr = find_stars(data, np.where(bad, np.float32(1), np.asarray(var, np.float32)), bad)
    ny, nx = data.shape
    ring = max(4, int(math.ceil(fwhm)))
    pad = half + ring  # the box, and a ring around it for the star's own background
    x, y = np.asarray(objs["x"], float), np.asarray(objs["y"], float)
    ok = (objs["flag"] == 0) & (snr >= snr_min) & (x >= pad) & (x < nx - pad - 1) & (y >= pad) & (y < ny - pad - 1)
    if saturation is not None:
        ok &= objs["peak"] < 0.5 * (saturation - sky)
    from scipy.spatial import cKDTree

    if len(x) > 1:
        counts = cKDTree(np.c_[x, y]).query_ball_point(np.c_[x, y], (half + 3) * math.sqrt(2.0), return_length=True)
        ok &= counts <= 1
    stamps = []
    for i in np.nonzero(ok)[0][np.argsort(-snr[ok])]:
        cx, cy = int(round(x[i])), int(round(y[i]))
        box = (slice(cy - pad, cy + pad + 1), slice(cx - pad, cx + pad + 1))
        if bad[box].any():
            continue
        cut = data[box].astype(np.float64)
        # the sky under the star, from the ring outside its box: a global sky off by a tenth of
        # the noise is, summed over the box, a tenth of a faint PSF star's flux
        inner = np.zeros(cut.shape, bool)
        inner[ring:-ring, ring:-ring] = True
        cut -= np.median(cut[~inner])
        p = _centred(cut, x[i] - cx, y[i] - cy, half)
        total = p.sum()
        if total > 0:
            stamps.append(p / total)
        if len(stamps) >= max_stars:
            break
    bright = np.c_[x, y][snr >= snr_min]
    if len(stamps) < PSF_MIN_STARS:
        return None, len(stamps), bright
    # not clipped at zero: that would turn the wings' noise into a positive halo holding a few
    # per cent of the flux, which the injected stars would then miss in their cores
    psf = np.median(np.stack(stamps), axis=0)
    return psf / psf.sum(), len(stamps), bright


def point_source_depth(zp: float, sigma_pixel: float, psf: np.ndarray, nsigma: float = 5.0) -> float:
    """Magnitude of a point source at ``nsigma`` by optimal (PSF-weighted) photometry on white
    noise of ``sigma_pixel`` per pixel: S/N = F sqrt(sum P^2) / sigma."""
    return float(zp - 2.5 * math.log10(nsigma * sigma_pixel / math.sqrt(float(np.sum(psf * psf)))))


def injection_sites(shape, bad, *, spacing: float, margin: int, clear: float, avoid=(), rng) -> np.ndarray:
    """(n, 2) x, y of possible sites: one per cell of a grid of ``spacing`` px, jittered within
    the cell's central half, at least ``margin`` px inside the image, with no bad pixel within
    ``clear`` px and, for each (xy (n, 2), radius) of ``avoid``, no such source within radius."""
    ny, nx = shape
    xs = np.arange(margin + spacing / 2, nx - margin - spacing / 2 + 1e-9, spacing)
    ys = np.arange(margin + spacing / 2, ny - margin - spacing / 2 + 1e-9, spacing)
    if len(xs) == 0 or len(ys) == 0:
        return np.zeros((0, 2))
    gx, gy = np.meshgrid(xs, ys)
    sites = np.c_[gx.ravel(), gy.ravel()] + rng.uniform(-spacing / 4, spacing / 4, (gx.size, 2))
    r = int(math.ceil(clear))
    keep = np.ones(len(sites), bool)
    for k, (sx, sy) in enumerate(sites):
        cx, cy = int(round(sx)), int(round(sy))
        keep[k] = not bad[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1].any()
    for xy, radius in avoid:
        if len(xy):
            keep &= _nearest_distance(sites[:, 0], sites[:, 1], xy[:, 0], xy[:, 1]) > radius
    return sites[keep]


def inject(image, var, psf, xy, flux, *, gain: float | None, rng) -> None:
    """Add the PSF scaled to ``flux`` at each (x, y) of ``xy`` to ``image`` in place, with its
    Poisson noise (``gain`` e-/ADU; none without one) added to the image and to ``var``."""
    half = psf.shape[0] // 2
    pad = np.pad(psf, 2)
    for (x, y), f in zip(xy, flux):
        cx, cy = int(round(x)), int(round(y))
        # the star at (x, y): the centred PSF moved by the fraction of a pixel
        model = f * _centred(pad, cx - x, cy - y, half)
        box = (slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1))
        if gain:
            source_var = np.clip(model, 0, None) / gain
            model = model + rng.normal(0.0, 1.0, model.shape) * np.sqrt(source_var)
            var[box] += source_var.astype(var.dtype)
        image[box] += model.astype(image.dtype)


def matched(xy, det_xy, radius: float) -> np.ndarray:
    """Index of the nearest detection within ``radius`` px of each site, -1 where none."""
    from scipy.spatial import cKDTree

    if len(det_xy) == 0 or len(xy) == 0:
        return np.full(len(xy), -1)
    d, j = cKDTree(det_xy).query(xy, distance_upper_bound=radius)
    return np.where(np.isfinite(d), j, -1)


def _logistic(m, m0, w, top):
    return top / (1.0 + np.exp(np.clip((m - m0) / w, -50, 50)))


def fit_completeness(mag, recovered) -> dict:
    """Maximum-likelihood ``top / (1 + exp((m - m0) / w))`` to recovered (True) and missed stars.

    Returns m0, w, top and the magnitudes where the curve crosses 0.5 and 0.9 (``cmpl50``,
    ``cmpl90``; None where it never reaches that fraction, or no transition was sampled).
    """
    from scipy.optimize import minimize

    mag, rec = np.asarray(mag, float), np.asarray(recovered, bool)
    out = {"m0": None, "width": None, "top": None, "cmpl50": None, "cmpl90": None}
    if len(mag) < 20 or rec.all() or not rec.any():
        return out

    def nll(p):
        f = np.clip(_logistic(mag, p[0], math.exp(p[1]), 1.0 / (1.0 + math.exp(-p[2]))), 1e-9, 1 - 1e-9)
        return -float(np.sum(np.where(rec, np.log(f), np.log(1.0 - f))))

    # start where the recovered and missed magnitudes overlap
    start = [0.5 * (np.median(mag[rec]) + np.median(mag[~rec])), math.log(0.2), 3.0]
    best = minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 4000})
    m0, w, top = float(best.x[0]), math.exp(best.x[1]), 1.0 / (1.0 + math.exp(-best.x[2]))
    out |= {"m0": m0, "width": w, "top": top}
    for level, key in ((0.5, "cmpl50"), (0.9, "cmpl90")):
        if top > level:
            value = m0 + w * math.log(top / level - 1.0)
            # a crossing outside the magnitudes injected is an extrapolation, not a measurement
            if mag.min() <= value <= mag.max():
                out[key] = value
    return out


def recovery_table(mag, recovered, bin_width: float) -> list[dict]:
    """Rows of (bin centre mag, injected, recovered, fraction) over the injected range."""
    mag, rec = np.asarray(mag, float), np.asarray(recovered, bool)
    if len(mag) == 0:
        return []
    lo = math.floor(mag.min() / bin_width) * bin_width
    edges = np.arange(lo, mag.max() + bin_width, bin_width)
    rows = []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (mag >= a) & (mag < b)
        n = int(sel.sum())
        if n:
            rows.append({"mag": round(float(0.5 * (a + b)), 3), "injected": n, "recovered": int(rec[sel].sum()),
                         "fraction": round(float(rec[sel].mean()), 4)})
    return rows


def recovery_plot(rows: list[dict], fit: dict, *, title: str = "", depth: float | None = None) -> bytes:
    """PNG of the recovered fraction per magnitude bin (binomial errors), the fitted curve and
    the 50 % / 90 % magnitudes. Matplotlib's object API with the Agg canvas, as the stamps."""
    fig = plots.figure((6.5, 4.2))
    ax = fig.subplots()
    m = np.array([r["mag"] for r in rows])
    n = np.array([r["injected"] for r in rows], float)
    f = np.array([r["fraction"] for r in rows])
    ax.errorbar(m, f, yerr=np.sqrt(np.clip(f * (1 - f), 0.0, None) / np.maximum(n, 1)), fmt="o", ms=4,
                color="tab:blue", label="recovered fraction")
    if fit.get("m0") is not None and len(m):
        mm = np.linspace(m.min(), m.max(), 300)
        ax.plot(mm, _logistic(mm, fit["m0"], fit["width"], fit["top"]), color="k", lw=1.2, label="logistic fit")
    for key, level, colour in (("cmpl50", 0.5, "tab:red"), ("cmpl90", 0.9, "tab:orange")):
        if fit.get(key) is not None:
            ax.axvline(fit[key], color=colour, ls="--", lw=1, label=f"{int(level * 100)} %: {fit[key]:.2f}")
    if depth is not None:
        ax.axvline(depth, color="tab:green", ls=":", lw=1, label=f"5-sigma PSF depth (noise): {depth:.2f}")
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel("injected magnitude (AB)")
    ax.set_ylabel("recovered fraction")
    ax.set_title(title or "completeness", fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return plots.png(fig)
