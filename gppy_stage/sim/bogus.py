"""Labelled candidate stamps for the real/bogus classifier: what a difference image shows.

``examples(seed, n_real, n_bogus)`` draws stamps (difference, noise, mask, reference) the way
the detect stage cuts them, each with its label (1 real, 0 bogus), its kind and its features
(``science.realbogus.features``). Real: Moffat point sources from S/N 5 to 150 on the sky or on a
galaxy (whose imperfect subtraction leaves a residual). Bogus: cosmic-ray residuals (dots and
tracks), misaligned-star dipoles, saturated-star wings (core masked), hot pixels, bad columns,
reference artefacts (a reference-only blob, faded; a hole in the reference, brightened).
Seeing (FWHM 1.5-7.5 px, the sites' samplings; the features are scaled by an estimate of the FWHM,
off the true one as the detect stage's is), sky noise, its correlation (a difference is partly
convolved) and the candidate's centroid error vary from stamp to stamp. Only examples above the
detection threshold (S/N 5) are kept, as only those become candidates. Pure in the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dc_field

import numpy as np

from ..science.realbogus import FEATURES, features
from . import model as simmodel
from .render import add_moffat

HALF = 15
SHAPE = (2 * HALF + 1,) * 2
CENTRE = float(HALF)
BOGUS_KINDS = ("cosmic", "dipole", "saturated", "hot_pixel", "bad_column", "ref_artefact")
# the PSF FWHM (px) of the sites of config/instruments.csv, LOAO's 1.5" on 0.794"/px to KCT's 2"
# on 0.306"/px, so that one model serves them all (RASA36's 2.36"/px, about 1 px, is not covered)
FWHM_RANGE = (1.5, 7.5)
# the detect stage's FWHM is an estimate (the stack's or the difference's header, measured on
# resampled images): on an LOAO night it was 1.35x the Moffat's true FWHM of 1.9 px
FWHM_ESTIMATE_RATIO = (0.85, 1.45)
FWHM_BINS = (1.5, 2.5, 3.5, 5.0, 7.5)


def _psf(shape, x, y, fwhm, beta, flux=1.0):
    img = np.zeros(shape)
    add_moffat(img, x, y, flux, simmodel.moffat_alpha(fwhm, beta), beta, radius=shape[0])
    return img


def _noise(rng, shape, corr):
    from scipy.ndimage import gaussian_filter

    e = rng.normal(size=shape)
    if corr > 0.05:
        e = gaussian_filter(e, corr, mode="wrap")
        e /= e.std()
    return e


def _galaxy(rng, shape, c, fwhm, beta):
    from .render import render_galaxy

    img = np.zeros(shape)
    off = rng.uniform(0, 3 * fwhm, 2) * rng.choice([-1, 1], 2)
    render_galaxy(img, c + off[0], c + off[1], 1.0, rng.uniform(1.5, 8) * fwhm / 2, rng.uniform(0.7, 3),
                  rng.uniform(0.3, 1), rng.uniform(0, 180), fwhm, beta)
    return img


@dataclass
class _Stamp:
    """A candidate's stamp while its kind draws it: the difference's signal (before noise), the
    reference, the mask, and where the candidate was detected (tx, ty) with its detection error."""

    fwhm: float
    beta: float
    sigma: float  # the difference's noise
    jx: float  # centroid error
    jy: float
    tx: float
    ty: float
    star_dist: float  # to the nearest reference star, in FWHM
    signal: np.ndarray = dc_field(default_factory=lambda: np.zeros(SHAPE))
    ref: np.ndarray = dc_field(default_factory=lambda: np.zeros(SHAPE))
    mask: np.ndarray = dc_field(default_factory=lambda: np.zeros(SHAPE, bool))
    sign: int = 1

    def flux_for(self, snr: float) -> float:
        """The flux a Gaussian PSF of this FWHM needs for that S/N on this sky."""
        return snr * self.sigma * math.sqrt(4 * math.pi * (self.fwhm * 0.4247) ** 2)

    def psf(self, x: float, y: float, flux: float, fwhm: float | None = None, beta: float | None = None) -> np.ndarray:
        return _psf(SHAPE, x, y, self.fwhm if fwhm is None else fwhm, self.beta if beta is None else beta, flux)


def _real(rng, st: _Stamp) -> None:
    """A point source on the sky or on a galaxy (whose imperfect subtraction leaves a residual)."""
    from scipy.ndimage import gaussian_filter

    f = st.flux_for(10 ** rng.uniform(math.log10(5), math.log10(150)))
    st.signal += st.psf(st.tx, st.ty, f)
    if rng.random() < 0.6:  # on a galaxy
        gal = _galaxy(rng, SHAPE, CENTRE, st.fwhm, st.beta) * f * 10 ** rng.uniform(0, 2.5)
        st.ref += gal
        # the galaxy subtracted with a slightly wrong kernel
        st.signal += rng.uniform(-0.03, 0.03) * (gaussian_filter(gal, rng.uniform(0.2, 0.8)) - gal) * 10
    if rng.random() < 0.1:
        st.star_dist = rng.uniform(1.5, 5)  # a real source beside a star
    if rng.random() < 0.05:  # a few masked pixels nearby
        st.mask[rng.integers(0, SHAPE[0], 3), rng.integers(0, SHAPE[1], 3)] = True


def _cosmic(rng, st: _Stamp) -> None:
    """A cosmic-ray residual: a dot of a few pixels or a track."""
    from scipy.ndimage import gaussian_filter

    amp = st.sigma * 10 ** rng.uniform(math.log10(5), 2.5)
    npx = rng.integers(1, 5) if rng.random() < 0.6 else rng.integers(4, 12)
    ang = rng.uniform(0, math.pi)
    tx, ty = st.tx, st.ty
    for k in range(npx):
        px = int(round(tx + (k - npx / 2) * math.cos(ang) * (npx > 4)))
        py = int(round(ty + (k - npx / 2) * math.sin(ang) * (npx > 4)))
        if npx <= 4:
            px, py = int(round(tx)) + rng.integers(-1, 2) * (k > 0), int(round(ty)) + rng.integers(-1, 2) * (k > 0)
        st.signal[py % SHAPE[0], px % SHAPE[1]] += amp * rng.uniform(0.3, 1)
    if rng.random() < 0.5:  # LA Cosmic caught part of it: the mask grows over some of its pixels
        hit = st.signal > 0
        st.mask |= hit & (rng.random(SHAPE) < 0.5)
    if rng.random() < 0.3:  # a cosmic ray in a frame, smeared by the stack's resampling
        st.signal = gaussian_filter(st.signal, rng.uniform(0.3, 0.6))


def _dipole(rng, st: _Stamp) -> None:
    """A misaligned star: the new image's copy shifted against the reference's."""
    c, fwhm = CENTRE, st.fwhm
    f = st.flux_for(10 ** rng.uniform(1.5, 3.5))
    st.ref += st.psf(c, c, f)
    shift = rng.uniform(0.05, 0.8) * fwhm * np.array([math.cos(a := rng.uniform(0, 2 * math.pi)), math.sin(a)])
    st.signal += st.psf(c + shift[0], c + shift[1], f * rng.uniform(0.97, 1.03)) - st.ref
    peak = np.unravel_index(np.argmax(st.signal), SHAPE)
    st.ty, st.tx = peak[0] + st.jy, peak[1] + st.jx
    st.star_dist = math.hypot(st.tx - c, st.ty - c) / fwhm if rng.random() < 0.8 else st.star_dist


def _saturated(rng, st: _Stamp) -> None:
    """A saturated star's wings, its core (and sometimes its bleed trail) masked."""
    c, fwhm = CENTRE, st.fwhm
    sx, sy = c + rng.uniform(-8, 8), c + rng.uniform(-8, 8)
    f = st.flux_for(10 ** rng.uniform(3, 4.5))
    st.ref += st.psf(sx, sy, f)
    other = st.psf(sx, sy, f, fwhm * rng.uniform(0.9, 1.1), st.beta * rng.uniform(0.85, 1.15))
    st.signal += (other - st.ref) * rng.uniform(0.5, 1.5)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    st.mask |= (xx - sx) ** 2 + (yy - sy) ** 2 <= (rng.uniform(1, 3) * fwhm) ** 2
    if rng.random() < 0.5:  # a bleed trail along the column
        st.mask |= (np.abs(xx - sx) < 1) & (np.abs(yy - sy) < rng.uniform(3, 15))
    cand = np.where(~st.mask, st.signal, -np.inf)
    peak = np.unravel_index(np.argmax(cand), SHAPE)
    st.ty, st.tx = peak[0] + st.jy, peak[1] + st.jx
    st.star_dist = math.hypot(st.tx - sx, st.ty - sy) / fwhm if rng.random() < 0.9 else st.star_dist


def _hot_pixel(rng, st: _Stamp) -> None:
    ix, iy = int(round(st.tx)), int(round(st.ty))
    st.signal[iy, ix] += st.sigma * 10 ** rng.uniform(math.log10(5), 3)
    if rng.random() < 0.3:
        st.signal[iy + rng.integers(-1, 2), ix + rng.integers(-1, 2)] += st.sigma * rng.uniform(1, 5)


def _bad_column(rng, st: _Stamp) -> None:
    col = int(round(st.tx)) + rng.integers(-1, 2)
    y0 = rng.integers(0, HALF) if rng.random() < 0.5 else 0
    y1 = SHAPE[0] if rng.random() < 0.6 else rng.integers(HALF + 1, SHAPE[0])
    width = 1 if rng.random() < 0.7 else 2
    st.signal[y0:y1, col:col + width] += st.sigma * rng.uniform(1.5, 6)
    if rng.random() < 0.3:
        st.mask[y0:y1, col:col + width] |= rng.random((y1 - y0, width)) < 0.3


def _ref_artefact(rng, st: _Stamp) -> None:
    if rng.random() < 0.6:  # a reference-only blob (its own cosmic ray, a ghost), convolved: faded
        f = st.flux_for(10 ** rng.uniform(math.log10(5), 2))
        blob = st.psf(st.tx, st.ty, f, st.fwhm * rng.uniform(0.6, 1.5))
        st.ref += blob
        st.signal -= blob
        st.sign = -1
    else:  # a hole in the reference (a dead patch, an oversubtracted halo): brightened, flat and sharp-edged
        w = rng.integers(2, 6)
        ix, iy = int(round(st.tx)), int(round(st.ty))
        patch = np.zeros(SHAPE)
        patch[iy - w // 2: iy - w // 2 + w, ix - w // 2: ix - w // 2 + w] = st.sigma * rng.uniform(3, 20)
        st.ref -= patch
        st.signal += patch


_DRAW = {"real": _real, "cosmic": _cosmic, "dipole": _dipole, "saturated": _saturated, "hot_pixel": _hot_pixel,
         "bad_column": _bad_column, "ref_artefact": _ref_artefact}


def _one(rng, kind: str):
    """One stamp of ``kind``: its features as the detect stage measures them, and its true FWHM."""
    if kind not in _DRAW:
        raise ValueError(f"unknown example kind {kind!r}")
    fwhm = math.exp(rng.uniform(*np.log(FWHM_RANGE)))
    fwhm_est = fwhm * math.exp(rng.uniform(*np.log(FWHM_ESTIMATE_RATIO)))
    beta = rng.uniform(2.2, 4.5)
    sigma = 10 ** rng.uniform(0, 2)
    corr = rng.uniform(0, 0.8)
    # the detected centroid is off the truth by up to a few tenths of a pixel
    jx, jy = rng.normal(0, 0.25, 2)
    dx, dy = rng.uniform(-0.5, 0.5, 2)
    st = _Stamp(fwhm, beta, sigma, jx, jy, CENTRE + dx + jx, CENTRE + dy + jy,
                math.exp(rng.uniform(math.log(3), math.log(60))))
    _DRAW[kind](rng, st)
    sky_ref = 10 ** rng.uniform(1, 3)
    ref = st.ref + sky_ref + rng.normal(size=SHAPE) * math.sqrt(sky_ref)
    diff = st.signal + sigma * _noise(rng, SHAPE, corr)
    # the candidate's own pixel offset, as the detect stage measures it
    ix, iy = int(round(st.tx - jx)), int(round(st.ty - jy))
    sh = (HALF - iy, HALF - ix)
    diff, noise_s, mask_s, ref_s = (np.roll(a, sh, axis=(0, 1)) for a in (diff, np.full(SHAPE, sigma), st.mask, ref))
    return features(diff, noise_s, mask_s, ref_s, fwhm_est, st.tx - jx - ix, st.ty - jy - iy, st.sign,
                    st.star_dist), fwhm


def _detected(rng, kind: str, min_snr: float = 5.0, tries: int = 50) -> tuple[np.ndarray, float]:
    """An example the detect stage would have found (its PSF S/N above the threshold) and its true FWHM."""
    for _ in range(tries):
        f, fwhm = _one(rng, kind)
        if f[0] >= min_snr:
            return f, fwhm
    return f, fwhm


def examples(seed: int, n_real: int, n_bogus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(features (n, len(FEATURES)), labels 1 real / 0 bogus, kinds, true FWHM in px): bogus kinds
    in equal shares."""
    rng = np.random.default_rng(seed)
    kinds = ["real"] * n_real + [BOGUS_KINDS[i % len(BOGUS_KINDS)] for i in range(n_bogus)]
    drawn = [_detected(rng, k) for k in kinds]
    X = np.array([f for f, _ in drawn], float).reshape(len(kinds), len(FEATURES))
    y = np.array([1 if k == "real" else 0 for k in kinds])
    return X, y, np.array(kinds), np.array([w for _, w in drawn], float)


def evaluate(y, p, keep_real: float = 0.95) -> dict:
    """ROC AUC, the score threshold that keeps ``keep_real`` of the real ones, and the bogus
    fraction that passes it."""
    from sklearn.metrics import roc_auc_score

    y, p = np.asarray(y), np.asarray(p, float)
    thr = float(np.quantile(p[y == 1], 1 - keep_real))
    return {"roc_auc": float(roc_auc_score(y, p)), "threshold": thr,
            "bogus_pass": float(np.mean(p[y == 0] >= thr)), "real_pass": float(np.mean(p[y == 1] >= thr))}


def by_fwhm(y, p, fwhm, threshold: float) -> dict:
    """``evaluate`` per bin of true FWHM (``FWHM_BINS``, px), each with its own threshold keeping
    95 % of its real sources, plus the real and bogus fractions passing ``threshold`` (one for all
    FWHMs, as the detect stage has one)."""
    y, p, fwhm = np.asarray(y), np.asarray(p, float), np.asarray(fwhm, float)
    out = {}
    for lo, hi in zip(FWHM_BINS[:-1], FWHM_BINS[1:]):
        sel = (fwhm >= lo) & (fwhm < hi)
        ys, ps = y[sel], p[sel]
        fig = {"n_real": int((ys == 1).sum()), "n_bogus": int((ys == 0).sum())}
        if fig["n_real"] and fig["n_bogus"]:
            fig |= evaluate(ys, ps) | {"real_pass_at": float(np.mean(ps[ys == 1] >= threshold)),
                                       "bogus_pass_at": float(np.mean(ps[ys == 0] >= threshold)),
                                       "at": float(threshold)}
        out[f"{lo:g}-{hi:g}"] = fig
    return out


def train(seed: int, n_real: int, n_bogus: int, out, command: str = "") -> dict:
    """Train the classifier on ``examples(seed, ...)``, judge it on ``examples(seed + 1, ...)``
    (a quarter as many) and save it with its card (``science.realbogus.save_model``)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from ..science.realbogus import save_model

    X, y, _, _ = examples(seed, n_real, n_bogus)
    model = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.08, max_leaf_nodes=31,
                                           l2_regularization=1.0, random_state=seed)
    model.fit(X, y)
    Xv, yv, kv, wv = examples(seed + 1, max(n_real // 4, 1), max(n_bogus // 4, 1))
    pv = model.predict_proba(Xv)[:, 1]
    figures = evaluate(yv, pv)
    figures["bogus_pass_by_kind"] = {k: float(np.mean(pv[kv == k] >= figures["threshold"])) for k in BOGUS_KINDS}
    figures["by_fwhm"] = by_fwhm(yv, pv, wv, figures["threshold"])
    card = {"command": command, "train_seed": seed, "validation_seed": seed + 1, "n_real": n_real,
            "n_bogus": n_bogus, "n_validation": int(len(yv)), "validation": figures}
    save_model(model, out, card)
    return card
