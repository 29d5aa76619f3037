"""Benchmark: the reduce and detect kernels on one synthetic full-size (9576x6388) frame.

Each mode runs in its own process so its peak RSS (``ru_maxrss``) is its own, and prints one
JSON line: wall and CPU seconds of the work (not of making the inputs) and peak RSS in MB. On a
shared machine the CPU seconds are the steadier figure; wall / CPU shows how many cores it used.

- ``reduce``: calibrate (bias, scaled dark, flat) + cosmic rays as the reduce stage does them
  (astroscrappy on overlapping strips in threads), on a raw frame with sky, stars and the
  simulator's cosmic rays;
- ``astroscrappy``: astroscrappy alone, whole frame, the same settings: the yardstick;
- ``detect``: ``detect_candidates`` on a full-size difference image with injected sources.

    python bench/bench_fullsize_kernels.py reduce|astroscrappy|detect [--size full|small]

Inputs are generated in row blocks in float32 so that making them does not set the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

SIZES = {"full": (6388, 9576), "small": (1024, 1536)}
GAIN, RDNOISE, SATURATION = 0.78, 3.5, 65535.0
CR = dict(sigclip=4.5, sigfrac=0.3, objlim=5.0, niter=4)


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # peak.py beside it, however this is loaded
from peak import peak_rss_mb as _peak_mb  # noqa: E402


def raw_frame(shape, seed: int = 0):
    """(raw uint16, bias, dark in 100 s, flat): sky 800 ADU, 2000 stars, cosmic rays."""
    from gppy_stage.sim import detector, render

    rng = np.random.default_rng(seed)
    ny, nx = shape
    bias = np.full(shape, 512.0, np.float32)
    dark = np.full(shape, 2.0, np.float32)
    flat = np.ones(shape, np.float32)
    flat *= np.float32(0.95) + np.float32(0.1) * np.linspace(0, 1, nx, dtype=np.float32)[None, :]
    raw = np.empty(shape, np.float32)
    for r in range(0, ny, 512):
        rows = slice(r, min(ny, r + 512))
        raw[rows] = 800.0 * flat[rows]
    n = max(50, int(2000 * ny * nx / (6388 * 9576)))
    render.render_stars(raw, rng.uniform(0, nx, n), rng.uniform(0, ny, n), 10 ** rng.uniform(3, 6, n), 5.0, 2.5)
    detector.add_noise_adu(raw, GAIN, RDNOISE, rng)
    idx, val, _ = detector.cosmic_rays(shape, 100.0, rng)
    raw.reshape(-1)[idx] += val / GAIN
    for r in range(0, ny, 512):
        rows = slice(r, min(ny, r + 512))
        raw[rows] += bias[rows] + dark[rows]
    out = np.clip(np.round(raw), 0, SATURATION).astype(np.uint16)
    return out, bias, dark, flat


def run_reduce(shape) -> dict:
    from gppy_stage.science.reduce import calibrate, remove_cosmic_rays

    raw, bias, dark, flat = raw_frame(shape)
    t0, c0 = time.perf_counter(), time.process_time()
    cal = calibrate(raw, bias=bias, dark=dark, dark_exptime=100.0, exptime=100.0, flat=flat, gain=GAIN,
                    rdnoise=RDNOISE, saturation=SATURATION)
    del raw, bias, dark, flat
    data, crmask = remove_cosmic_rays(cal.data, cal.mask, gain=GAIN, rdnoise=RDNOISE, saturation=SATURATION, **CR)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "cosmic_ray_pixels": int(crmask.sum())}


def run_astroscrappy(shape) -> dict:
    import astroscrappy

    from gppy_stage.science.reduce import calibrate

    raw, bias, dark, flat = raw_frame(shape)
    cal = calibrate(raw, bias=bias, dark=dark, dark_exptime=100.0, exptime=100.0, flat=flat, gain=GAIN,
                    rdnoise=RDNOISE, saturation=SATURATION)
    del raw, bias, dark, flat
    t0, c0 = time.perf_counter(), time.process_time()
    crmask, _ = astroscrappy.detect_cosmics(cal.data, inmask=cal.mask != 0, gain=GAIN, readnoise=RDNOISE,
                                            satlevel=SATURATION, sepmed=True, cleantype="meanmask",
                                            fsmode="median", **CR)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "cosmic_ray_pixels": int(crmask.sum())}


def run_detect(shape) -> dict:
    from gppy_stage.science.detect import detect_candidates
    from gppy_stage.sim.pairs import render

    rng = np.random.default_rng(1)
    ny, nx = shape
    diff = np.empty(shape, np.float32)
    for r in range(0, ny, 512):
        diff[r:r + 512] = rng.standard_normal((min(512, ny - r), nx), dtype=np.float32) * np.float32(7.0)
    noise = np.full(shape, 7.0, np.float32)
    mask = np.zeros(shape, bool)
    mask[ny // 3:ny // 3 + 20] = True
    xs, ys = rng.uniform(50, nx - 50, 40), rng.uniform(50, ny - 50, 40)
    for x, y in zip(xs, ys):
        cx, cy = int(x), int(y)
        diff[cy - 20:cy + 21, cx - 20:cx + 21] += render((41, 41), [20 + x - cx], [20 + y - cy], [5000.0],
                                                         5.0).astype(np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    t = detect_candidates(diff, noise, mask, fwhm=5.0, zp=25.0)
    found = sum(np.min(np.hypot(np.asarray(t["x"]) - x, np.asarray(t["y"]) - y)) < 1.0 for x, y in zip(xs, ys))
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "candidates": len(t), "injected_found": int(found),
            "injected": len(xs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("reduce", "astroscrappy", "detect"))
    ap.add_argument("--size", choices=tuple(SIZES), default="full")
    args = ap.parse_args(argv)
    shape = SIZES[args.size]
    result = {"reduce": run_reduce, "astroscrappy": run_astroscrappy, "detect": run_detect}[args.mode](shape)
    print(json.dumps({"mode": args.mode, "shape": list(shape), **result, "peak_rss_mb": round(_peak_mb(), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
