"""Benchmark: the master combine of 9 full-size 7DT frames, against ccdproc's `combine`.

Both sides do the same work: read 9 raw uint16 frames (BZERO 32768) from disk, sigma-clip at 3
sigma about the median with the standard deviation, and take the median. Each side runs in its
own process so that its peak RSS is its own. Prints wall time, the ratio against ccdproc (the
named baseline) and peak RSS, and states the machine.

    python bench/bench_masters.py [--size full|small] [--frames 9] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {"full": (6388, 9576), "small": (1024, 1536)}


def make_frames(folder: Path, n: int, shape: tuple[int, int]) -> list[Path]:
    from astropy.io import fits

    rng = np.random.default_rng(0)
    pattern = (512 + rng.normal(0, 2, shape[1])[None, :]).astype(np.float32)
    paths = []
    for i in range(n):
        path = folder / f"bias_{i:02d}.fits"
        if not path.exists():
            data = np.empty(shape, dtype=np.uint16)
            for r in range(0, shape[0], 512):  # write in row blocks: the generator stays small
                block = pattern + rng.normal(0, 3.85, (min(512, shape[0] - r), shape[1]))
                data[r:r + 512] = np.clip(np.round(block), 0, 65535)
            fits.PrimaryHDU(data).writeto(path)
        paths.append(path)
    return paths


def run_ours(paths: list[str]) -> dict:
    import contextlib

    from gppy_stage.fitsio import open_raw
    from gppy_stage.stages.masters import combine_files

    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        frames = [stack.enter_context(open_raw(p)) for p in paths]
        image, _ = combine_files(frames, lambda rows, a, b, i: rows, sigma=3.0, iterations=1, chunk_rows=256)
    return {"seconds": time.perf_counter() - t0, "median": float(np.median(image[::16, ::16]))}


def run_ccdproc(paths: list[str]) -> dict:
    import astropy.units as u
    from ccdproc import combine

    t0 = time.perf_counter()
    image = combine(paths, method="median", sigma_clip=True, sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
                    sigma_clip_func=np.ma.median, sigma_clip_dev_func=np.ma.std, unit=u.adu, dtype=np.float32)
    return {"seconds": time.perf_counter() - t0, "median": float(np.median(image.data[::16, ::16]))}


def child(which: str, paths: list[str]) -> None:
    result = {"ours": run_ours, "ccdproc": run_ccdproc}[which](paths)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, numpy {np.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="full")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gppy-bench-masters")
    ap.add_argument("--child", choices=["ours", "ccdproc"], help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.paths)
        return
    shape = SIZES[args.size]
    folder = args.workdir / f"{args.size}_{args.frames}"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"input: {args.frames} raw frames of {shape[1]}x{shape[0]} uint16 (BZERO 32768) on local disk ({folder})")
    paths = [str(p) for p in make_frames(folder, args.frames, shape)]
    results = {}
    for which in ("ccdproc", "ours"):
        proc = subprocess.run([sys.executable, __file__, "--child", which, *paths], capture_output=True, text=True)
        if proc.returncode:
            print(f"{which} failed:\n{proc.stderr[-2000:]}")
            return
        results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["ccdproc"]["seconds"]
    print("method: sigma-clipped median, 3 sigma about the median with the std, one clipping pass (both)")
    print(f"{'implementation':<26}{'time s':>9}{'vs ccdproc':>12}{'peak RSS MB':>13}{'median ADU':>12}")
    for name, label in (("ccdproc", "ccdproc.combine (baseline)"), ("ours", "gppy-stage combine_files")):
        r = results[name]
        print(f"{label:<26}{r['seconds']:>9.1f}{base / r['seconds']:>11.2f}x{r['peak_rss_mb']:>13.0f}{r['median']:>12.2f}")


if __name__ == "__main__":
    main()
