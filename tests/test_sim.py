"""The simulator writes a raw 7DT night whose pixels agree with its own truth."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from datetime import datetime

from gppy_stage import names
from gppy_stage.errors import ConfigError
from gppy_stage.sim import render_sky, simulate_night, tangent_wcs, tycho2_stars
from gppy_stage.sim.catalog import positions_at

UNIT, NIGHT, FILT = "7DT01", "2025-01-01", "m425"
WCS_KEYS = ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CD1_1", "CD2_2", "PC1_1", "CDELT1", "WCSAXES")


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    seen = []
    summary = simulate_night(out, unit=UNIT, night=NIGHT, filters=(FILT,), n_science=2, seed=3,
                             progress=lambda done, total, name: seen.append((done, total)))
    truth = Path(summary["truth_dir"])
    frames = json.loads((truth / "frames.json").read_text())
    return {"out": out, "summary": summary, "truth": truth, "frames": frames, "progress": seen,
            "bias": fits.getdata(truth / "bias.fits"), "dark": fits.getdata(truth / "dark_rate.fits"),
            "flat": fits.getdata(truth / f"flat_{FILT}.fits"),
            "raw": Path(summary["raw_dir"])}


def _frames(night, imagetyp):
    return [f for f in night["frames"] if f["imagetyp"] == imagetyp]


def _raw(night, entry):
    return fits.getdata(night["raw"] / entry["file"]).astype(np.float64)


def _crmask(night, entry):
    return fits.getdata(night["truth"] / "crmask" / entry["file"]).astype(bool)


def test_layout_names_and_headers(night):
    raw = night["raw"]
    assert raw.parent.name == UNIT and raw.parent.parent.name == "obsdata"
    nn = names.parse_night(raw.name)
    assert nn.date == NIGHT and nn.gain == 2750
    s = night["summary"]
    assert s["counts"] == {"FLAT": 5, "BIAS": 9, "DARK": 9, "LIGHT": 2}
    assert night["progress"][-1] == (25, 25)
    fits_files = sorted(raw.glob("*.fits"))
    assert len(fits_files) == 25 == len(night["frames"])
    for path in fits_files:
        rn = names.parse_raw_name(path.name)
        with fits.open(path, do_not_scale_image_data=True) as hdul:
            hdr = hdul[0].header
            assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768 and hdul[0].data.dtype.kind == "i"
        assert (raw / (path.stem + ".head")).read_text() == hdr.tostring(sep="\n")
        assert not [k for k in WCS_KEYS if k in hdr]
        assert rn.unit == hdr["TELESCOP"] == UNIT and rn.filter == hdr["FILTER"]
        assert rn.imagetyp == hdr["IMAGETYP"] and rn.exptime == hdr["EXPTIME"] == hdr["EXPOSURE"]
        when = datetime.fromisoformat(hdr["DATE-OBS"])
        assert when.strftime("%Y%m%d%H%M%S") == rn.date + rn.time
        assert names.night_date_of(when) == NIGHT
        for key in ("JD", "MJD", "GAIN", "EGAIN", "CCD-TEMP", "SET-TEMP", "XPIXSZ", "FOCALLEN", "RA", "DEC",
                    "ALTITUDE", "AZIMUTH", "AIRMASS", "OBJECT", "OBJCTRA", "OBJCTDEC", "IS_TOO", "DATE-LOC"):
            assert key in hdr, key
    # times go forward, science frames one after the other with a readout gap
    starts = [datetime.fromisoformat(f["date_obs"]) for f in night["frames"]]
    assert starts == sorted(starts)
    sci = _frames(night, "LIGHT")
    gap = (datetime.fromisoformat(sci[1]["date_obs"]) - datetime.fromisoformat(sci[0]["date_obs"])).total_seconds()
    assert 100 < gap < 110
    flats = _frames(night, "FLAT")
    assert all(0.1 <= f["exptime"] <= 20 and 20000 <= f["level"] <= 40000 for f in flats)


def test_bias_frames_follow_truth(night):
    b = _frames(night, "BIAS")[0]
    diff = (_raw(night, b) - night["bias"])[~_crmask(night, b)]
    assert abs(diff.mean()) < 0.05
    assert diff.std() == pytest.approx(np.hypot(3.0 / 0.78, np.sqrt(1 / 12)), rel=0.03)
    assert 512 <= np.median(night["bias"]) <= 514 and night["bias"].std() < 2.5


def test_dark_frames_follow_truth(night):
    d = _frames(night, "DARK")[0]
    ok = ~_crmask(night, d)
    diff = _raw(night, d) - night["bias"]
    expect = night["dark"] * d["exptime"]
    assert abs(diff[ok].mean() - expect[ok].mean()) < 0.03
    hot = ok & (night["dark"] > 1.0)
    assert hot.sum() > 50
    ratio = diff[hot] / expect[hot]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)
    # cosmic-ray peaks stand far above the noise
    hits = json.loads((night["truth"] / "crhits" / d["file"].replace(".fits", ".json")).read_text())
    assert 10 <= len(hits) <= 500
    ys = np.array([h["y"] for h in hits])
    xs = np.array([h["x"] for h in hits])
    assert np.all((diff - expect)[ys, xs] > 10 * 3.0 / 0.78)


def test_flat_frames_follow_truth(night):
    flat = night["flat"]
    assert np.median(flat) == pytest.approx(1.0, abs=1e-4)
    assert 0.75 < flat.min() and flat[:40, :40].mean() < 0.95  # vignetted corner
    f = _frames(night, "FLAT")[0]
    norm = (_raw(night, f) - night["bias"] - night["dark"] * f["exptime"]) / f["level"]
    ny, nx = flat.shape
    block = lambda a: a.reshape(ny // 32, 32, nx // 32, 32).mean(axis=(1, 3))  # noqa: E731
    assert np.abs(block(norm) - block(flat)).max() < 0.01
    assert np.corrcoef(norm.ravel(), flat.ravel())[0, 1] > 0.8


def _calibrated(night, entry):
    raw = _raw(night, entry)
    return (raw - night["bias"] - night["dark"] * entry["exptime"]) / night["flat"]


def test_stars_where_and_as_bright_as_truth_says(night):
    sep = pytest.importorskip("sep")
    entry = _frames(night, "LIGHT")[0]
    img = _calibrated(night, entry)
    w = WCS(fits.Header(entry["wcs"]))
    stars = Table.read(night["truth"] / "stars.csv", format="ascii.csv")
    ra, dec = positions_at(stars, entry["epoch"])
    x, y = w.all_world2pix(ra, dec, 0)
    mag = np.asarray(stars[f"mag_{FILT}"])
    ny, nx = img.shape
    inside = (x > 60) & (x < nx - 61) & (y > 60) & (y < ny - 61)
    assert inside.sum() >= 100
    assert ((mag > 12) & (mag < 17.5) & inside).sum() >= 20
    # isolated, unsaturated, bright: nothing brighter than 4 mag fainter within 30 px
    good = inside & (mag > 12.5) & (mag < 16.5)
    cand = np.flatnonzero(good)
    keep = []
    for i in cand:
        d = np.hypot(x - x[i], y - y[i])
        if not np.any((d > 0) & (d < 30) & (mag < mag[i] + 4)):
            keep.append(i)
    keep = np.array(keep)
    assert keep.size >= 8
    data = img - entry["sky_adu"]
    data[_crmask(night, entry)] = 0.0  # cosmic rays are tested elsewhere
    data = np.ascontiguousarray(data, dtype=np.float64)
    sigma = entry["fwhm_arcsec"] / 0.505 / 2.35
    xw, yw, flag = sep.winpos(data, x[keep], y[keep], sigma)
    off = np.hypot(xw - x[keep], yw - y[keep])[flag == 0]
    assert np.median(off) < 0.05 and np.percentile(off, 90) < 0.1
    # large aperture minus a local annulus: mag = zp - 2.5 log10(ADU)
    flux, _, _ = sep.sum_circle(data, x[keep], y[keep], 6 * entry["fwhm_arcsec"] / 0.505, bkgann=(40, 55))
    dm = entry["zp"] - 2.5 * np.log10(flux) - mag[keep]
    print("centroid offsets px", np.round(off, 3), "mag differences", np.round(dm, 4))
    assert np.median(dm) == pytest.approx(0.0, abs=0.03)
    # the pointing keys are off the true centre by tens of arcsec, never more than 60"
    hdr = fits.getheader(night["raw"] / entry["file"])
    sep_arcsec = SkyCoord(hdr["RA"], hdr["DEC"], unit="deg").separation(
        SkyCoord(entry["wcs"]["CRVAL1"], entry["wcs"]["CRVAL2"], unit="deg")).arcsec
    assert 1.0 < sep_arcsec <= 60.0
    assert sep_arcsec == pytest.approx(entry["pointing_error_arcsec"], abs=0.5)


def test_reference_catalogue_and_transients(night):
    s = night["summary"]
    cat = Table.read(s["ref_cat"], format="ascii.csv")
    for col in ("source_id", "ra", "dec", "parallax", "pmra", "pmdec", "phot_g_mean_mag", "bp_rp",
                "mag_m400", "magerr_m400", "mag_m875", "magerr_m875", "mag_g", "mag_r", "mag_i", "magerr_i"):
        assert col in cat.colnames
    assert len(np.unique(cat["source_id"])) == len(cat)
    bright = cat["phot_g_mean_mag"] < 13
    assert np.all(cat["magerr_m425"][bright] < 0.01)
    assert np.all(cat["magerr_m425"][cat["mag_m425"] < 19.8] < 0.11)
    tr = json.loads((night["truth"] / "transients.json").read_text())
    c = SkyCoord(cat["ra"], cat["dec"], unit="deg")
    t = SkyCoord(tr["transient"]["ra"], tr["transient"]["dec"], unit="deg")
    assert c.separation(t).arcsec.min() > 1.0
    assert 1.0 <= tr["transient"]["host_offset_arcsec"] <= 3.0
    pos = list(tr["asteroid"]["positions"].values())
    assert len(pos) == 2
    moved = SkyCoord(pos[0]["ra"], pos[0]["dec"], unit="deg").separation(
        SkyCoord(pos[1]["ra"], pos[1]["dec"], unit="deg")).arcsec
    assert moved > 0.5
    for p in pos:
        assert c.separation(SkyCoord(p["ra"], p["dec"], unit="deg")).arcsec.min() > 1.0
    # the transient is in the science frame (a clear excess over the reference)
    sci = _frames(night, "LIGHT")[0]
    img = _calibrated(night, sci)
    tx, ty = (int(round(v)) for v in sci["transient_xy"])
    ref = fits.open(s["ref_frames"][FILT])[0]
    rw = WCS(ref.header)
    assert ref.header["BITPIX"] == -32 and ref.header["SKYSUB"]
    for key in ("ZP", "FWHM", "EXPTIME", "FILTER", "OBJECT"):
        assert key in ref.header
    rx, ry = (int(round(float(v))) for v in rw.all_world2pix(tr["transient"]["ra"], tr["transient"]["dec"], 0))
    sci_peak = img[ty - 1:ty + 2, tx - 1:tx + 2].sum() - 9 * sci["sky_adu"]
    # reference scaled to the science frame's zero point
    ref_peak = ref.data[ry - 1:ry + 2, rx - 1:rx + 2].sum() * 10 ** (-0.4 * (ref.header["ZP"] - sci["zp"]))
    assert sci_peak > ref_peak + 100


def _hashes(out):
    return {p.name: hashlib.sha256(fits.getdata(p).tobytes()).hexdigest()
            for p in sorted(Path(out).glob("obsdata/*/*/*.fits"))}


def test_deterministic_and_calib_choice(tmp_path):
    kw = dict(unit="7DT02", night="2025-01-05", filters=("m475",), n_science=1, calib=("bias", "dark"),
              reference=False)
    a = simulate_night(tmp_path / "a", seed=5, **kw)
    simulate_night(tmp_path / "b", seed=5, **kw)
    simulate_night(tmp_path / "c", seed=6, **kw)
    ha, hb, hc = _hashes(tmp_path / "a"), _hashes(tmp_path / "b"), _hashes(tmp_path / "c")
    assert ha == hb and len(ha) == 19
    assert len(hc) == 19 and not set(ha.values()) & set(hc.values())
    assert a["counts"] == {"BIAS": 9, "DARK": 9, "LIGHT": 1}
    assert not list((tmp_path / "a").glob("obsdata/*/*/*FLAT*"))
    assert not (tmp_path / "a" / "ref_frame").exists()


def test_detector_maps_do_not_depend_on_night(tmp_path, night):
    kw = dict(unit=UNIT, filters=(FILT,), n_science=1, calib=("bias",), reference=False, seed=3)
    s = simulate_night(tmp_path, night="2025-01-07", **kw)
    t = Path(s["truth_dir"])
    assert np.array_equal(fits.getdata(t / "bias.fits"), night["bias"])
    assert np.array_equal(fits.getdata(t / "dark_rate.fits"), night["dark"])
    assert np.array_equal(fits.getdata(t / f"flat_{FILT}.fits"), night["flat"])


def test_unknown_field_and_filter_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="unknown field"):
        simulate_night(tmp_path, field="NOWHERE")
    with pytest.raises(ConfigError, match="unknown filter"):
        simulate_night(tmp_path, filters=("m999",))


def test_render_sky_and_tycho2():
    tyc = tycho2_stars(11.383, -25.472, 1.5)
    if len(tyc) == 0:
        pytest.skip("astrometry-data-tycho2 not installed")
    assert 150 <= len(tyc) <= 220 and tyc["mag_vt"].min() < 8
    w = tangent_wcs(11.383, -25.472, 0.505, (200, 300))
    stars = Table({"ra": [11.383], "dec": [-25.472], "mag": [15.0]})
    img = render_sky((200, 300), w, stars, 2.5, 10.0, 25.0)
    assert (img.sum() - 10.0 * img.size) == pytest.approx(10 ** (-0.4 * (15.0 - 25.0)), rel=0.03)
    assert np.unravel_index(np.argmax(img), img.shape) in ((99, 149), (100, 149), (99, 150), (100, 150))
