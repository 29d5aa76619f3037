"""The flags of transient candidates: one rule each, one function per flag, named as the flag.

Each function returns one boolean per candidate from the candidates' positions (0-based px) and
measurements, and, where its rule looks at pixels, from the difference image, its noise and its
bad-pixel mask as ``science.detect._prepared`` leaves them (data and noise 0 where bad). Radii
are in px. ``science.detect.FLAG_BITS`` gives each flag's bit of the ``flags`` column (named in
each docstring) and ``PENALTY`` what it costs the score; ``detect_candidates`` measures what
the rules need (neighbour distances, tracks) and calls them. A flag marks a candidate a person
may want to filter out; it removes nothing.
"""

from __future__ import annotations

import math

import numpy as np

# how far beyond its noise (sigma) a pixel counts as part of a lobe of the dipole rule
LOBE_SIGMA = 2.5


def near_edge(x, y, shape: tuple[int, int], radius: float) -> np.ndarray:
    """Bit 1: the centre within ``radius`` of the image border, where the aperture and the
    PSF fit are cut short."""
    ny, nx = shape
    return (x < radius) | (y < radius) | (x > nx - 1 - radius) | (y > ny - 1 - radius)


def near_mask(x, y, bad, radius: float) -> np.ndarray:
    """Bit 2: a bad pixel (masked, saturated, no data) within ``radius`` of the centre: the
    flux and the shape may be wrong."""
    out = np.zeros(len(x), bool)
    for i, (xi, yi) in enumerate(zip(x, y)):
        sy, sx = _box(xi, yi, math.ceil(radius), bad.shape)
        yy, xx = np.mgrid[sy, sx]
        out[i] = bad[sy, sx][(xx - xi) ** 2 + (yy - yi) ** 2 <= radius**2].any()
    return out


def dipole(x, y, sign, opposite_dist, data, noise, bad, radius: float, frac: float) -> np.ndarray:
    """Bit 4: a detection of the other sign closer than ``radius`` (``opposite_dist``), or, within
    ``radius``, pixels of the other sign beyond ``LOBE_SIGMA`` holding more than ``frac`` of the
    flux of those of the candidate's sign (a lobe under the detection threshold). That is the
    residual of a misaligned star or of a PSF mismatch, almost never a new transient."""
    out = np.asarray(opposite_dist) < radius
    for i, (xi, yi) in enumerate(zip(x, y)):
        same, opposite = _lobe_fluxes(xi, yi, sign[i], data, noise, bad, radius)
        out[i] |= same > 0 and opposite > frac * same
    return out


def elongated(a, b, max_ratio: float) -> np.ndarray:
    """Bit 8: semi-axes ratio a/b (``elongation``) above ``max_ratio``: a streak (satellite,
    a trailed asteroid) or two blended residuals, not a point source."""
    return elongation(a, b) > max_ratio


def bad_fwhm(cand_fwhm, fwhm: float, fwhm_range: tuple[float, float]) -> np.ndarray:
    """Bit 16: a FWHM not measured, or outside ``fwhm_range`` times the PSF's ``fwhm``: a cosmic
    ray or hot pixel (too sharp) or an extended residual (too broad)."""
    cand_fwhm = np.asarray(cand_fwhm, float)
    return ~np.isfinite(cand_fwhm) | (cand_fwhm < fwhm_range[0] * fwhm) | (cand_fwhm > fwhm_range[1] * fwhm)


def negative(sign) -> np.ndarray:
    """Bit 32: found on the negated difference (``sign`` -1): fainter now than in the
    reference, a variable's dip or a reference artefact, never a new source."""
    return np.asarray(sign) < 0


def ref_star(star_dist, radius: float) -> np.ndarray:
    """Bit 64: a star of the reference catalogue closer than ``radius`` (``star_dist``, the
    distance to the nearest): a variable star or a star's subtraction residual."""
    return np.asarray(star_dist) < radius


def moving(on_track, sign) -> np.ndarray:
    """Bit 128: on a straight track through detections in the single frames (``on_track``, from
    ``science.moving.link_tracks``): an asteroid. Only positive sources are looked for in single
    frames, so a negative one never moves."""
    return np.asarray(on_track, bool) & ~negative(sign)


def elongation(a, b) -> np.ndarray:
    """Ratio of the semi-axes, with ``b`` kept off zero."""
    return a / np.maximum(b, 1e-3)


def _lobe_fluxes(xi, yi, s, data, noise, bad, radius: float) -> tuple[float, float]:
    """(flux of the pixels of sign ``s``, of the other sign) beyond ``LOBE_SIGMA`` within the
    box of half-width ``radius`` around (xi, yi), both positive."""
    box = _box(xi, yi, math.ceil(radius), data.shape)
    ds, good = data[box] * s, ~bad[box]
    zs = np.where(good, ds / np.where(good, noise[box], 1.0), 0.0)
    return ds[zs > LOBE_SIGMA].sum(), -ds[zs < -LOBE_SIGMA].sum()


def _box(xi, yi, r: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The (rows, columns) slices of the square of half-width ``r`` on the pixel nearest (xi, yi),
    cut at the image's border."""
    cx, cy = int(round(xi)), int(round(yi))
    return slice(max(cy - r, 0), min(cy + r + 1, shape[0])), slice(max(cx - r, 0), min(cx + r + 1, shape[1]))
