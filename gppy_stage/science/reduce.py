"""Calibration of one science frame: (raw - bias - dark) / flat, its mask, variance and cosmic rays.

Pure functions on arrays. Everything takes an array namespace (NumPy or CuPy): cosmic rays are
found by astroscrappy on the CPU and by the same L.A.Cosmic in ``lacosmic`` on the GPU.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy

# Mask bits of the MASK extension (0 = good). Later stages treat any non-zero bit as unusable.
SATURATED = 1
BAD_PIXEL = 2
COSMIC_RAY = 4
MASK_BITS = {"SATURATED": SATURATED, "BAD_PIXEL": BAD_PIXEL, "COSMIC_RAY": COSMIC_RAY}


@dataclass
class Calibrated:
    data: object  # float32 ADU, bias/dark/flat corrected
    variance: object  # float32 ADU^2
    mask: object  # uint8 bit flags


def empty_reason(raw, step: int = 8) -> str | None:
    """Why a raw frame holds no image (every sampled pixel NaN, or all one value), or None.
    From every ``step``-th row and column: cheap on 61-Mpix frames, and an empty readout is empty
    everywhere."""
    sample = numpy.asarray(raw[::step, ::step], dtype=numpy.float64)
    finite = sample[numpy.isfinite(sample)]
    if not finite.size:
        return "has no finite pixel (all NaN or infinite)"
    if finite.min() == finite.max():
        return f"has every pixel at {finite.min():g} ADU (an empty readout)"
    return None


def calibrate(raw, *, bias=None, dark=None, dark_exptime: float | None = None, exptime: float = 0.0,
              flat=None, gain: float, rdnoise: float, saturation: float,
              bad_flat: tuple[float, float] = (0.3, 3.0), hot_dark_rate: float = 1.0, xp=numpy) -> Calibrated:
    """Calibrate raw ADU. ``dark`` is a master dark (ADU accumulated in ``dark_exptime`` s), scaled to
    ``exptime``; any of bias, dark, flat may be None (e.g. a frame with overscan only).

    Variance in ADU^2: Poisson noise of what the detector collected (sky, stars and dark, in
    electrons) plus read noise, divided by the flat squared like the data.
    """
    # in place wherever the result replaces its input: a 61-Mpix frame is 245 MB per float32 copy
    f32 = xp.float32
    raw = xp.asarray(raw, dtype=f32)
    mask = xp.where(raw >= saturation, xp.uint8(SATURATED), xp.uint8(0))
    signal = raw - bias if bias is not None else raw.copy()
    del raw
    if dark is not None:
        if not dark_exptime or dark_exptime <= 0:
            raise ValueError("a master dark needs its exposure time to be scaled")
        signal -= dark * f32(exptime / dark_exptime)
        mask |= ((dark * f32(gain / dark_exptime)) > hot_dark_rate).astype(xp.uint8) * xp.uint8(BAD_PIXEL)
    variance = xp.maximum(signal, f32(0))
    variance *= f32(gain)
    variance += f32(rdnoise**2)
    variance /= f32(gain**2)
    if flat is not None:
        bad = ~xp.isfinite(flat) | (flat < bad_flat[0]) | (flat > bad_flat[1])
        mask |= bad.astype(xp.uint8) * xp.uint8(BAD_PIXEL)
        safe = xp.where(bad, f32(1), flat).astype(f32, copy=False)
        del bad
        signal /= safe
        variance /= safe
        variance /= safe
        del safe
    nonfinite = ~xp.isfinite(signal)
    mask |= nonfinite.astype(xp.uint8) * xp.uint8(BAD_PIXEL)
    signal[nonfinite] = 0
    return Calibrated(signal.astype(f32, copy=False), variance.astype(f32, copy=False), mask)


# Rows each side of a strip that the strip's L.A.Cosmic sees but does not keep: its filters reach
# ~11 px per iteration (7- and 9-px medians, the Laplacian, two 3x3 growths, the 5x5 clean), so
# 4 iterations plus the saturation mask stay well inside 64 and a strip's core comes out as the
# whole frame's would.
CR_OVERLAP = 64


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def strips(ny: int, rows: int, overlap: int = CR_OVERLAP) -> list[tuple[int, int, int, int]]:
    """``(lo, start, stop, hi)`` per strip: rows ``start:stop`` are kept from the strip ``lo:hi``."""
    edges = numpy.linspace(0, ny, max(1, round(ny / rows)) + 1).astype(int)
    return [(max(a - overlap, 0), int(a), int(b), min(b + overlap, ny)) for a, b in zip(edges[:-1], edges[1:])]


def remove_cosmic_rays(data, mask, *, gain: float, rdnoise: float, saturation: float, sigclip: float = 4.5,
                       sigfrac: float = 0.3, objlim: float = 5.0, niter: int = 4, sky: float | None = None,
                       xp=numpy, workers: int | None = None, strip_rows: int = 1600):
    """Find and clean cosmic rays (L.A.Cosmic). Returns ``(cleaned, crmask)`` in ``xp``'s arrays.

    On NumPy: astroscrappy on strips of ``strip_rows`` rows with overlapping borders, ``workers``
    at a time in threads (its C loops release the GIL), so a 61-Mpix frame uses every core and
    holds only a few strips' working arrays. On CuPy: ``lacosmic.detect_cosmics`` on the device,
    the same algorithm, so the frame never leaves the GPU.

    astroscrappy models noise from the signal in electrons, so the sky must still be in the data:
    reduced 7DT frames keep it. ``sky`` is added back when a caller passes sky-subtracted data.
    """
    kw = dict(gain=gain, readnoise=rdnoise, satlevel=saturation, sigclip=sigclip, sigfrac=sigfrac, objlim=objlim,
              niter=niter)
    work = xp.asarray(data, dtype=xp.float32)
    work = work + xp.float32(sky) if sky else work
    bad = xp.asarray(mask) != 0
    if xp is numpy:
        crmask, cleaned = _astroscrappy_in_strips(work, bad, kw, workers or usable_cpus(), strip_rows)
    else:
        from .lacosmic import detect_cosmics

        crmask, cleaned = detect_cosmics(work, bad, xp=xp, **kw)
    if sky:
        cleaned = cleaned - xp.float32(sky)
    return cleaned.astype(xp.float32), crmask


def _astroscrappy_in_strips(work, bad, kw: dict, workers: int, strip_rows: int):
    import astroscrappy

    crmask = numpy.zeros(work.shape, bool)
    cleaned = numpy.empty(work.shape, numpy.float32)

    def one(strip):
        lo, start, stop, hi = strip
        m, c = astroscrappy.detect_cosmics(work[lo:hi], inmask=bad[lo:hi], sepmed=True, cleantype="meanmask",
                                           fsmode="median", verbose=False, **kw)
        crmask[start:stop] = m[start - lo:stop - lo]
        cleaned[start:stop] = c[start - lo:stop - lo]

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, strips(work.shape[0], strip_rows)))  # list(): a strip's error is raised here
    return crmask, cleaned

