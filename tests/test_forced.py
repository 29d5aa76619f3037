"""Forced photometry light curves: fluxes at a fixed position on each frame minus the reference.

Truth: the simulator's (a tiny night of 12 frames whose transient brightens by 0.5 mag, its
magnitude per frame in ``frames.json``), and synthetic cut-outs with known fluxes for the
statistics of the errors over 80 epochs, where a reduced chi-square is pinned to +-0.16.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from astropy.table import Table

from gppy_stage.science import forced
from gppy_stage.science.kernel import SIGMA_PER_FWHM

UNIT, NIGHT, FILTER = "7DT01", "2025-01-01_gain2750", "m425"
CHANGE = -0.5


def _ujy(mag: float) -> float:
    return 10 ** (-0.4 * (mag - 23.9))


def _gauss(shape, xs, ys, fluxes, fwhm):
    s = fwhm * SIGMA_PER_FWHM
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape)
    for x, y, f in zip(xs, ys, fluxes):
        img += f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)
    return img


def test_synthetic_fluxes_follow_the_truth_and_faint_ones_are_limits():
    """80 epochs of one source at a fixed place, 0 to 40 sigma, on cut-outs whose reference is
    sharper and deeper: pulls against the injected flux have a reduced chi-square near 1, and an
    epoch with no flux comes out as an upper limit."""
    rng = np.random.default_rng(7)
    shape, x0, y0, zp = (128, 128), 64.3, 63.6, 25.0
    sx, sy = rng.uniform(10, 118, 20), rng.uniform(10, 118, 20)
    keep = np.hypot(sx - x0, sy - y0) > 15
    sx, sy, sf = sx[keep], sy[keep], rng.uniform(2e4, 2e5, keep.sum())
    ref_model = _gauss(shape, sx, sy, sf, 3.2)
    ref_var = np.full(shape, 4.0) + ref_model / 10
    fluxes = np.r_[np.zeros(6), np.linspace(100, 6000, 74)]
    pulls, limits = [], []
    for k, f_true in enumerate(fluxes):
        fwhm = rng.uniform(4.0, 5.0)
        model = 300.0 + _gauss(shape, np.r_[sx, x0], np.r_[sy, y0], np.r_[sf, f_true], fwhm)
        var = model + 25.0
        new = model + rng.normal(0, np.sqrt(var))
        ref = ref_model + rng.normal(0, np.sqrt(ref_var))
        d = forced.difference(new, var, np.zeros(shape, bool), ref, ref_var, np.zeros(shape, bool),
                              fwhm_new=fwhm, fwhm_ref=3.2)
        radius = 1.5 * fwhm
        corr = 1 / (1 - math.exp(-radius**2 / (2 * (fwhm * SIGMA_PER_FWHM) ** 2)))
        flux, err, ok = forced.aperture_flux(d.diff, d.noise, d.mask, x0, y0, radius, corr)
        assert ok
        pulls.append((flux - f_true) / err)
        f_ujy, e_ujy = forced.to_microjansky(flux, err, zp)
        limits.append(forced.magnitudes(f_ujy, e_ujy))
        if k == 0:
            print(f"method {d.method}, convolved {d.convolved}")
    chi2 = float(np.mean(np.square(pulls)))
    print(f"reduced chi-square {chi2:.3f} over {len(pulls)} epochs; mean pull {np.mean(pulls):+.3f}")
    assert 0.7 <= chi2 <= 1.5
    assert abs(np.mean(pulls)) < 3 / math.sqrt(len(pulls))  # no bias beyond 3 sigma of the mean
    for lim in limits[:6]:  # no flux: a 5-sigma limit, no magnitude
        assert lim["upper_limit"] and math.isnan(lim["mag"]) and math.isfinite(lim["mag_lim"])
    bright = limits[-1]
    assert not bright["upper_limit"] and bright["mag"] < bright["mag_lim"]


def test_cutout_box_stays_inside_and_header_follows_it():
    from astropy.io import fits
    from astropy.wcs import WCS

    assert forced.cutout_box((100, 200), 5.0, 95.0, 16) == (68, 100, 0, 32)
    assert forced.cutout_box((100, 200), -1.0, 50.0, 16) is None
    h = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.0, "CRVAL2": -20.0, "CRPIX1": 100.0,
                     "CRPIX2": 50.0, "CD1_1": -1.4e-4, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 1.4e-4})
    cut = forced.shifted_header(h, 30, 12, (32, 32))
    full = WCS(h).pixel_to_world_values(40.0, 20.0)
    assert np.allclose(WCS(cut).pixel_to_world_values(10.0, 8.0), full, atol=1e-10)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A tiny night (12 frames of one filter) whose transient brightens by 0.5 mag, run whole:
    12 epochs, since with 6 a reduced chi-square spreads by +-0.6 and 0.7-1.5 would prove nothing.
    Seed 4: its transient sits 2.1" from a 14 mag host, the harder case for the cut-outs' kernel
    (``science.forced``'s note; seed 3 gives reduced chi-square 1.28, mean pull +0.19)."""
    from gppy_stage.runner import run_night
    from gppy_stage.sim import simulate_night
    from gppy_stage.sim.lightcurve import LightCurve

    root = tmp_path_factory.mktemp("forced") / "root"
    simulate_night(root, unit=UNIT, night=NIGHT[:10], filters=(FILTER,), size="tiny", seed=4, n_science=12,
                   transient_lc=LightCurve(CHANGE))
    report = run_night(str(root), UNIT, NIGHT, workers=2, progress=False)
    assert report["exit_code"] == 0, report["failures"]
    truth_dir = root / "truth" / UNIT / NIGHT
    frames = [e for e in json.loads((truth_dir / "frames.json").read_text()) if e["imagetyp"] == "LIGHT"]
    transient = json.loads((truth_dir / "transients.json").read_text())["transient"]
    (stack_dir,) = (root / "processed").rglob("*com.stamps")
    cands = Table.read(next(stack_dir.parent.glob("*com.cand.ecsv")), format="ascii.ecsv")
    return root, frames, transient, stack_dir, cands


def _transient_candidate(cands, transient):
    passing = cands[np.asarray(cands["pass"], bool)]
    d = np.hypot((np.asarray(passing["ra"]) - transient["ra"]) * math.cos(math.radians(transient["dec"])),
                 np.asarray(passing["dec"]) - transient["dec"]) * 3600
    assert len(d) and d.min() < 1.0, "the simulated transient is not a passing candidate"
    return passing[int(np.argmin(d))]


def test_light_curve_files_beside_the_stamp(night):
    root, frames, transient, stack_dir, cands = night
    cid = int(_transient_candidate(cands, transient)["id"])
    for name in (f"cand_{cid:04d}.png", f"cand_{cid:04d}.lc.png"):
        assert (stack_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lc = Table.read(stack_dir / f"cand_{cid:04d}.lc.ecsv", format="ascii.ecsv")
    assert list(lc.colnames) == list(forced.LC_COLUMNS)
    assert list(lc["kind"]) == ["frame"] * len(frames) + ["stack"]
    assert str(lc["flux_ujy"].unit) == "uJy" and lc.meta["CAND"] == cid
    assert np.all(np.diff(np.asarray(lc["mjd"][:-1], float)) > 0)
    assert set(lc["filter"]) == {FILTER}
    listed = json.loads((root / "runs" / UNIT / NIGHT / "night_report.json").read_text())["candidates"]
    assert [c["light_curve"] for c in listed if c["id"] == cid][0].endswith(f"cand_{cid:04d}.lc.ecsv")


def test_forced_fluxes_follow_the_brightening_truth(night):
    root, frames, transient, stack_dir, cands = night
    cid = int(_transient_candidate(cands, transient)["id"])
    lc = Table.read(stack_dir / f"cand_{cid:04d}.lc.ecsv", format="ascii.ecsv")
    rows = lc[lc["kind"] == "frame"]
    truth = np.array([_ujy(e["transient_mag"]) for e in sorted(frames, key=lambda e: e["date_obs"])])
    flux, err = np.asarray(rows["flux_ujy"], float), np.asarray(rows["flux_err_ujy"], float)
    pulls = (flux - truth) / err
    chi2 = float(np.mean(pulls**2))
    print("truth uJy", np.round(truth, 1), "\nforced  ", np.round(flux, 1), "\n+-      ", np.round(err, 1),
          f"\npulls {np.round(pulls, 2)}, reduced chi-square {chi2:.2f} over {len(pulls)} frames")
    assert np.all(np.abs(pulls) < 3.5)
    # issue 13's criterion; 12 dof put a true chi2/dof in 0.7-1.5 with 64 % probability, so the
    # night's seed is fixed and the 80-epoch synthetic above is what pins the errors' scale
    assert 0.7 <= chi2 <= 1.5
    assert abs(np.mean(pulls)) < 3 / math.sqrt(len(pulls))  # the fluxes are not biased
    assert not np.any(rows["upper_limit"]) and np.all(np.isfinite(rows["mag"]))
    # the brightening: a straight line through the magnitudes against time recovers the change
    t = (np.asarray(rows["mjd"], float) - rows["mjd"][0]) / (rows["mjd"][-1] - rows["mjd"][0])
    w = 1 / np.asarray(rows["magerr"], float) ** 2
    A = np.c_[np.ones_like(t), t]
    cov = np.linalg.inv(A.T @ (A * w[:, None]))
    slope = float((cov @ (A.T @ (w * np.asarray(rows["mag"], float))))[1])
    print(f"fitted change {slope:+.3f} +- {math.sqrt(cov[1, 1]):.3f} mag (true {CHANGE:+.2f})")
    assert abs(slope - CHANGE) < 3 * math.sqrt(cov[1, 1])
    stack = lc[lc["kind"] == "stack"][0]
    assert abs(stack["flux_ujy"] - truth.mean()) < 3.5 * stack["flux_err_ujy"] + 0.05 * truth.mean()


def test_a_candidate_without_flux_gets_upper_limits(night):
    """Forced at a blank place of the stack (no star in the reference), every frame is a limit."""
    from gppy_stage.names import difference_keys
    from gppy_stage.stages.base import Night
    from gppy_stage.stages.cutouts import primary_images, stack_frames
    from gppy_stage.stages.forced import light_curves

    root, frames, transient, stack_dir, cands = night
    ctx = Night(str(root), UNIT, NIGHT)
    (entry,) = ctx.plan()["stacks"]
    keys = difference_keys(entry["output"])
    urls = {"diff": ctx.url(keys["diff"]), "noise": ctx.url(keys["noise"]), "mask": ctx.url(keys["mask"]),
            "new": ctx.url(entry["output"]), "ref": ctx.url(keys["ref"])}
    from astropy.wcs import WCS

    with primary_images(urls) as img, stack_frames(ctx, entry) as opened:
        ref = np.asarray(img["ref"][0], float)
        ny, nx = ref.shape
        # the grid point whose 31 x 31 px neighbourhood in the reference is faintest
        grid = [(x, y) for x in range(60, nx - 60, 20) for y in range(60, ny - 60, 20)]
        x, y = min(grid, key=lambda p: np.max(ref[p[1] - 15:p[1] + 16, p[0] - 15:p[0] + 16]))
        ra, dec = WCS(img["diff"][1]).pixel_to_world_values(x + 0.3, y - 0.2)
        blank = Table({"id": [999], "ra": [float(ra)], "dec": [float(dec)], "x": [x + 0.3], "y": [y - 0.2],
                       "score": [1.0]})
        files, notes = light_curves(ctx, entry, opened, [f["id"] for f in ctx.plan()["frames"]], blank, img, 7.0, 1.1)
    assert notes == []
    lc = Table.read(files["cand_0999.lc.ecsv"].decode(), format="ascii.ecsv")
    print(lc["frame", "flux_ujy", "flux_err_ujy", "snr", "mag_lim"])
    assert len(lc) == len(frames) + 1
    assert np.all(lc["upper_limit"]) and np.all(np.isnan(np.asarray(lc["mag"], float)))
    assert np.all(np.isfinite(np.asarray(lc["mag_lim"], float))) and np.all(np.asarray(lc["mag_lim"]) > 18)
    assert np.all(np.abs(np.asarray(lc["snr"], float)) < 4)
    assert files["cand_0999.lc.png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_sim_command_makes_the_transient_brighten_only_when_asked(tmp_path):
    import subprocess
    import sys

    def frame_mags(out, *extra):
        cmd = [sys.executable, "-m", "gppy_stage.cli", "sim", "night", "--out", str(out), "--size", "tiny",
               "--filters", FILTER, "--calib", "", "--n-science", "2", "--seed", "2", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        truth = out / "truth" / UNIT / NIGHT
        frames = [e for e in json.loads((truth / "frames.json").read_text()) if e["imagetyp"] == "LIGHT"]
        return frames, json.loads((truth / "transients.json").read_text())["transient"]

    frames, transient = frame_mags(tmp_path / "changing", "--transient-change", "-0.5")
    mags = [e["transient_mag"] for e in frames]
    assert mags[0] == pytest.approx(transient["mag"][FILTER]) and mags[-1] == pytest.approx(mags[0] - 0.5)
    assert transient["light_curve"]["change_mag"] == -0.5
    plain, transient = frame_mags(tmp_path / "plain")
    assert all("transient_mag" not in e for e in plain) and "light_curve" not in transient


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_stack_frames_open_each_file_once_and_let_its_pages_go(night):
    """The centroids and the light curves are served by one opening of each frame and of the
    reference (stages.cutouts.StackFrames); a consumer done with a frame leaves none of its pages
    resident, and a box cut again afterwards reads back the file's values."""
    from gppy_stage.stages.base import Night
    from gppy_stage.stages.cutouts import frame_cut, stack_frames
    from test_detect_memory import _mapped_rss_kib as resident_kib

    root = night[0]
    ctx = Night(str(root), UNIT, NIGHT)
    (entry,) = ctx.plan()["stacks"]
    fid = entry["frames"][0]
    with stack_frames(ctx, entry) as frames:
        assert frames.frame_url("no-such-frame") is None
        path = frames.frame_url(fid)
        with frames.frame(fid) as (hdul, idx):
            ny, nx = hdul[idx].data.shape
            whole = [np.array(hdul[i].data) for i in range(len(hdul)) if hdul[i].data is not None]
            first = frame_cut(hdul, idx, (10, 60, 20, 90))
            touched = resident_kib(path)
        released = resident_kib(path)
        with frames.frame(fid) as (again, idx2):
            second = frame_cut(again, idx2, (10, 60, 20, 90))
        assert again is hdul and frames.reference() is frames.reference()
    print(f"{path}: {touched} KiB resident while in use, {released} KiB after; {ny} x {nx} px")
    assert touched > 0.5 * sum(a.nbytes for a in whole) / 1024 and released == 0
    for a, b in zip(first[:3], second[:3]):
        assert np.array_equal(a, b)
    assert hdul.fileinfo(0)["file"].closed  # closed once the block ends
