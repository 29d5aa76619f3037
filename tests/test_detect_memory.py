"""The detect kernel's memory: the matched-filter S/N map made on strips equals one made on the
whole frame by a plain 2-D correlation, and memory-mapped inputs are copied without their pages
staying resident (files just written included, and without losing a change made in memory)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from astropy.io import fits
from scipy.ndimage import correlate, maximum_filter

from gppy_stage.science.detect import _gauss_kernel, _prepared, snr_map

FWHM = 3.2


def _scene(shape=(301, 203), seed=3):
    rng = np.random.default_rng(seed)
    d = rng.normal(0, 4.0, shape).astype(np.float32)
    d[150:153, 100:103] += 400.0
    n = rng.uniform(3.0, 5.0, shape).astype(np.float32)
    n[40:47, 10:30] = 0  # no noise estimate: bad
    mask = np.zeros(shape, np.uint8)
    mask[200:204] = 1
    d[7, 9] = np.nan
    return d, n, mask


def _snr_whole_frame(d, n, bad, fwhm):
    """The same S/N by one full 2-D kernel over the whole frame: (d/n^2 * k) / sqrt(1/n^2 * k^2)."""
    k = _gauss_kernel(fwhm)
    ivar = np.where(bad, 0.0, 1.0 / np.where(bad, 1.0, n.astype(float)) ** 2)
    num = correlate(ivar * d, k, mode="constant", cval=0.0)
    den = correlate(ivar, k * k, mode="constant", cval=0.0)
    h = k.shape[0] // 2
    good = (den > 0) & ~(maximum_filter(bad.astype(np.uint8), size=2 * h + 1) > 0)
    return np.where(den > 0, num / np.sqrt(np.where(den > 0, den, 1.0)), 0.0), good


@pytest.mark.parametrize("strip_rows,workers", [(37, 2), (1000, 1)])
def test_snr_map_on_strips_equals_the_whole_frame_correlation(strip_rows, workers):
    d, n, bad = _prepared(*_scene())
    snr, good = snr_map(d, n, bad, FWHM, strip_rows=strip_rows, workers=workers)
    ref, ref_good = _snr_whole_frame(d, n, bad, FWHM)
    print(f"strips of {strip_rows} rows: max |S/N - whole frame| = {np.abs(snr - ref).max():.2e}; "
          f"peak S/N {snr.max():.1f}")
    assert snr.dtype == np.float32
    np.testing.assert_allclose(snr, ref, rtol=1e-4, atol=1e-4)
    assert np.array_equal(good, ref_good)
    assert snr[151, 101] > 50  # the source is there, in the core of a strip or across a border


def _mapped_rss_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[-1] == str(path)
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_memory_mapped_inputs_are_copied_and_their_pages_let_go(tmp_path):
    d, n, mask = _scene((1500, 1100))
    paths = {}
    for name, arr in (("diff", d), ("noise", n), ("mask", mask)):
        paths[name] = tmp_path / f"{name}.fits"
        fits.PrimaryHDU(arr).writeto(paths[name])
    expected = _prepared(d, n, mask)
    with fits.open(paths["diff"], memmap=True) as hd, fits.open(paths["noise"], memmap=True) as hn, \
            fits.open(paths["mask"], memmap=True) as hm:
        hd[0].data[5, 5] = 99.0  # a change made in memory only (copy-on-write): it must be what is read
        got = _prepared(hd[0].data, hn[0].data, hm[0].data)
        resident = {k: _mapped_rss_kib(p) for k, p in paths.items()}
        kept = float(hd[0].data[5, 5])
        unchanged = np.array_equal(hn[0].data, n)
    size_kib = {k: p.stat().st_size // 1024 for k, p in paths.items()}
    print(f"resident after the copy: {resident} KiB of files of {size_kib} KiB")
    assert got[0][5, 5] == 99.0 and kept == 99.0  # in the copy, and still in the caller's array
    assert unchanged  # pages let go read back as the file
    got[0][5, 5] = expected[0][5, 5]
    for a, b in zip(got, expected):
        assert np.array_equal(a, b)
    assert (got[1][got[2]] == 0).all()  # the noise is 0 (finite) where bad, as sep takes it
    # the strip holding the change (the first of three) stays; the rest of each file is let go
    assert resident["diff"] < 0.5 * size_kib["diff"]
    # the kernel's fault-around may map back a few pages at each strip's border (a CI run kept 23 %
    # of the 1.6 MB mask, 372 KiB): what matters is that the files are not kept whole
    assert resident["noise"] < 0.5 * size_kib["noise"] and resident["mask"] < 0.5 * size_kib["mask"]
