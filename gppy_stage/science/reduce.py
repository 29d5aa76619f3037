"""Calibration of one science frame: (raw - bias - dark) / flat, its mask, variance and cosmic rays.

Pure functions on arrays. The arithmetic takes an array namespace (NumPy or CuPy); cosmic-ray
detection uses astroscrappy, which runs on the CPU only.
"""

from __future__ import annotations

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


def overscan_level(raw, biassec: tuple[slice, slice], xp=numpy) -> float:
    """Median of the overscan region (frames of CCDs with an overscan, e.g. SAAO, NOT)."""
    return float(xp.median(raw[biassec]))


def calibrate(raw, *, bias=None, dark=None, dark_exptime: float | None = None, exptime: float = 0.0,
              flat=None, gain: float, rdnoise: float, saturation: float,
              bad_flat: tuple[float, float] = (0.3, 3.0), hot_dark_rate: float = 1.0, xp=numpy) -> Calibrated:
    """Calibrate raw ADU. ``dark`` is a master dark (ADU accumulated in ``dark_exptime`` s), scaled to
    ``exptime``; any of bias, dark, flat may be None (e.g. a frame with overscan only).

    Variance in ADU^2: Poisson noise of what the detector collected (sky, stars and dark, in
    electrons) plus read noise, divided by the flat squared like the data.
    """
    raw = xp.asarray(raw, dtype=xp.float32)
    mask = xp.zeros(raw.shape, dtype=xp.uint8)
    mask |= (raw >= saturation).astype(xp.uint8) * SATURATED
    signal = raw - bias if bias is not None else raw.copy()
    if dark is not None:
        if not dark_exptime or dark_exptime <= 0:
            raise ValueError("a master dark needs its exposure time to be scaled")
        scale = exptime / dark_exptime
        signal = signal - dark * scale
        hot = (dark / dark_exptime) * gain > hot_dark_rate
        mask |= hot.astype(xp.uint8) * BAD_PIXEL
    variance = (xp.maximum(signal, 0) * gain + rdnoise**2) / gain**2
    if flat is not None:
        bad = ~xp.isfinite(flat) | (flat < bad_flat[0]) | (flat > bad_flat[1])
        mask |= bad.astype(xp.uint8) * BAD_PIXEL
        safe = xp.where(bad, 1.0, flat).astype(xp.float32)
        signal = signal / safe
        variance = variance / safe**2
    nonfinite = ~xp.isfinite(signal)
    mask |= nonfinite.astype(xp.uint8) * BAD_PIXEL
    signal = xp.where(nonfinite, 0.0, signal)
    return Calibrated(signal.astype(xp.float32), variance.astype(xp.float32), mask)


def remove_cosmic_rays(data, mask, *, gain: float, rdnoise: float, saturation: float, sigclip: float = 4.5,
                       sigfrac: float = 0.3, objlim: float = 5.0, niter: int = 4, sky: float | None = None):
    """Find and clean cosmic rays with astroscrappy (L.A.Cosmic). Returns ``(cleaned, crmask)``.

    astroscrappy models noise from the signal in electrons, so the sky must still be in the data:
    reduced 7DT frames keep it. ``sky`` is added back when a caller passes sky-subtracted data.
    """
    import astroscrappy

    data = numpy.asarray(data, dtype=numpy.float32)
    work = data + sky if sky else data
    crmask, cleaned = astroscrappy.detect_cosmics(
        work, inmask=numpy.asarray(mask) != 0, gain=gain, readnoise=rdnoise, satlevel=saturation,
        sigclip=sigclip, sigfrac=sigfrac, objlim=objlim, niter=niter, sepmed=True,
        cleantype="meanmask", fsmode="median", verbose=False,
    )
    if sky:
        cleaned = cleaned - sky
    return cleaned.astype(numpy.float32), crmask


def parse_section(text: str) -> tuple[slice, slice]:
    """A FITS section ``[x1:x2,y1:y2]`` (1-based, inclusive) as numpy (row, column) slices."""
    body = str(text).strip().strip("[]").replace(" ", "")
    xs, ys = body.split(",")
    x1, x2 = (int(v) for v in xs.split(":"))
    y1, y2 = (int(v) for v in ys.split(":"))
    return slice(min(y1, y2) - 1, max(y1, y2)), slice(min(x1, x2) - 1, max(x1, x2))
