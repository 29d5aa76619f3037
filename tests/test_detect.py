"""Difference-image detection, candidate flags and score, DS9 regions and PNG stamps.

Truth comes from what is injected: simulated pairs subtracted by the native engine, and
synthetic per-frame difference images for motion.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from gppy_stage.science.detect import FLAG_BITS, detect_candidates
from gppy_stage.science.stamps import candidate_stamps, region_text, stamp_png
from gppy_stage.science.subtract import subtract
from gppy_stage.sim.pairs import make_pair, render

SHAPE = (512, 512)
ZP = 25.0
INJ = (251.3, 140.6, 4.0e4)  # x, y, flux in reference units
FWHM = 4.0


def _wcs(shape=SHAPE, scale_arcsec=0.505):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, -30.0]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cdelt = [-scale_arcsec / 3600, scale_arcsec / 3600]
    return w


@pytest.fixture(scope="module")
def scene():
    p = make_pair(SHAPE, n_stars=200, inject=[INJ], seed=21)
    r = subtract(p["new"], p["ref"], new_var=p["new_var"], ref_var=p["ref_var"])
    return p, r


@pytest.fixture(scope="module")
def scene_bright_shift():
    rng = np.random.default_rng(4)
    x0, y0 = 380.0, 400.0
    p = make_pair(SHAPE, n_stars=200, inject=[INJ], seed=21)
    # add one bright star on both images, 0.4 px apart: a misaligned star
    extra_ref = render(SHAPE, [x0], [y0], [2.0e5], 2.5)
    extra_new = render(SHAPE, [x0 + 0.4], [y0 - 0.3], [2.0e5 * p["flux_scale"]], 4.0)
    p["ref"] = p["ref"] + rng.poisson(extra_ref) * 1.0
    p["new"] = p["new"] + rng.poisson(extra_new) * 1.0
    p["ref_var"] = p["ref_var"] + extra_ref
    p["new_var"] = p["new_var"] + extra_new
    r = subtract(p["new"], p["ref"], new_var=p["new_var"], ref_var=p["ref_var"])
    return p, r, (x0, y0)


def _nearest_row(t, x, y):
    d = np.hypot(np.asarray(t["x"]) - x, np.asarray(t["y"]) - y)
    i = int(np.argmin(d))
    return t[i], d[i]


def test_injected_source_found_with_right_magnitude(scene):
    p, r = scene
    t = detect_candidates(r.diff, r.noise, r.mask, fwhm=FWHM, zp=ZP, wcs=_wcs())
    row, d = _nearest_row(t, INJ[0], INJ[1])
    expected = ZP - 2.5 * np.log10(INJ[2])
    print(f"injected: found at {d:.3f} px, mag {row['mag']:.4f} +- {row['magerr']:.4f} vs {expected:.4f}, "
          f"S/N {row['snr']:.1f}, score {row['score']:.3f}; {len(t)} candidates in all")
    assert d < 1.0
    assert abs(row["mag"] - expected) < max(0.03, 3 * row["magerr"])
    assert row["flags"] == 0 and row["score"] > 0.8
    assert not row["negative"] and not row["dipole"]
    # sky coordinates follow the WCS
    ra, dec = _wcs().pixel_to_world_values(INJ[0], INJ[1])
    assert abs(row["ra"] - ra) * np.cos(np.radians(dec)) * 3600 < 0.6 and abs(row["dec"] - dec) * 3600 < 0.6
    # every boolean flag is also a bit
    for name, bit in FLAG_BITS.items():
        assert np.array_equal(np.asarray(t[name]), (np.asarray(t["flags"]) & bit) != 0)


def test_misaligned_star_is_a_flagged_dipole(scene_bright_shift):
    p, r, (x0, y0) = scene_bright_shift
    t = detect_candidates(r.diff, r.noise, r.mask, fwhm=FWHM, zp=ZP)
    near = t[np.hypot(np.asarray(t["x"]) - x0, np.asarray(t["y"]) - y0) < 2 * FWHM]
    print(near["x", "y", "snr", "negative", "dipole", "score"])
    assert len(near) >= 1
    assert np.all(near["dipole"])
    assert np.all(near["score"] < 0.3)
    clean, d = _nearest_row(t, INJ[0], INJ[1])
    assert d < 1.0 and not clean["dipole"]


def _frame_diff(rng, xs, ys, fluxes, sigma=10.0, shape=(256, 256)):
    model = render(shape, xs, ys, fluxes, FWHM) if len(xs) else np.zeros(shape)
    return model + rng.normal(0, sigma, shape), np.full(shape, sigma)


def test_moving_source_flagged_static_not():
    rng = np.random.default_rng(5)
    shape = (256, 256)
    # an asteroid moving 5 px between the two frames, and a static transient
    mover = [(100.0, 120.0), (105.0, 121.0)]
    static = (180.0, 60.0)
    frames = []
    for mx, my in mover:
        frames.append(_frame_diff(rng, [mx, static[0]], [my, static[1]], [8000.0, 8000.0], shape=shape))
    stack = (frames[0][0] + frames[1][0]) / 2
    stack_noise = frames[0][1] / np.sqrt(2)
    t = detect_candidates(stack, stack_noise, None, fwhm=FWHM, zp=ZP, frame_diffs=frames)
    m, dm = _nearest_row(t, 102.5, 120.5)
    s, ds = _nearest_row(t, *static)
    print(t["x", "y", "snr", "n_frames", "moving", "elongated", "score"])
    assert dm < 3 and ds < 1
    assert m["moving"] and m["n_frames"] == 2
    assert not s["moving"] and s["n_frames"] == 2
    assert s["score"] > m["score"]
    # the same answer from per-frame detection tables (what a caller with catalogues passes)
    dets = [Table({"x": [mx, static[0]], "y": [my, static[1]]}) for mx, my in mover]
    t2 = detect_candidates(stack, stack_noise, None, fwhm=FWHM, zp=ZP, frame_detections=dets)
    assert _nearest_row(t2, 102.5, 120.5)[0]["moving"] and not _nearest_row(t2, *static)[0]["moving"]


def test_false_positives_on_pure_noise():
    rng = np.random.default_rng(123)
    z = rng.normal(0, 1, (1024, 1024))
    t = detect_candidates(z, np.ones_like(z), None, fwhm=FWHM, threshold=5.0)
    # correlated noise (as after convolving one input) with a nominal, white-noise noise map:
    # the measured noise factor keeps "5 sigma" honest
    from scipy.signal import fftconvolve

    k = np.exp(-np.add.outer(np.arange(-4, 5) ** 2, np.arange(-4, 5) ** 2) / (2 * 1.2**2))
    c = fftconvolve(rng.normal(0, 1, (1024, 1024)), k / np.sqrt((k**2).sum()), mode="same")
    tc = detect_candidates(c, np.ones_like(c), None, fwhm=FWHM, threshold=5.0)
    print(f"false positives at 5 sigma on 1024x1024: white {len(t)}, correlated {len(tc)} "
          f"(noise factor {tc.meta['NOISECOR']:.2f})")
    assert len(t) <= 2
    assert len(tc) <= 3
    assert tc.meta["NOISECOR"] > 1.3


def test_edge_mask_negative_and_refstar_flags():
    rng = np.random.default_rng(9)
    shape = (256, 256)
    srcs = {"edge": (3.0, 100.0, 6000.0), "masked": (100.0, 100.0, 6000.0), "neg": (180.0, 180.0, -6000.0),
            "refstar": (60.0, 200.0, 6000.0), "clean": (200.0, 60.0, 6000.0)}
    xs, ys, fs = (np.array(v) for v in zip(*srcs.values()))
    d, n = _frame_diff(rng, xs, ys, fs, shape=shape)
    mask = np.zeros(shape, bool)
    mask[103, 102] = True
    w = _wcs(shape)
    ra, dec = w.pixel_to_world_values(60.3, 200.2)  # 0.18" from the source: within 1"
    refcat = Table({"ra": [ra], "dec": [dec]})
    t = detect_candidates(d, n, mask, fwhm=FWHM, zp=ZP, wcs=w, ref_catalog=refcat)
    rows = {k: _nearest_row(t, v[0], v[1]) for k, v in srcs.items()}
    for k, (row, dist) in rows.items():
        assert dist < 1.5, k
    assert rows["edge"][0]["near_edge"]
    assert rows["masked"][0]["near_mask"] and not rows["masked"][0]["near_edge"]
    assert rows["neg"][0]["negative"] and rows["neg"][0]["snr"] > 5
    assert rows["refstar"][0]["ref_star"]
    c = rows["clean"][0]
    assert c["flags"] == 0 and c["score"] > 0.8
    assert all(rows[k][0]["score"] < c["score"] for k in ("edge", "masked", "neg", "refstar"))
    # a reference star 3" away does not match
    ra2, dec2 = w.pixel_to_world_values(60.0 + 6.0, 200.0)
    t2 = detect_candidates(d, n, mask, fwhm=FWHM, zp=ZP, wcs=w, ref_catalog=Table({"ra": [ra2], "dec": [dec2]}))
    assert not _nearest_row(t2, 60.0, 200.0)[0]["ref_star"]


def test_elongated_and_fwhm_flags():
    rng = np.random.default_rng(2)
    shape = (256, 256)
    # a streak (satellite-like): a row of point sources; a cosmic-ray-like single hot pixel
    xs = list(np.arange(60, 90, 1.0))
    d, n = _frame_diff(rng, xs, [128.0] * len(xs), [600.0] * len(xs), shape=shape)
    d[200, 200] += 400.0
    t = detect_candidates(d, n, None, fwhm=FWHM, zp=ZP)
    streak, ds = _nearest_row(t, 75.0, 128.0)
    hot, dh = _nearest_row(t, 200.0, 200.0)
    assert ds < 3 and streak["elongated"]
    assert dh < 1 and hot["bad_fwhm"]


def test_region_text_and_stamps(scene):
    import matplotlib.image as mpimg

    p, r = scene
    t = detect_candidates(r.diff, r.noise, r.mask, fwhm=FWHM, zp=ZP, wcs=_wcs())
    reg = region_text(t)
    lines = reg.strip().splitlines()
    assert lines[2] == "fk5" and len(lines) == 3 + len(t)
    assert all(line.startswith("circle(") for line in lines[3:])
    img_reg = region_text(t, sky=False)
    row, _ = _nearest_row(t, INJ[0], INJ[1])
    assert f"circle({row['x'] + 1:.2f},{row['y'] + 1:.2f}," in img_reg  # DS9 counts from 1
    stamps = candidate_stamps(p["new"], p["ref"], r.diff, t, noise=r.noise, max_stamps=3)
    assert len(stamps) == min(3, len(t))
    for png in stamps.values():
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        im = mpimg.imread(io.BytesIO(png), format="png")
        assert im.shape[1] > 2 * im.shape[0]  # three panels side by side
    # a stamp at the corner still renders (cut-outs padded with NaN)
    assert stamp_png(p["new"], p["ref"], r.diff, 0.0, 0.0)[:4] == b"\x89PNG"


def test_moving_flag_from_whole_frame_catalogues():
    """Per-frame catalogues hold every star and galaxy too: a transient beside its host, found in
    only one frame while the galaxy is in both, must not read as motion; the asteroid must."""
    rng = np.random.default_rng(8)
    shape = (256, 256)
    host, transient, asteroid = (60.0, 60.0), (63.0, 61.0), [(150.0, 150.0), (154.0, 152.0)]
    d, n = _frame_diff(rng, [transient[0], *[a[0] for a in asteroid]], [transient[1], *[a[1] for a in asteroid]],
                       [8000.0, 4000.0, 4000.0], shape=shape)
    stars = rng.uniform(20, 236, (40, 2))
    frames = []
    for k, (ax, ay) in enumerate(asteroid):
        xs = [*stars[:, 0] + rng.normal(0, 0.1, 40), host[0], ax] + ([transient[0]] if k == 0 else [])
        ys = [*stars[:, 1] + rng.normal(0, 0.1, 40), host[1], ay] + ([transient[1]] if k == 0 else [])
        frames.append(Table({"x": xs, "y": ys}))
    t = detect_candidates(d, n, None, fwhm=FWHM, zp=ZP, frame_detections=frames)
    tr, dt = _nearest_row(t, *transient)
    ast, da = _nearest_row(t, 152.0, 151.0)
    assert dt < 1 and da < 3
    assert not tr["moving"] and tr["n_frames"] == 2
    assert ast["moving"]


def test_total_magnitude_of_a_moffat_source_with_the_growth_curve():
    """A PSF with wings (Moffat, beta 2.5) loses ~13 % of its flux outside the 1.5-FWHM aperture;
    the photometry stage's growth curve in the header (``APER_k``, ``APC_APER_k``) puts it back."""
    from astropy.io import fits

    from gppy_stage.science.detect import APER_FWHM, APERTURE_KEYS, growth_correction

    beta, flux, pixscale = 2.5, 2.0e4, 0.5
    alpha = FWHM / (2 * np.sqrt(2 ** (1 / beta) - 1))

    def enclosed(r):  # analytic Moffat growth curve: the truth
        return 1 - (1 + (r / alpha) ** 2) ** (1 - beta)

    header = fits.Header()
    for key, diameter_px in zip(APERTURE_KEYS, (3.0, 6.0, 9.0, 12.0, 16.0, 20.0)):
        header[key] = diameter_px * pixscale
        header[f"HIERARCH APC_{key}"] = -2.5 * np.log10(enclosed(diameter_px / 2))
    radius = APER_FWHM * FWHM
    corr = growth_correction(header, radius, pixscale)
    assert abs(corr * enclosed(radius) - 1) < 0.01
    assert growth_correction(header, 50.0, pixscale) is None  # no extrapolation past the curve

    rng = np.random.default_rng(11)
    shape = (256, 256)
    d = render(shape, [128.3], [120.6], [flux], FWHM, beta=beta) + rng.normal(0, 3.0, shape)
    n = np.full(shape, 3.0)
    expected = ZP - 2.5 * np.log10(flux)
    plain, _ = _nearest_row(detect_candidates(d, n, None, fwhm=FWHM, zp=ZP), 128.3, 120.6)
    row, dist = _nearest_row(detect_candidates(d, n, None, fwhm=FWHM, zp=ZP, aper_corr=corr), 128.3, 120.6)
    print(f"Moffat source: mag {row['mag']:.4f} with the growth curve, {plain['mag']:.4f} without, true {expected:.4f}")
    assert dist < 0.5
    assert plain["mag"] - expected > 0.1
    assert abs(row["mag"] - expected) < max(0.02, 3 * row["magerr"])


@pytest.mark.slow
def test_full_size_detect_stays_under_2_gb():
    """detect_candidates on a 9576x6388 difference image, in its own process: under 2 GiB peak
    RSS, and every injected source found."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_fullsize_kernels.py"
    proc = subprocess.run([sys.executable, str(bench), "detect"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["peak_rss_mb"] < 2048, result
    assert result["injected_found"] >= result["injected"] - 1
