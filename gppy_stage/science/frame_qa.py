"""Per-frame QA of calibration inputs, before they are combined into a master.

A sigma-clipped median ignores a NaN frame and outvotes a frame of random bytes pixel by pixel,
so a master made of 8 good biases and one broken one looks perfect while claiming NCOMBINE 9.
Each input is therefore judged on its own first, from a sparse grid of its pixels (cheap on
61-Mpix frames): the fraction of finite pixels, its level and its noise, against the instrument
registry (bias window, read noise, gain) and the limits in pipeline.yaml ``masters.qa``.
Pure functions: a sample and numbers in, a list of reasons out (empty: the frame is good).
"""

from __future__ import annotations

import math

import numpy as np

from .photometry import NMAD


def grid_step(shape: tuple[int, int]) -> int:
    """Every how many rows and columns a frame is sampled (about 25k-60k pixels either way)."""
    return 8 if shape[0] * shape[1] < 4e6 else 32


def sample_stats(sample: np.ndarray) -> dict:
    """Finite fraction, median and robust noise (NMAD x MAD) of a pixel sample."""
    values = np.asarray(sample, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    stats = {"finite": round(finite.size / max(values.size, 1), 4), "median": None, "noise": None}
    if finite.size:
        med = float(np.median(finite))
        stats["median"] = round(med, 3)
        stats["noise"] = round(NMAD * float(np.median(np.abs(finite - med))), 3)
    return stats


def _finite_reasons(stats: dict, qa: dict) -> list[str]:
    need = float(qa["frame_min_finite"])
    if stats["finite"] < need or stats["median"] is None:
        return [f"only {stats['finite']:.1%} of its pixels are finite (need {need:.0%})"]
    return []


def _noise_limit(read_noise_adu: float, extra_e: float, gain: float, factor: float) -> float | None:
    """The noise a frame may show: ``factor`` x (read noise and the shot noise of ``extra_e``
    electrons), in ADU. None where the registry gives no read noise to judge by."""
    if not read_noise_adu > 0:
        return None
    return factor * math.sqrt(read_noise_adu ** 2 + max(extra_e, 0.0) / max(gain, 1e-6) ** 2)


def bias_reasons(stats: dict, *, bias_min: float | None, bias_max: float | None, rdnoise_e: float,
                 gain: float, qa: dict) -> list[str]:
    reasons = _finite_reasons(stats, qa)
    if reasons:
        return reasons
    margin = float(qa["frame_bias_margin_adu"])
    med, noise = stats["median"], stats["noise"]
    if bias_min is not None and bias_max is not None and not bias_min - margin <= med <= bias_max + margin:
        reasons.append(f"level {med:.1f} ADU outside the bias window {bias_min:g}-{bias_max:g} "
                       f"(+-{margin:g})")
    limit = _noise_limit(rdnoise_e / gain, 0.0, gain, float(qa["frame_noise_factor"]))
    if limit is not None and noise > limit:
        reasons.append(f"noise {noise:.1f} ADU above {limit:.1f} ({qa['frame_noise_factor']:g} x the read noise)")
    return reasons


def dark_reasons(stats: dict, *, exptime: float, bias_min: float | None, bias_max: float | None,
                 rdnoise_e: float, gain: float, dark_e_per_s: float | None, qa: dict) -> list[str]:
    """A raw dark is the bias plus a little dark current: its level may rise above the bias
    window by at most ``dark_excess_max_adu`` and its noise by the dark current's shot noise."""
    reasons = _finite_reasons(stats, qa)
    if reasons:
        return reasons
    margin, excess = float(qa["frame_bias_margin_adu"]), float(qa["dark_excess_max_adu"])
    med, noise = stats["median"], stats["noise"]
    if bias_min is not None and bias_max is not None and not bias_min - margin <= med <= bias_max + excess:
        reasons.append(f"level {med:.1f} ADU outside {bias_min - margin:g}-{bias_max + excess:g} "
                       f"(the bias window and at most {excess:g} ADU of dark current)")
    dark_e = (dark_e_per_s or 0.0) * max(exptime, 0.0)
    limit = _noise_limit(rdnoise_e / gain, dark_e, gain, float(qa["frame_noise_factor"]))
    if limit is not None and noise > limit:
        reasons.append(f"noise {noise:.1f} ADU above {limit:.1f} (read noise and dark current, "
                       f"x{qa['frame_noise_factor']:g})")
    return reasons


def flat_reasons(stats: dict, level: float | None, qa: dict) -> list[str]:
    """``level`` is the flat's median after bias (and dark) subtraction."""
    reasons = _finite_reasons(stats, qa)
    if reasons:
        return reasons
    lo, hi = float(qa["flat_median_min_adu"]), float(qa["flat_median_max_adu"])
    if level is None or not math.isfinite(level) or not lo <= level <= hi:
        shown = "undefined" if level is None or not math.isfinite(level) else f"{level:.1f} ADU"
        reasons.append(f"level {shown} after bias subtraction outside {lo:g}-{hi:g} ADU")
    return reasons
