"""Sigma-clipped median combination, written against an array namespace (NumPy or CuPy).

The median is taken by sorting along the frame axis with rejected values as NaN (sorted last)
and picking the middle of what is left: far faster than ``nanmedian`` for the 5-20 frames of a
master, and identical on NumPy and CuPy.
"""

from __future__ import annotations

import numpy


def _masked_median(data, keep, xp):
    n = keep.sum(axis=0)
    s = xp.sort(xp.where(keep, data, xp.nan), axis=0)
    lo = xp.clip((n - 1) // 2, 0, None)[None]
    hi = xp.clip(n // 2, 0, None)[None]
    med = 0.5 * (xp.take_along_axis(s, lo, axis=0)[0] + xp.take_along_axis(s, hi, axis=0)[0])
    return xp.where(n > 0, med, xp.nan), n


def _masked_std(data, keep, n, xp):
    safe_n = xp.maximum(n, 1)
    mean = xp.where(keep, data, 0).sum(axis=0) / safe_n
    var = xp.where(keep, (data - mean) ** 2, 0).sum(axis=0) / safe_n
    return xp.sqrt(var)


def sigma_clipped_median(stack, sigma: float = 3.0, iterations: int = 3, xp=numpy):
    """Median over axis 0 after iterative sigma clipping about the median.

    Returns ``(median, n_used)``: the combined image (float32) and how many frames each pixel kept.
    Non-finite input values are never used.
    """
    data = xp.asarray(stack, dtype=xp.float32)
    keep = xp.isfinite(data)
    med, n = _masked_median(data, keep, xp)
    for _ in range(iterations):
        std = _masked_std(data, keep, n, xp)
        new_keep = keep & (xp.abs(data - med) <= sigma * std)
        if bool((new_keep == keep).all()):
            break
        keep = new_keep
        med, n = _masked_median(data, keep, xp)
    return med.astype(xp.float32), n


def clipped_stats(image, sigma: float = 3.0, iterations: int = 5, sample: int = 4):
    """Sigma-clipped (median, std) of an image, from every ``sample``-th pixel (QA numbers)."""
    from astropy.stats import sigma_clipped_stats

    _, med, std = sigma_clipped_stats(numpy.asarray(image)[::sample, ::sample], sigma=sigma, maxiters=iterations)
    return float(med), float(std)
