"""Stacking arithmetic: weights, zero-point scaling, effective gain and the stack's header.

Pure functions; the SWarp call and all I/O live in ``tools.swarp`` and ``stages.stack``.

Conventions (gppy-gpu's): each frame is scaled by ``FLXSCALE = 10**(0.4 (ZP_common - ZP_i))`` so
that every frame is on one zero point; SWarp's inverse-variance mean of the scaled frames is then
on that zero point too (``mag = ZP - 2.5 log10(ADU)``, ``ZP`` in the stack's header). The stack is
a mean, so its pixel values are those of one frame's exposure while ``EXPTIME`` is the total.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from astropy.io import fits
from astropy.time import Time


@dataclass
class FrameForStack:
    """What the stack needs to know of one calib frame."""

    id: str
    name: str  # file name, for IMCOMBnn
    zp: float
    exptime: float
    date_obs: datetime  # exposure start (UTC)
    gain: float  # e-/ADU
    saturation: float  # ADU
    sky: float  # median sky, ADU
    median_variance: float  # typical per-pixel variance of the sky, ADU^2
    seeing: float | None = None  # arcsec


def weight_map(variance: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """SWarp weight: 1/variance, 0 on masked, non-finite or non-positive-variance pixels."""
    # float32 throughout: a variance has no digits float64 would keep, and a full-size frame's
    # float64 temporaries would be 490 MB each
    var = np.asarray(variance, np.float32)
    good = np.isfinite(var) & (var > 0)
    if mask is not None:
        good &= np.asarray(mask) == 0
    w = np.zeros(var.shape, np.float32)
    np.divide(np.float32(1.0), var, out=w, where=good)
    return w


def common_zero_point(zps: list[float], rule: str | float = "median") -> float:
    """The zero point every frame is scaled to: the median of the frames' (a scale near 1 keeps
    the stack's noise in ADU familiar), their maximum, or a fixed number."""
    if isinstance(rule, (int, float)):
        return float(rule)
    arr = np.asarray(zps, float)
    if rule == "median":
        return float(np.median(arr))
    if rule == "max":
        return float(np.max(arr))
    raise ValueError(f"unknown common zero-point rule {rule!r} (median, max or a number)")


def flux_scale(zp: float, common_zp: float) -> float:
    return float(10 ** (0.4 * (common_zp - zp)))


def combine_weights(frames: list[FrameForStack], scales: list[float]) -> np.ndarray:
    """Relative weights of the frames in an inverse-variance mean of the scaled frames."""
    w = np.array([1.0 / (s * s * f.median_variance) for f, s in zip(frames, scales)])
    return w / w.sum()


def effective_gain(frames: list[FrameForStack], scales: list[float]) -> float:
    """e-/ADU of the stack: signal / Poisson variance for the weighted mean of scaled frames.

    A source of S stack-ADU is S/s_i ADU in frame i, with variance S/(s_i g_i); scaled, s_i S/g_i.
    The mean sum w_i s_i x_i has variance S sum w_i^2 s_i / g_i, so g_eff = 1 / sum(w_i^2 s_i / g_i)
    (N g for N equal frames, as gppy-gpu writes for an average).
    """
    w = combine_weights(frames, scales)
    return float(1.0 / sum(wi * wi * s / f.gain for wi, s, f in zip(w, scales, frames)))


def stack_saturation(frames: list[FrameForStack], scales: list[float]) -> float:
    """The lowest level any input saturates at, after sky subtraction and scaling."""
    return float(min((f.saturation - f.sky) * s for f, s in zip(frames, scales)))


def mid_time(frames: list[FrameForStack]) -> datetime:
    """Halfway between the first exposure's start and the last one's end (the plan names the
    stack by the same time)."""
    start = min(f.date_obs for f in frames)
    end = max(f.date_obs + timedelta(seconds=f.exptime) for f in frames)
    return start + (end - start) / 2


def stack_header(header: fits.Header, frames: list[FrameForStack], scales: list[float], common_zp: float,
                 *, left_out: list[dict] | None = None, provenance: dict | None = None) -> fits.Header:
    """The stack's header: SWarp's (WCS) plus gppy-gpu's provenance keys.

    EGAIN (effective), EXPTIME (total), DATE-OBS/MJD/JD (mid-time), NCOMBINE, IMCOMBnn (inputs),
    ZP_IMnn and FLXSCnn (each input's zero point and scale), ZP (the common zero point), SATURATE.
    """
    h = header.copy()
    for key in ("FLXSCALE", "GAIN"):
        h.remove(key, ignore_missing=True)
    mid = mid_time(frames)
    t = Time(mid.replace(tzinfo=None), scale="utc")
    h["EXPTIME"] = (float(sum(f.exptime for f in frames)), "[s] total exposure time of the inputs")
    h["EXPOSURE"] = (h["EXPTIME"], "[s] total exposure time of the inputs")
    h["DATE-OBS"] = (mid.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3], "UTC mid-time of the stack")
    h["MJD"] = (round(float(t.mjd), 8), "MJD mid-time of the stack")
    h["MJD-OBS"] = (h["MJD"], "MJD mid-time of the stack")  # SWarp's is the first input's
    h["JD"] = (round(float(t.jd), 8), "JD mid-time of the stack")
    h["EGAIN"] = (round(effective_gain(frames, scales), 5), "[e-/ADU] effective gain of the stack")
    h["SATURATE"] = (round(stack_saturation(frames, scales), 2), "[ADU] lowest saturation of the inputs")
    h["NCOMBINE"] = (len(frames), "frames combined")
    h["COMBTYPE"] = ("WEIGHTED", "SWarp inverse-variance mean")
    h["ZP"] = (round(common_zp, 5), "common zero point: mag = ZP - 2.5 log10(ADU)")
    h["ZPCOMMON"] = (round(common_zp, 5), "zero point the inputs were scaled to")
    h["BUNIT"] = ("ADU", "one exposure's ADU on the common zero point")
    h["SKYSUB"] = (True, "sky subtracted by SWarp")
    seeing = [f.seeing for f in frames if f.seeing]
    if seeing:
        h["SEEINGIN"] = (round(float(np.median(seeing)), 3), "[arcsec] median seeing of the inputs")
    for i, (f, s) in enumerate(zip(frames, scales), start=1):
        h[f"IMCOMB{i:02d}"] = (f.name, "input frame")
        h[f"ZP_IM{i:02d}"] = (round(f.zp, 5), f"zero point of input {i}")
        h[f"FLXSC{i:02d}"] = (round(s, 6), f"flux scale of input {i}")
    for i, note in enumerate(left_out or [], start=1):
        h[f"LEFTOU{i:02d}"] = f"{note['frame']}: {note['reason']}"[:68]
    for key, value in (provenance or {}).items():
        h[key] = value
    return h
