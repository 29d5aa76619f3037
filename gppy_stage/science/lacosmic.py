"""L.A.Cosmic (van Dokkum 2001, PASP 113, 1420) on the array namespace, step for step as
astroscrappy implements it (separable medians, masked-mean cleaning, its saturation mask).

astroscrappy is C and runs on the CPU only; this is the same algorithm written in ``xp`` calls and
``ndimage`` filters (``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage`` for CuPy), so the GPU
path finds cosmic rays without a round trip to the host. The edges follow astroscrappy's too
(median filters keep the input on their border, the Laplacian sees zeros outside), so the two
agree to the pixel away from float rounding.
"""

from __future__ import annotations

import numpy

_DISK5 = numpy.ones((5, 5), bool)
_DISK5[[0, 0, -1, -1], [0, -1, 0, -1]] = False  # astroscrappy's dilate5 leaves out the corners


def ndimage_for(xp):
    if xp is numpy:
        import scipy.ndimage as nd
    else:
        import cupyx.scipy.ndimage as nd
    return nd


def _keep_border(out, data, h: int):
    out[:h] = data[:h]
    out[-h:] = data[-h:]
    out[:, :h] = data[:, :h]
    out[:, -h:] = data[:, -h:]
    return out


def sep_median(data, size: int, xp=numpy):
    """astroscrappy's separable median: rows first, then columns; the border keeps the input."""
    nd = ndimage_for(xp)
    h = size // 2
    rows = nd.median_filter(data, size=(1, size), mode="nearest")
    rows[:, :h] = data[:, :h]
    rows[:, -h:] = data[:, -h:]
    return _keep_border(nd.median_filter(rows, size=(size, 1), mode="nearest"), data, h)


def _dilate(mask, footprint, xp, iterations: int = 1):
    nd = ndimage_for(xp)
    h = footprint.shape[0] // 2
    out = mask
    for _ in range(iterations):
        out = _keep_border(nd.binary_dilation(out, structure=xp.asarray(footprint)), out, h)
    return out


def dilate3(mask, xp=numpy):
    return _dilate(mask, numpy.ones((3, 3), bool), xp)


def laplacian_signal(data, xp=numpy):
    """The 2x-subsampled Laplacian, negative values clipped, rebinned back: computed without the
    4x larger subsampled image. Each of a pixel's four sub-pixels sees itself on two sides and
    one neighbour horizontally and one vertically (zero outside the image)."""
    z = xp.zeros_like(data[:, :1])
    left = data - xp.concatenate([z, data[:, :-1]], axis=1)
    right = data - xp.concatenate([data[:, 1:], z], axis=1)
    z = xp.zeros_like(data[:1])
    up = data - xp.concatenate([z, data[:-1]], axis=0)
    down = data - xp.concatenate([data[1:], z], axis=0)
    s = xp.maximum(left + up, 0)
    s += xp.maximum(left + down, 0)
    s += xp.maximum(right + up, 0)
    s += xp.maximum(right + down, 0)
    return s * xp.float32(0.25)


def _clean_meanmask(values, crmask, bad, background: float, xp):
    """Each cosmic-ray pixel (not within 2 px of the edge) -> mean of the good pixels of its 5x5 box."""
    nd = ndimage_for(xp)
    good = ~(crmask | bad)
    box = xp.ones((5, 5), xp.float32)
    total = nd.convolve(xp.where(good, values, 0).astype(xp.float32), box, mode="constant")
    count = nd.convolve(good.astype(xp.float32), box, mode="constant")
    inner = xp.zeros_like(crmask)
    inner[2:-2, 2:-2] = crmask[2:-2, 2:-2]
    mean = xp.where(count > 0, total / xp.maximum(count, 1), xp.float32(background))
    return xp.where(inner, mean, values).astype(xp.float32)


def saturation_mask(data, mask, satlevel: float, xp=numpy):
    """astroscrappy's update_mask: saturated stars (saturated and bright in a 7x7 median), grown
    twice by a 5x5 disc, or the given mask grown by 3x3."""
    sat = (data >= satlevel) & (sep_median(data, 7, xp) > satlevel / 10.0)
    return _dilate(sat, _DISK5, xp, iterations=2) | dilate3(mask, xp)


def detect_cosmics(data, mask=None, *, gain: float = 1.0, readnoise: float = 6.5, satlevel: float = 65536.0,
                   sigclip: float = 4.5, sigfrac: float = 0.3, objlim: float = 5.0, niter: int = 4, xp=numpy):
    """``(crmask, cleaned)`` like ``astroscrappy.detect_cosmics(..., sepmed=True,
    cleantype="meanmask", fsmode="median")``: data in ADU with its sky, ``satlevel`` compared
    with the data in electrons (as astroscrappy does)."""
    clean = xp.asarray(data, dtype=xp.float32) * xp.float32(gain)
    var = clean + xp.float32(readnoise**2)
    bad = xp.zeros(clean.shape, bool) if mask is None else xp.asarray(mask) != 0
    bad = saturation_mask(clean, bad, satlevel, xp)
    goodpix = ~bad
    background = float(xp.median(clean[goodpix])) if bool(goodpix.any()) else 0.0
    background_var = float(xp.median(var[goodpix])) if bool(goodpix.any()) else 0.0
    crmask = xp.zeros(clean.shape, bool)
    low = sigfrac * sigclip
    for _ in range(niter):
        noise = xp.sqrt(xp.maximum(sep_median(var, 7, xp), xp.float32(1e-5)))
        s = laplacian_signal(clean, xp) / (2 * noise)
        sp = s - sep_median(s, 7, xp)
        del s
        f = sep_median(clean, 5, xp)
        f = (f - sep_median(f, 9, xp)) / noise
        f = xp.maximum(f, xp.float32(0.01))
        cosmics = (sp > sigclip) & goodpix & (sp / f > objlim)
        del f, noise
        cosmics = dilate3(cosmics, xp) & goodpix & (sp > sigclip)
        cosmics = dilate3(cosmics, xp) & goodpix & (sp > low)
        del sp
        crmask |= cosmics
        if not bool(cosmics.any()):
            break
        clean = _clean_meanmask(clean, crmask, bad, background, xp)
        var = _clean_meanmask(var, crmask, bad, background_var, xp)
    return crmask, clean / xp.float32(gain)
