"""Benchmark: image subtraction engines on a simulated 2048x2048 pair.

Baseline: the native engine on NumPy. Compared with the native engine on CuPy (when CuPy and
a CUDA device exist) and HOTPANTS (when on PATH). For each it prints wall time, the ratio to
the baseline, and the residual noise ratio (measured scatter / expected noise in source-free
regions; 1.00 is ideal), plus the kernel's flux scale against the truth.

    python bench/bench_subtract.py [--size 2048] [--stars 600] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gppy_stage.science.subtract import subtract  # noqa: E402
from gppy_stage.science.subtract_sim import make_pair  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cupy_device():
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return None, "CuPy installed, no CUDA device"
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        return cupy, name.decode() if isinstance(name, bytes) else str(name)
    except Exception as exc:
        return None, f"no CuPy/CUDA ({exc.__class__.__name__})"


def source_free(p, shape, radius=15):
    free = np.ones(shape, bool)
    xs = np.r_[p["x"], [s[0] for s in p["inject"]]]
    ys = np.r_[p["y"], [s[1] for s in p["inject"]]]
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = xx**2 + yy**2 <= radius**2
    for x, y in zip(np.rint(xs).astype(int), np.rint(ys).astype(int)):
        y0, x0 = y - radius, x - radius
        sy, sx = slice(max(y0, 0), min(y + radius + 1, shape[0])), slice(max(x0, 0), min(x + radius + 1, shape[1]))
        free[sy, sx] &= ~disk[sy.start - y0:sy.stop - y0, sx.start - x0:sx.stop - x0]
    return free


def run(label, fn, repeat):
    times = []
    res = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
    return label, min(times), res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--stars", type=int, default=600)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args(argv)
    shape = (a.size, a.size)
    rng = np.random.default_rng(3)
    inject = [(float(x), float(y), 5e4) for x, y in zip(rng.uniform(50, a.size - 50, 20), rng.uniform(50, a.size - 50, 20))]
    t0 = time.perf_counter()
    p = make_pair(shape, n_stars=a.stars, fwhm_new=4.0, fwhm_ref=2.5, flux_scale=1.3, fwhm_new_gradient=0.15,
                  inject=inject, seed=1)
    t_sim = time.perf_counter() - t0
    free = source_free(p, shape)
    cp, gpu = cupy_device()
    print("# bench_subtract")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores, python {platform.python_version()}, "
          f"numpy {np.__version__}; GPU: {gpu}")
    print(f"pair: {shape[0]}x{shape[1]} float64, {a.stars} stars + {len(inject)} injected, FWHM new 4.0 px (+-7.5% "
          f"across x) / ref 2.5 px, flux scale 1.3, sky 1200/1000 ADU; simulated in {t_sim:.1f} s")
    kw = dict(new_var=p["new_var"], ref_var=p["ref_var"])
    rows = [run("native/numpy", lambda: subtract(p["new"], p["ref"], **kw), a.repeat)]
    if cp is not None:
        nd = {k: cp.asarray(p[k]) for k in ("new", "ref", "new_var", "ref_var")}

        def gpu_run():
            r = subtract(nd["new"], nd["ref"], new_var=nd["new_var"], ref_var=nd["ref_var"], xp=cp)
            cp.cuda.Device().synchronize()
            return r

        gpu_run()  # warm-up: CUDA context, FFT plans, kernel compilation
        rows.append(run("native/cupy", gpu_run, a.repeat))
    else:
        print(f"native/cupy: skipped ({gpu})")
    if shutil.which("hotpants"):
        rows.append(run("hotpants", lambda: subtract(p["new"], p["ref"], engine="hotpants", **kw), a.repeat))
    else:
        print("hotpants: skipped (not on PATH)")
    base = rows[0][1]
    print(f"{'engine':<14} {'time_s':>8} {'vs numpy':>9} {'noise_ratio':>12} {'flux_scale':>11} {'stamps':>7} convolved")
    for label, t, r in rows:
        h = r.to_numpy()
        ok = free & ~h.mask
        ratio = float(np.std(h.diff[ok]) / np.sqrt(np.mean(h.noise[ok] ** 2)))
        ki = h.kernel_info
        print(f"{label:<14} {t:8.2f} {base / t:8.2f}x {ratio:12.4f} {ki['flux_scale']:11.4f} "
              f"{str(ki.get('n_stamps')):>7} {h.convolved}")
    print("(vs numpy = baseline time / this time; noise_ratio = std(diff) / rms(noise) on source-free, "
          "unmasked pixels; true flux scale 1.3000)")


if __name__ == "__main__":
    main()
