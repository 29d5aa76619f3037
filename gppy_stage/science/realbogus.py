"""Real/bogus: features of a candidate's stamps, and the trained classifier that scores them.

``features(diff, noise, mask, ref, fwhm, dx, dy, sign, star_dist)`` turns one candidate's
cut-outs (difference, its noise, its mask, the reference; square, centred on the pixel nearest
the candidate, ``(dx, dy)`` the candidate's sub-pixel offset from it) into ``FEATURES``: numbers
without units (S/N, sizes in FWHM, ratios), so that what the simulator teaches
(``gppy_stage.sim.bogus``) holds at any seeing, depth or zero point. ``score(model, X)`` is the
probability of "real" by the committed model (``load_model``; ``gppy train-realbogus`` makes it).

The model is a scikit-learn ``HistGradientBoostingClassifier`` stored with joblib beside a JSON
card of the scikit-learn version it was saved with: a pickle only loads reliably under that
minor version, so another one is refused with a clear error rather than scored wrongly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from gppy_stage.science.kernel import SIGMA_PER_FWHM

FEATURES = (
    "snr",          # PSF-weighted S/N of the sign-corrected source
    "psf_chi2",     # reduced chi-square of the stamp core after a PSF amplitude fit
    "sharpness",    # brightest core pixel / what the fitted PSF puts there (>> 1: cosmic ray, hot pixel)
    "size",         # second-moment FWHM / PSF FWHM
    "elongation",   # ratio of the second moments' axes
    "opp_frac",     # flux of significant opposite-sign pixels / same-sign ones, within 2 FWHM (dipole)
    "opp_min",      # most negative S/N (opposite sign) within 2 FWHM
    "centroid_off",  # flux-weighted centroid's offset from the candidate, in FWHM
    "col_excess",   # mean S/N of the candidate's column outside the core (bad column)
    "row_excess",   # the same along its row
    "ring_rms",     # scatter of S/N outside the core (residual wings)
    "mask_core",    # masked fraction within 2 FWHM
    "mask_stamp",   # masked fraction of the stamp
    "ref_contrast",  # log10 of the reference's light under the core / the candidate's flux
    "star_dist",    # distance to the nearest reference-catalogue star, FWHM (capped at 30)
    "sign",         # +1 brightened, -1 faded
)
MODEL_DIR = Path(__file__).resolve().parent.parent / "models"
MODEL_FILE = MODEL_DIR / "realbogus.joblib"
STAR_DIST_CAP = 30.0


def features(diff, noise, mask, ref, fwhm: float, dx: float = 0.0, dy: float = 0.0, sign: int = 1,
             star_dist: float = math.inf) -> np.ndarray:
    """One candidate's ``FEATURES`` (float64) from square stamps centred on its nearest pixel."""
    d = np.asarray(diff, float) * (1.0 if sign >= 0 else -1.0)
    n = np.asarray(noise, float)
    bad = np.zeros(d.shape, bool) if mask is None else np.asarray(mask, bool).copy()
    bad |= ~np.isfinite(d) | ~np.isfinite(n) | ~(n > 0)
    d = np.where(bad, 0.0, d)
    n = np.where(bad, 1.0, n)
    h = d.shape[0] // 2
    yy, xx = np.mgrid[: d.shape[0], : d.shape[1]]
    ux, uy = xx - h - dx, yy - h - dy
    r2 = ux**2 + uy**2
    s2 = (fwhm * SIGMA_PER_FWHM) ** 2
    psf = np.exp(-r2 / (2 * s2)) / (2 * np.pi * s2)
    core = (r2 <= (2 * fwhm) ** 2)
    w = np.where(bad, 0.0, 1.0 / n**2)
    den = (psf * psf * w * core).sum()
    amp = (psf * d * w * core).sum() / den if den > 0 else 0.0
    snr = amp * math.sqrt(den) if den > 0 else 0.0
    z = np.where(bad, 0.0, d / n)
    good_core = core & ~bad
    resid = (d - amp * psf) / n
    chi2 = float((resid[good_core] ** 2).sum() / max(good_core.sum() - 1, 1))
    inner = (r2 <= max(1.0, (0.6 * fwhm) ** 2)) & ~bad
    peak_model = amp * psf[inner].max() if inner.any() else 0.0
    peak = d[inner].max() if inner.any() else 0.0
    sharp = peak / peak_model if peak_model > 0 else 0.0
    size, elong, coff = _light_shape(d, bad, core, r2, ux, uy, s2, fwhm)
    same = d[good_core & (z > 2.5)].sum()
    opp = -d[good_core & (z < -2.5)].sum()
    opp_frac = opp / same if same > 0 else 10.0
    opp_min = float(z[good_core].min()) if good_core.any() else 0.0
    col_ex, row_ex, ring = _outside_core(z, core, bad, ux, uy)
    mask_core = float(bad[core].mean())
    mask_stamp = float(bad.mean())
    ref_contrast = _ref_contrast(ref, r2, fwhm, amp)
    sd = float(min(star_dist, STAR_DIST_CAP)) if np.isfinite(star_dist) else STAR_DIST_CAP
    return np.array([snr, chi2, sharp, size, elong, min(opp_frac, 10.0), opp_min, coff, col_ex, row_ex, ring,
                     mask_core, mask_stamp, ref_contrast, sd, 1.0 if sign >= 0 else -1.0], float)


def _light_shape(d, bad, core, r2, ux, uy, s2: float, fwhm: float) -> tuple[float, float, float]:
    """Size (in FWHM), elongation and centroid offset (in FWHM) of the positive light in the core."""
    # second moments of the positive, significant light in a Gaussian window
    win = np.where(core & ~bad, np.clip(d, 0, None) * np.exp(-r2 / (2 * 4 * s2)), 0.0)
    tot = win.sum()
    if not tot > 0:
        return 0.0, 1.0, 5.0
    cx, cy = (win * ux).sum() / tot, (win * uy).sum() / tot
    mxx = (win * (ux - cx) ** 2).sum() / tot
    myy = (win * (uy - cy) ** 2).sum() / tot
    mxy = (win * (ux - cx) * (uy - cy)).sum() / tot
    tr, det = mxx + myy, mxx * myy - mxy**2
    disc = math.sqrt(max(tr * tr / 4 - det, 0.0))
    l1, l2 = tr / 2 + disc, max(tr / 2 - disc, 1e-6)
    # a Gaussian of sigma s seen through a window of sigma 2s has second moment 0.8 s^2
    size = math.sqrt(max(l1 + l2, 0.0) / 2 / 0.8) / SIGMA_PER_FWHM / fwhm
    return size, math.sqrt(l1 / l2), math.hypot(cx, cy) / fwhm


def _outside_core(z, core, bad, ux, uy) -> tuple[float, float, float]:
    """Mean S/N along the candidate's column and row, and the S/N scatter, all outside the core."""
    outside = ~core & ~bad
    col = outside & (np.abs(ux) < 0.75)
    row = outside & (np.abs(uy) < 0.75)
    col_ex = float(z[col].mean()) if col.any() else 0.0
    row_ex = float(z[row].mean()) if row.any() else 0.0
    ring = float(np.sqrt((z[outside] ** 2).mean())) if outside.any() else 0.0
    return col_ex, row_ex, ring


def _ref_contrast(ref, r2, fwhm: float, amp: float) -> float:
    """log10 of the reference's background-subtracted light under the core over the candidate's flux."""
    if ref is None:
        return -3.0
    rf = np.asarray(ref, float)
    fin = np.isfinite(rf)
    if not fin.any():
        return -3.0
    rb = rf - np.median(rf[fin])
    under = (r2 <= (1.5 * fwhm) ** 2) & fin
    light = float(rb[under].sum()) if under.any() else 0.0
    flux = max(amp, 1e-9 * max(abs(light), 1.0))
    return float(np.clip(math.log10(max(light, 1e-3 * flux) / flux), -3.0, 5.0))


def cutout(image, x: float, y: float, half: int, fill=np.nan) -> np.ndarray:
    """The (2 half + 1)^2 square of ``image`` centred on the pixel nearest (x, y), ``fill`` off
    the edge; reads only that square of a memory-mapped image."""
    ny, nx = image.shape
    cx, cy = int(round(x)), int(round(y))
    out = np.full((2 * half + 1, 2 * half + 1), fill, dtype=float)
    y0, y1, x0, x1 = max(cy - half, 0), min(cy + half + 1, ny), max(cx - half, 0), min(cx + half + 1, nx)
    if y0 < y1 and x0 < x1:
        out[y0 - (cy - half): y1 - (cy - half), x0 - (cx - half): x1 - (cx - half)] = image[y0:y1, x0:x1]
    return out


def candidate_features(table, diff, noise, mask, ref, fwhm: float, star_dist=None, half: int = 15) -> np.ndarray:
    """``features`` of every row of a candidate table (x, y, negative) on full images: (n, len(FEATURES))."""
    rows = []
    for i, r in enumerate(table):
        x, y = float(r["x"]), float(r["y"])
        m = cutout(mask, x, y, half, fill=1) if mask is not None else None
        stamps = [cutout(diff, x, y, half), cutout(noise, x, y, half), m,
                  cutout(ref, x, y, half) if ref is not None else None]
        sd = math.inf if star_dist is None else float(star_dist[i])
        rows.append(features(*stamps, fwhm, x - round(x), y - round(y), -1 if bool(r["negative"]) else 1, sd))
    return np.array(rows, float).reshape(len(rows), len(FEATURES))


def load_model(path: str | Path = MODEL_FILE):
    """The committed classifier; a clear error when this scikit-learn is not the one it was saved by."""
    import joblib
    import sklearn

    path = Path(path)
    card = json.loads(path.with_suffix(".json").read_text())
    if card["sklearn"].split(".")[:2] != sklearn.__version__.split(".")[:2]:
        raise RuntimeError(f"{path}: real/bogus model saved with scikit-learn {card['sklearn']}, this is "
                           f"{sklearn.__version__}; retrain it with `gppy train-realbogus` ({card['command']})")
    if tuple(card["features"]) != FEATURES:
        raise RuntimeError(f"{path}: the model's features {card['features']} are not this code's {list(FEATURES)}")
    model = joblib.load(path)
    model.card_ = card
    return model


def score(model, X) -> np.ndarray:
    """Probability that each row of features is a real source (0-1)."""
    X = np.asarray(X, float).reshape(-1, len(FEATURES))
    if len(X) == 0:
        return np.zeros(0)
    return model.predict_proba(X)[:, 1]


def save_model(model, path: str | Path, card: dict) -> None:
    import joblib
    import sklearn

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, path, compress=3)
    card = {"sklearn": sklearn.__version__, "features": list(FEATURES)} | card
    path.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")


def score_candidates(table, diff, noise, mask, ref, fwhm: float, star_xy=None, model=None, half: int = 15):
    """``rb_score`` of every candidate of a table (x, y, negative) on full images; ``star_xy``:
    (x, y) arrays of the reference catalogue's stars on the same grid, for ``star_dist``."""
    from gppy_stage.science.detect import _nearest

    if len(table) == 0:
        return np.zeros(0)
    dist = None
    if star_xy is not None:
        d, _ = _nearest(np.asarray(table["x"], float), np.asarray(table["y"], float),
                        np.asarray(star_xy[0], float), np.asarray(star_xy[1], float), STAR_DIST_CAP * fwhm)
        dist = d / fwhm
    X = candidate_features(table, diff, noise, mask, ref, fwhm, dist, half=half)
    return score(model if model is not None else load_model(), X)
