"""The simulator's IMSNG/GECKO mode: each site's detector, MaxIm headers, folder and file names,
pointing keys, fringes, and a reference catalogue in its own columns whose truth is AB.

Tiny nights (512 px, seconds each); the end-to-end runs are tests/test_imsng_night.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from gppy_stage import config
from gppy_stage.headers import frame_info
from gppy_stage.science import refcat, transforms
from gppy_stage.science.astrometry import pointing
from gppy_stage.sim import imsng
from gppy_stage.stages.plan import make_plan


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    out = {}
    for obs, filters in (("LOAO", ("B", "R", "z")), ("KCT", None), ("RASA36", None)):
        root = tmp_path_factory.mktemp(obs)
        out[obs] = (root, imsng.simulate_site_night(root, obs, "2024-02-29", filters=filters, size="tiny", seed=3))
    return out


def _lights(summary):
    frames = json.loads((Path(summary["truth_dir"]) / "frames.json").read_text())
    return [e for e in frames if e["imagetyp"] == "LIGHT"]


def test_site_folders_names_and_maxim_headers(nights):
    root, s = nights["LOAO"]
    assert s["night_folder"] == "2024_0229"
    names = sorted(p.name for p in Path(s["raw_dir"]).iterdir())
    assert "LOAO_NGC3938_R_60s_001.fit" in names and "LOAO_bias_001.fit" in names
    h = fits.getheader(Path(s["raw_dir"]) / "LOAO_NGC3938_R_60s_001.fit")
    assert h["IMAGETYP"] == "Light Frame" and h["XBINNING"] == 1 and "MJD" not in h and "CTYPE1" not in h
    assert ":" not in h["OBJCTRA"] and len(h["OBJCTRA"].split()) == 3  # MaxIm's 'hh mm ss.ss'
    assert fits.getheader(Path(s["raw_dir"]) / "LOAO_bias_001.fit")["IMAGETYP"] == "Bias Frame"
    assert fits.getdata(Path(s["raw_dir"]) / "LOAO_bias_001.fit").dtype.kind == "u"  # uint16 through BZERO
    kroot, k = nights["KCT"]
    assert k["night_folder"] == "20240229"
    assert sorted(p.name for p in Path(k["raw_dir"]).iterdir())[:2] == ["image.000.fits", "image.001.fits"]
    _, r = nights["RASA36"]
    assert r["night_folder"] == "2024-02-29"
    assert tuple(fits.getdata(Path(r["raw_dir"]) / "image.000.fits").shape) == (512, 512)
    assert config.instrument("RASA36").pixscale == json.loads((Path(r["truth_dir"]) / "truth.json").read_text())[
        "pixscale_arcsec"]


def test_pointing_is_rough_or_missing_per_site(nights):
    """The header's pointing, read as the pipeline reads it, is arcminutes from the true centre
    (LOAO sexagesimal, KCT degrees) or absent (RASA36)."""
    for obs, keys, lo, hi in (("LOAO", ("OBJCTRA", "OBJCTDEC"), 45.0, 135.0), ("KCT", ("RA", "DEC"), 25.0, 95.0)):
        _, s = nights[obs]
        for e in _lights(s):
            h = fits.getheader(Path(s["raw_dir"]) / e["file"])
            assert all(k in h for k in keys)
            c = pointing(h)
            true = e["wcs"]
            sep = c.separation(type(c)(true["CRVAL1"], true["CRVAL2"], unit="deg")).arcsec
            assert lo < sep < hi, (obs, sep)
    _, r = nights["RASA36"]
    for e in _lights(r):
        assert pointing(fits.getheader(Path(r["raw_dir"]) / e["file"])) is None


def test_every_frame_planned_with_its_type(nights):
    for obs, (root, s) in nights.items():
        plan = make_plan(str(root), obs, s["night_folder"])
        assert not plan["quarantine"], plan["quarantine"]
        assert len(plan["frames"]) == s["counts"]["LIGHT"]
        cs = plan["calsets"][0]
        assert sorted(f["filter"] for f in cs["flats"]) == sorted(s["filters"])
        for e in _lights(s):
            h = fits.getheader(Path(s["raw_dir"]) / e["file"])
            info = frame_info(h, e["file"], 0, site=config.site(obs))
            assert (info.imagetyp, info.filter, info.unit) == ("LIGHT", e["filter"], obs)


def test_reference_catalogue_columns_and_ab_truth(nights):
    """The catalogue is read by refcat in its own kind (PS1 north, APASS south); its AB g r i scatter
    about the true magnitudes by the errors it states, APASS B V are Vega, and the Johnson-Cousins
    truth is the catalogue kind's published transformation of the true g r i."""
    for obs, kind, bands in (("LOAO", "ps1", "grizy"), ("KCT", "apass", "BVgri")):
        root, s = nights[obs]
        assert s["ref_cat_kind"] == kind
        key, found = refcat.locate(obs, s["field"], lambda k: (Path(root) / k).is_file())
        assert found == kind
        ref = refcat.read_refcat(Path(root) / key, kind=kind)
        assert set(f"mag_{b}" for b in bands) <= set(ref.colnames)
        stars = Table.read(Path(s["truth_dir"]) / "stars.csv")
        # PS1 objID is the star's id; APASS recno its row in the truth (recno starts at 1)
        idx = (np.searchsorted(stars["source_id"], ref["id"]) if kind == "ps1" else np.asarray(ref["id"]) - 1)
        assert len(ref) > 20 and np.allclose(stars["ra"][idx], ref["ra"], atol=1e-6)
        for b in ("g", "r"):
            pull = (np.asarray(ref[f"mag_{b}"]) - np.asarray(stars[idx][f"mag_{b}"])) / np.asarray(ref[f"magerr_{b}"])
            assert abs(np.median(pull)) < 0.2 and 0.8 < np.std(pull) < 1.2
    _, s = nights["LOAO"]
    stars = Table.read(Path(s["truth_dir"]) / "stars.csv")
    for band in ("B", "R"):
        t = transforms.transform_for("tonry2012", band)
        want = t.ab(stars[f"mag_{t.base}"], stars[f"mag_{t.blue}"], stars[f"mag_{t.red}"])
        assert np.allclose(stars[f"true_{band}"], want, atol=1e-5)
    kroot, k = nights["KCT"]
    raw = Table.read(Path(kroot) / "ref_cat" / "apass_dr9_NGC1566.csv")
    ref = refcat.read_refcat(Path(kroot) / "ref_cat" / "apass_dr9_NGC1566.csv", kind="apass")
    assert np.allclose(ref["mag_V"] - raw["Vmag"], refcat.VEGA_TO_AB["V"])
    assert np.nanmax(ref["mag_V"]) < 17.6  # APASS's depth


def test_fringes_in_z_follow_their_truth(nights):
    """A z frame, calibrated with the true bias, dark and flat and its sky removed, correlates with
    the fringe map written for the defringing stage, at the stated amplitude; R does not fringe."""
    _, s = nights["LOAO"]
    truth = Path(s["truth_dir"])
    bias, dark = fits.getdata(truth / "bias.fits"), fits.getdata(truth / "dark_rate.fits")
    fringe = fits.getdata(truth / "fringe_z.fits")
    assert not (truth / "fringe_R.fits").exists()
    e = next(e for e in _lights(s) if e["filter"] == "z")
    raw = fits.getdata(Path(s["raw_dir"]) / e["file"]).astype(float)
    cal = (raw - bias - dark * e["exptime"]) / fits.getdata(truth / "flat_z.fits") - e["sky_adu"]
    good = np.abs(cal) < 5 * np.sqrt(e["sky_adu"] * config.instrument("LOAO").gain) / config.instrument("LOAO").gain
    amp = np.sum(cal[good] * fringe[good]) / np.sum(fringe[good] ** 2)
    assert abs(amp / e["sky_adu"] - 1.0) < 0.1
    assert np.corrcoef(cal[good], fringe[good])[0, 1] > 0.3
    assert e["fringe_amplitude_adu"] == pytest.approx(e["sky_adu"] * imsng.FRINGE_AMPLITUDE)


def test_same_seed_same_bytes_and_cli(tmp_path, nights):
    _, s = nights["KCT"]
    cmd = [sys.executable, "-m", "gppy_stage.cli", "sim", "night", "--out", str(tmp_path), "--obs", "KCT",
           "--night", "2024-02-29", "--size", "tiny", "--seed", "3", "--n-science", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["night_folder"] == "20240229"
    for name in ("image.000.fits", "image.023.fits"):
        assert (tmp_path / "obsdata/KCT/20240229" / name).read_bytes() == (Path(s["raw_dir"]) / name).read_bytes()
    bad = subprocess.run(cmd + ["--filters", "m425"], capture_output=True, text=True)
    assert bad.returncode == 78 and "unknown filter 'm425'" in bad.stderr


def test_each_raw_frame_has_its_cosmic_ray_truth_and_nothing_half_written(nights):
    """The raw frames go through the writer the 7DT nights use: beside each, in the truth, the mask
    of its cosmic rays, named by the frame's stem (LOAO's .fit as KCT's .fits), where a dark's raw
    pixels stand far above the rest; no file is left half written."""
    for obs in ("LOAO", "KCT"):
        root, s = nights[obs]
        truth = Path(s["truth_dir"])
        entries = json.loads((truth / "frames.json").read_text())
        assert len(entries) == s["n_frames"] == sum(s["counts"].values())
        for e in entries:
            mask = fits.getdata(truth / "crmask" / f"{Path(e['file']).stem}.fits").astype(bool)
            raw = fits.getdata(Path(s["raw_dir"]) / e["file"]).astype(float)
            assert mask.shape == raw.shape and (mask.sum() > 0) == (e["n_cosmic_rays"] > 0), e["file"]
            if e["imagetyp"] == "DARK":
                assert np.median(raw[mask]) > np.median(raw[~mask]) + 20, e["file"]
        assert not list(root.rglob("*.part"))
