"""Stacks of a simulated night (SWarp, real), judged against the simulator's truth.

The night (two filters, three 100 s frames each) goes through every stage with the local runner.
Then the m475 frames are made to look as if astrometry had failed on them (a quarantined result,
no WCS): that stack must be flagged, not crash. Stack, subtract, detect and curate are run again
through ``runner.execute`` as a workflow would. ``built_night`` is shared by the four test modules of these stages.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from gppy_stage.errors import BAD_INPUT, ToolError
from gppy_stage.runner import execute, run_night
from gppy_stage.sim import simulate_night
from gppy_stage.stages.base import Night
from gppy_stage.tools import swarp as sw

UNIT, DATE, SEED = "7DT01", "2025-01-01", 7
NIGHT = f"{DATE}_gain2750"
FIELD = "T10779"
GOOD, FAILED = "m425", "m475"
STACK_GOOD, STACK_FAILED = f"{FIELD}_{GOOD}_{UNIT}_0", f"{FIELD}_{FAILED}_{UNIT}_0"
WCS_PREFIXES = ("CTYPE", "CRVAL", "CRPIX", "CD1_", "CD2_", "CUNIT", "WCSAXES", "PV1_", "PV2_", "CDELT", "PC1_", "PC2_")

pytestmark = pytest.mark.slow


def truth_frames(root: Path) -> dict[str, dict]:
    frames = json.loads((root / "truth" / UNIT / NIGHT / "frames.json").read_text())
    return {Path(f["file"]).stem: f for f in frames if f["imagetyp"] == "LIGHT"}


def plan_of(root: Path) -> dict:
    return json.loads((root / "runs" / UNIT / NIGHT / "plan.json").read_text())


def fail_astrometry(root: Path) -> None:
    """The m475 frames as if astrometry had failed on them: WCS gone, a quarantined result, and
    the stack the first run made from them removed (it could not be made now)."""
    results = root / "runs" / UNIT / NIGHT / "results"
    for fr in plan_of(root)["frames"]:
        if fr["filter"] != FAILED:
            continue
        for stage in ("astrometry", "photometry"):
            (results / stage / f"{fr['id']}.json").unlink(missing_ok=True)
        with fits.open(root / fr["output"], mode="update") as hdul:
            h = hdul[0].header
            for key in [k for k in h if k.startswith(WCS_PREFIXES) or k == "ASTROMTD"]:
                del h[key]
        rec = {"stage": "astrometry", "item": fr["id"], "status": "quarantined", "exit_code": BAD_INPUT,
               "error": {"kind": "bad_input", "reason": "scamp matched 3 stars (need 10)", "file": fr["output"]}}
        out = results / "astrometry" / f"{fr['id']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rec))
    failed = _stack_entry(root, STACK_FAILED)["output"]
    for path in (root / failed).parent.glob(Path(failed).name.replace(".fits", "") + "*"):
        if path.is_file():
            path.unlink()


@functools.lru_cache(maxsize=None)
def built_night(base: str) -> tuple[Path, dict]:
    """The simulated night through every stage of this issue; (root, {stage: {item: record}}).

    Built once per session: under xdist the workers' base folders share a parent, and the first
    worker to ask builds the night there under a lock while another waits and then reads it (the
    four modules that use it may run on different workers; building it twice cost CI 6 minutes)."""
    home = (Path(base).parent if os.environ.get("PYTEST_XDIST_WORKER") else Path(base)) / "stacknight"
    home.mkdir(exist_ok=True)
    done = home / "records.json"
    with open(home / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            records = _build_night(home / "root")
            done.with_suffix(".part").write_text(json.dumps(records, default=str))
            done.with_suffix(".part").replace(done)
    return home / "root", json.loads(done.read_text())


def _build_night(root: Path) -> dict:
    simulate_night(root, unit=UNIT, night=DATE, filters=(GOOD, FAILED), seed=SEED, n_science=3)
    run_night(str(root), UNIT, NIGHT, workers=2, progress=False)
    fail_astrometry(root)
    records: dict[str, dict] = {}
    for stage in ("stack", "subtract", "detect"):
        for sid in (STACK_GOOD, STACK_FAILED):
            if stage != "stack" and records["stack"][sid]["status"] != "done":
                continue  # as the runner's chain does: a stack that failed is not subtracted
            records.setdefault(stage, {})[sid] = execute(stage, str(root), UNIT, NIGHT, sid, force=True)
    records["curate"] = {"night": execute("curate", str(root), UNIT, NIGHT)}
    return records


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    return built_night(str(tmp_path_factory.getbasetemp()))


def _stack_entry(root: Path, sid: str) -> dict:
    return next(s for s in plan_of(root)["stacks"] if s["id"] == sid)


def _true_stars(root: Path, filt: str) -> Table:
    return Table.read(root / "truth" / UNIT / NIGHT / "stars.csv", format="ascii.csv")


def _aperture_zp(image, mask, wcs, stars, filt, fwhm_px, beta):
    """Zero point of an image from aperture photometry (radius 3 FWHM, corrected to total with
    the simulator's Moffat profile) of the true stars of 13-18 mag: clipped median of
    (true mag + 2.5 log10 flux)."""
    import sep
    from astropy.stats import sigma_clipped_stats

    x, y = wcs.all_world2pix(np.asarray(stars["ra"]), np.asarray(stars["dec"]), 0)
    mag = np.asarray(stars[f"mag_{filt}"])
    ny, nx = image.shape
    r = 3.0 * fwhm_px
    sel = (x > 2 * r) & (x < nx - 2 * r) & (y > 2 * r) & (y < ny - 2 * r) & (mag > 13) & (mag < 18)
    data = np.ascontiguousarray(image, dtype=np.float64)
    bkg = sep.Background(data, mask=mask, bw=64, bh=64)
    flux, _, flag = sep.sum_circle(data - bkg.back(), x[sel], y[sel], r, mask=mask)
    ok = (flag == 0) & (flux > 0)
    alpha = fwhm_px / (2 * math.sqrt(2 ** (1 / beta) - 1))
    enclosed = 1 - (1 + (r / alpha) ** 2) ** (1 - beta)
    zp = mag[sel][ok] + 2.5 * np.log10(flux[ok] / enclosed)
    _, median, _ = sigma_clipped_stats(zp, sigma=2.5)
    return float(median), int(ok.sum())


def _depth(image, mask, zp, fwhm_px, seed=1):
    """5-sigma point-source depth from the scatter of random apertures (radius 1 FWHM) on the
    background: independent of any noise model, so correlated noise counts as it should."""
    import sep

    data = np.ascontiguousarray(image, dtype=np.float64)
    bkg = sep.Background(data, mask=mask, bw=64, bh=64)
    sub = data - bkg.back()
    objs, segmap = sep.extract(sub, 2.0, err=bkg.globalrms, mask=mask, segmentation_map=True, minarea=5)
    from scipy.ndimage import binary_dilation

    avoid = binary_dilation((segmap > 0) | mask, iterations=int(3 * fwhm_px))
    rng = np.random.default_rng(seed)
    ny, nx = data.shape
    r = fwhm_px
    px, py = rng.uniform(3 * r, nx - 3 * r, 6000), rng.uniform(3 * r, ny - 3 * r, 6000)
    keep = ~avoid[py.astype(int), px.astype(int)]
    f, _, flag = sep.sum_circle(sub, px[keep][:1500], py[keep][:1500], r, mask=avoid)
    f = f[flag == 0]
    sigma = 1.4826 * np.median(np.abs(f - np.median(f)))
    return zp - 2.5 * math.log10(5 * sigma)


def test_stack_made_with_provenance(night):
    root, records = night
    rec = records["stack"][STACK_GOOD]
    assert rec["status"] == "done", rec
    entry = _stack_entry(root, STACK_GOOD)
    truth = truth_frames(root)
    outputs = {f["id"]: f["output"] for f in plan_of(root)["frames"]}
    with fits.open(root / entry["output"]) as hdul:
        h = hdul[0].header
        assert [x.name for x in hdul] == ["PRIMARY", "MASK", "VARIANCE"]
    # the frames' zero points as the photometry stage measured them, in the key the stack used
    zp_of = {f: fits.getheader(root / outputs[f])[h["ZPKEY"]] for f in entry["frames"]}
    zps = list(zp_of.values())
    assert (root / entry["output"].replace(".fits", ".weight.fits")).is_file()
    print(f"stack: NCOMBINE {h['NCOMBINE']} EXPTIME {h['EXPTIME']} EGAIN {h['EGAIN']} ZP {h['ZP']} "
          f"(frames {', '.join(f'{z:.4f}' for z in zps)}) DATE-OBS {h['DATE-OBS']}")
    assert h["NCOMBINE"] == 3 and h["EXPTIME"] == pytest.approx(300.0)
    assert h["ZP"] == pytest.approx(float(np.median(zps)), abs=1e-4)
    for i, fid in enumerate(entry["frames"], start=1):
        assert h[f"IMCOMB{i:02d}"] in {Path(f["output"]).name for f in plan_of(root)["frames"] if f["id"] == fid}
        assert h[f"ZP_IM{i:02d}"] == pytest.approx(zp_of[fid], abs=1e-4)
        assert h[f"FLXSC{i:02d}"] == pytest.approx(10 ** (0.4 * (h["ZP"] - zp_of[fid])), rel=1e-4)
    # three nearly equal frames: effective gain ~ 3 x 0.78 e-/ADU
    assert 0.9 * 3 * 0.78 < h["EGAIN"] < 1.1 * 3 * 0.78
    # mid-time: halfway between the first start and the last end
    starts = sorted(truth[f]["date_obs"] for f in entry["frames"])
    from datetime import datetime, timedelta

    first, last = datetime.fromisoformat(starts[0]), datetime.fromisoformat(starts[-1]) + timedelta(seconds=100)
    mid = datetime.fromisoformat(h["DATE-OBS"])
    assert abs((mid - (first + (last - first) / 2)).total_seconds()) < 0.01
    assert h["SWVERSN"] and h["GPHASH"] == json.loads((root / (entry["output"] + ".json")).read_text())["hash"]


def test_stack_zero_point_and_depth(night):
    root, _ = night
    entry = _stack_entry(root, STACK_GOOD)
    truth = truth_frames(root)
    stars = _true_stars(root, GOOD)
    fwhm_px = float(np.median([truth[f]["fwhm_arcsec"] for f in entry["frames"]])) / 0.505
    with fits.open(root / entry["output"]) as hdul:
        img, mask, h = hdul[0].data, hdul["MASK"].data != 0, hdul[0].header
    beta = float(np.median([truth[f]["moffat_beta"] for f in entry["frames"]]))
    zp_stack, n = _aperture_zp(img, mask, WCS(h), stars, GOOD, fwhm_px, beta)
    f0 = plan_of(root)["frames"][0]
    with fits.open(root / f0["output"]) as hdul:
        fimg, fmask, fh = hdul[0].data, hdul["MASK"].data != 0, hdul[0].header
    zp_frame, nf = _aperture_zp(fimg, fmask, WCS(fh), stars, GOOD, truth[f0["id"]]["fwhm_arcsec"] / 0.505,
                                truth[f0["id"]]["moffat_beta"])
    print(f"stack ZP measured {zp_stack:.4f} ({n} stars) vs header {h['ZP']:.4f}; "
          f"frame ZP measured {zp_frame:.4f} ({nf} stars) vs truth {truth[f0['id']]['zp']:.4f}")
    assert n >= 15 and nf >= 15
    # the method itself is right on a single frame, so the stack's agreement means something
    assert abs(zp_frame - truth[f0["id"]]["zp"]) < 0.03
    # the stack's photometry stage: its zero point agrees with the frames' common one (same key),
    # and its total-flux zero point with the independent measurement above
    assert abs(h["ZPTOT"] - h["ZPCOMMON"]) < 0.03
    assert abs(zp_stack - h["ZPTOT"]) < 0.03
    d_stack = _depth(img, mask, zp_stack, fwhm_px)
    d_frame = _depth(fimg, fmask, truth[f0["id"]]["zp"], truth[f0["id"]]["fwhm_arcsec"] / 0.505)
    expected = 2.5 * math.log10(math.sqrt(3))
    print(f"5-sigma depth: stack {d_stack:.3f}, frame {d_frame:.3f}: gain {d_stack - d_frame:.3f} "
          f"(expected {expected:.3f})")
    assert abs((d_stack - d_frame) - expected) < 0.15
    # the depths the photometry stage reports say the same
    reported = h["UL5_APER_1"] - fh["UL5_APER_1"]
    print(f"reported UL5_APER_1 gain {reported:.3f}")
    assert abs(reported - expected) < 0.15


def test_stack_variance_predicts_noise(night):
    """The VARIANCE written from SWarp's weight (1/sum of 1/var) matches the scatter of the sky
    within the smoothing of Lanczos resampling, which can only lower the pixel scatter."""
    root, _ = night
    entry = _stack_entry(root, STACK_GOOD)
    with fits.open(root / entry["output"]) as hdul:
        img, mask, var = hdul[0].data.astype(float), hdul["MASK"].data != 0, hdul["VARIANCE"].data
    import sep

    good = ~mask
    bkg = sep.Background(np.ascontiguousarray(img), mask=mask)
    z = ((img - bkg.back()) / np.sqrt(np.where(good, var, 1.0)))[good]
    spread = 1.4826 * np.median(np.abs(z - np.median(z)))
    print(f"sky scatter / predicted sigma = {spread:.3f}")
    assert 0.6 < spread < 1.05


def test_group_whose_frames_all_failed_astrometry_is_flagged(night):
    root, records = night
    rec = records["stack"][STACK_FAILED]
    print(rec["error"]["reason"])
    assert rec["status"] == "quarantined" and rec["exit_code"] == BAD_INPUT
    entry = _stack_entry(root, STACK_FAILED)
    for fid in entry["frames"]:
        assert fid in rec["error"]["reason"]
    assert "astrometry quarantined" in rec["error"]["reason"]
    assert not (root / entry["output"]).exists()


def test_frame_without_wcs_is_left_out(night, tmp_path):
    root, _ = night
    entry = _stack_entry(root, STACK_GOOD)
    new = tmp_path / "root"
    (new / "runs" / UNIT / NIGHT).mkdir(parents=True)
    shutil.copy(root / "runs" / UNIT / NIGHT / "plan.json", new / "runs" / UNIT / NIGHT / "plan.json")
    frames = {f["id"]: f for f in plan_of(root)["frames"]}
    for fid in entry["frames"]:
        dst = new / frames[fid]["output"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / frames[fid]["output"], dst)
    dropped = entry["frames"][1]
    with fits.open(new / frames[dropped]["output"], mode="update") as hdul:
        for key in [k for k in hdul[0].header if k.startswith(WCS_PREFIXES)]:
            del hdul[0].header[key]
    from gppy_stage.stages import stack

    result = stack.run(Night(str(new), UNIT, NIGHT), STACK_GOOD)
    assert result["ncombine"] == 2 and result["frames"] == [f for f in entry["frames"] if f != dropped]
    assert result["left_out"] == [{"frame": dropped, "reason": "no WCS (astrometry failed or not run)"}]
    h = fits.getheader(new / entry["output"])
    assert h["NCOMBINE"] == 2 and h["EXPTIME"] == pytest.approx(200.0) and dropped[:20] in h["LEFTOU01"]
    # same inputs again: skipped, not redone
    again = stack.run(Night(str(new), UNIT, NIGHT), STACK_GOOD)
    assert again.get("skipped") is True


def test_swarp_failure_carries_stderr():
    data = np.ones((64, 64), np.float32)
    h = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.0, "CRVAL2": -20.0, "CRPIX1": 32.0,
                     "CRPIX2": 32.0, "CD1_1": -1.4e-4, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 1.4e-4})
    with pytest.raises(ToolError) as err:
        sw.swarp([sw.SwarpInput(data, h)], {"COMBINE_TYPE": "NO_SUCH_TYPE"})
    print(err.value)
    assert "COMBINE_TYPE set to an unknown keyword" in str(err.value) and "swarp failed" in str(err.value)


def test_swarp_resample_conserves_flux_and_position():
    """A star resampled onto a grid shifted by (10.3, -4.6) px lands where the WCS says, with
    its flux (independent check: the analytic Gaussian)."""
    yy, xx = np.mgrid[0:128, 0:128]
    x0, y0, flux, s = 60.2, 70.7, 1.0e5, 2.0
    img = (flux / (2 * np.pi * s * s) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))).astype(np.float32)
    h = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.0, "CRVAL2": -20.0, "CRPIX1": 64.0,
                     "CRPIX2": 64.0, "CD1_1": -1.4e-4, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 1.4e-4})
    g = h.copy()
    g["CRPIX1"], g["CRPIX2"] = 64.0 + 10.3, 64.0 - 4.6
    out = sw.resample(sw.SwarpInput(img, h), g, (128, 128))
    assert out.image.sum() == pytest.approx(flux, rel=2e-3)
    cy = (out.image * yy).sum() / out.image.sum()
    cx = (out.image * xx).sum() / out.image.sum()
    assert abs(cx - (x0 + 10.3)) < 0.05 and abs(cy - (y0 - 4.6)) < 0.05
    assert (out.weight[:, :5] == 0).all()  # the part the input does not cover has no weight


def test_coadd_applies_the_scale_given_after_the_inputs_were_written():
    """Two frames of one flat sky, 100 and 300 ADU, the second given FLXSCALE 1/3 in its .head only
    after both were on disk: SWarp scales its pixels by 1/3 and its weight by 9, so the mean is 100
    and the weight 10 (had the .head been ignored: 200 and 2)."""
    h = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 10.0, "CRVAL2": -20.0, "CRPIX1": 32.0,
                     "CRPIX2": 32.0, "CD1_1": -1.4e-4, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 1.4e-4, "FLXSCALE": 1.0})
    with sw.Coadd() as coadd:
        for level in (100.0, 300.0):
            coadd.add(sw.SwarpInput(np.full((64, 64), level, np.float32), h))
        coadd.set_keys(1, {"FLXSCALE": 1 / 3})
        out = coadd.run({"SUBTRACT_BACK": False, "NTHREADS": 1})
    inner = (slice(8, -8), slice(8, -8))
    print(f"co-add {np.median(out.image[inner]):.4f}, weight {np.median(out.weight[inner]):.4f}")
    assert np.allclose(out.image[inner], 100.0, rtol=1e-4)
    assert np.allclose(out.weight[inner], 10.0, rtol=1e-4)
