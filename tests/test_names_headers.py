"""Names of the 7DT system and header normalisation (real frames of other telescopes included)."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest
from astropy.io import fits

from gppy_stage import config, names
from gppy_stage.errors import BadInputError, ConfigError
from gppy_stage.headers import frame_info, normalise


def test_raw_name_with_underscores_in_object():
    n = names.parse_raw_name("s3://b/obsdata/7DT01/x/7DT01_20250101_210000_NGC_253_A_m400_1x1_0.0s_0001.fits")
    assert (n.unit, n.object, n.filter, n.exptime, n.seq) == ("7DT01", "NGC_253_A", "m400", 0.0, 1)
    assert n.datetime == datetime(2025, 1, 1, 21, 0, 0)
    assert names.parse_raw_name("7DT01_20250101_210000_BIAS_m400_1x1_0.0s_0001.fits").imagetyp == "BIAS"


def test_raw_name_round_trip():
    when = datetime(2025, 1, 2, 5, 7, 4)
    name = names.raw_name("7DT11", when, "T00223", "m425", 1, 100.0, 1)
    assert name == "7DT11_20250102_050704_T00223_m425_1x1_100.0s_0001.fits"
    parsed = names.parse_raw_name(name)
    assert (parsed.unit, parsed.object, parsed.datetime) == ("7DT11", "T00223", when)


@pytest.mark.parametrize("bad", ["notes.txt", "7DT01_2025_x.fits", "7DT01_20250101_210000_m400_1x1.fits"])
def test_bad_raw_names(bad):
    with pytest.raises(BadInputError, match="name"):
        names.parse_raw_name(bad)


def test_night_folders():
    n = names.parse_night("2025-01-01_ToO_gain2750")
    assert (n.date, n.gain, n.too, n.binning) == ("2025-01-01", 2750, True, None)
    assert names.parse_night("obsdata/7DT01/2025-01-01_gain2750_1x1/").binning == "1x1"
    assert names.parse_night("2025-01-01_gain2750_ToO").too
    assert names.parse_night("2025-01-01_gain2750_test").test
    with pytest.raises(BadInputError):
        names.parse_night("2025-13-45_gain2750")
    # the night is the UTC date of DATE-OBS - 12 h
    assert names.night_folder(datetime(2025, 1, 2, 5, 0)) == "2025-01-01_gain2750"


def test_product_names():
    when = datetime(2023, 11, 5, 0, 39, 15)
    assert names.calib_name("7DT01", "UDS", when, "m400", 60.0) == "calib_7DT01_UDS_20231105_003915_m400_60.fits"
    assert names.stack_name("7DT01", "UDS", when, "m400", 300.0).endswith("_m400_300com.fits")
    assert names.master_name("flat", "7DT01", "2025-01-01", 1, 2750, filt="m425") == \
        "master_frame/7DT01/flat/flat_7DT01_20250101_m425_1x1_gain2750.fits"


def test_registry_has_every_unit_and_observatory():
    table = config.instruments()
    assert all(f"7DT{i:02d}" in table for i in range(1, 21))
    for obs in ("LOAO", "SOAO", "DOAO", "KCT", "RASA36", "LSGT", "KMTNET_SSO", "30INCH"):
        assert obs in table
    u = config.instrument("7dt03")
    assert (u.gain, u.rdnoise, u.pixscale, u.shape, u.saturation) == (0.78, 3.0, 0.505, (6388, 9576), 65535)
    assert config.instrument("LOAO").rdnoise == 4.84
    with pytest.raises(ConfigError, match="instruments.csv"):
        config.instrument("NOPE")


@pytest.mark.parametrize("value,expected", [("Light Frame", "LIGHT"), ("object", "LIGHT"), ("OBJECT", "LIGHT"),
                                            ("zero", "BIAS"), ("Bias Frame", "BIAS"), ("Dark Frame", "DARK"),
                                            ("Flat Field", "FLAT"), ("Light", "LIGHT")])
def test_imagetyp_aliases(value, expected):
    h = normalise(fits.Header({"IMAGETYP": value}))
    assert h["IMAGETYP"] == expected
    if value.lower() != expected.lower():
        assert h["IMAGEORI"] == value  # nothing the telescope wrote is lost


@pytest.mark.parametrize("value,expected", [("sloan_g", "g"), ("U101", "U"), ("m425", "m425"), ("4", "4")])
def test_filter_aliases(value, expected):
    assert normalise(fits.Header({"FILTER": value}))["FILTER"] == expected


def test_unknown_imagetyp_is_a_clear_error():
    with pytest.raises(BadInputError, match="unknown IMAGETYP 'arc'"):
        normalise(fits.Header({"IMAGETYP": "arc"}), "x.fits")


def test_header_wins_over_the_name_and_says_so(caplog):
    from gppy_stage import log

    log.setup()
    h = fits.Header({"SIMPLE": True, "BITPIX": 16, "NAXIS": 2, "NAXIS1": 10, "NAXIS2": 10, "IMAGETYP": "LIGHT",
                     "EXPTIME": 60.0, "DATE-OBS": "2025-01-02T05:00:00", "FILTER": "m450", "OBJECT": "T00001",
                     "TELESCOP": "7DT01"})
    seen = []
    import logging

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.__dict__.get("fields", {}))

    logging.getLogger("gppy.headers").addHandler(grab := Grab())
    try:
        info = frame_info(h, "7DT01_20250102_050000_T00001_m425_1x1_100.0s_0001.fits", 0)
    finally:
        logging.getLogger("gppy.headers").removeHandler(grab)
    assert (info.filter, info.exptime) == ("m450", 60.0)
    assert {f["key"] for f in seen} == {"filter", "exptime"}


def test_real_headers_normalise(real_dir):
    saao = normalise(fits.getheader(real_dir / "saao1m_ste3_raw_object_a8280271.fits"))
    assert saao["IMAGETYP"] == "LIGHT" and saao["IMAGEORI"] == "object"
    gmos = normalise(fits.getheader(real_dir / "gemini_gmos_s_cosmic_rays.fits"))
    assert gmos["IMAGETYP"] == "LIGHT"  # from OBSTYPE
    nflat = normalise(fits.getheader(real_dir / "not_alfosc_raw_flat_gSDSS.fits.fz", 0))
    assert nflat["IMAGETYP"] == "FLAT" and nflat["FILTER"] == "g"  # FASU wheel "g'_SDSS 480_145"
    apogee = normalise(fits.getheader(real_dir / "apogee_alta_light_B_sipwcs.fit"))
    assert apogee["IMAGETYP"] == "LIGHT" and apogee["FILTER"] == "B"


def test_camera_gain_setting_is_never_taken_for_e_per_adu():
    # 7DT: GAIN is the camera's setting (2750); EGAIN is e-/ADU
    h = normalise(fits.Header({"GAIN": 2750}))
    assert "EGAIN" not in h
    assert normalise(fits.Header({"GAIN": 2750, "EGAIN": 0.78}))["EGAIN"] == 0.78
    assert normalise(fits.Header({"GAIN": 1.9}))["EGAIN"] == 1.9  # SAAO writes e-/ADU as GAIN


HOSTILE = ["../../etc", "..", "a/b", "NGC 253", "x'y\"z", "x; rm -rf ~", "$(id)", "`w`", "M31\u00b0", "-rf", ".hidden",
           "\u6771\u4eac", "", "a\\b", "x\ny"]


@pytest.mark.parametrize("value", HOSTILE)
def test_no_header_value_makes_a_name_that_leaves_its_folder(value):
    import re

    when = datetime(2025, 1, 2, 0, 40)
    built = [names.calib_name("7DT01", value, when, value, 100.0), names.stack_name(value, value, when, value, 300.0),
             names.master_name("flat", value, "2025-01-01", 1, 2750, filt=value),
             names.processed_dir(value, value, value), names.stack_id(value, value, value, 0),
             names.raw_name(value, when, value, value, 1, 100.0, 1)]
    for name in built:
        for part in name.split("/"):
            assert re.fullmatch(r"[A-Za-z0-9_+.-]+", part), (value, name)
            assert ".." not in part and not part.startswith((".", "-")), (value, name)
    assert names.safe_name("T10779") == "T10779" and names.safe_name("m425") == "m425"


def _light_header(**cards) -> fits.Header:
    h = fits.Header({"SIMPLE": True, "BITPIX": 16, "NAXIS": 2, "NAXIS1": 10, "NAXIS2": 10, "IMAGETYP": "LIGHT",
                     "EXPTIME": 60.0, "DATE-OBS": "2025-01-02T05:00:00", "FILTER": "m425", "OBJECT": "T00001",
                     "TELESCOP": "7DT01"})
    h.update(cards)
    return h


@pytest.mark.parametrize("exptime", [0.0, -1.0, 1e9, "NaN"])
def test_a_light_frame_needs_a_real_exposure(exptime):
    with pytest.raises(BadInputError, match="EXPTIME"):
        frame_info(_light_header(EXPTIME=exptime), "x.fits", 0)


def test_a_bias_has_no_exposure_and_that_is_fine():
    assert frame_info(_light_header(IMAGETYP="BIAS", EXPTIME=0.0), "x.fits", 0).exptime == 0.0


def _non_ascii_fits(tmp_path):
    path = tmp_path / "f.fits"
    h = fits.Header()
    h["OBJECT"] = ("T1", "field centre")
    fits.PrimaryHDU(np.zeros((4, 4), np.uint16), h).writeto(path)
    blob = bytearray(path.read_bytes())
    blob[blob.index(b"centre")] = 0xB0  # a degree sign in Latin-1
    path.write_bytes(bytes(blob))
    return path


def test_a_non_ascii_byte_in_a_comment_costs_the_card_not_the_frame(tmp_path):
    from gppy_stage.fitsio import RawFrame
    from gppy_stage.headers import header_from_bytes

    path = _non_ascii_fits(tmp_path)
    frame = RawFrame(path, str(path))  # opened, not quarantined
    assert frame.header["OBJECT"] == "T1" and frame.all().shape == (4, 4)
    frame.close()
    header, notes = header_from_bytes(path.read_bytes()[:2880], str(path))
    assert header["OBJECT"] == "T1" and "?" in header.comments["OBJECT"]
    assert notes and "non-ASCII" in notes[0]


def test_a_broken_settings_file_is_one_line_naming_the_file_and_line(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("masters:\n  min_frames: 3\nplan: [unclosed\n  x: {\n")
    with pytest.raises(ConfigError) as info:
        config.load_yaml(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "line " in message
    assert "<unicode string>" not in message
    path.write_text("- a list\n- not settings\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load_yaml(path)


def test_imsng_products_are_named_as_gppy_names_them_and_7dt_ones_stay():
    when = datetime(2024, 2, 29, 12, 34, 56)
    assert names.convention("LOAO") == "gppy" and names.convention("RASA36") == "gppy"
    assert names.convention("7DT01") == "7dt" and names.convention("NOSUCHSITE") == "7dt"
    # gpPy's calib.fnamechange: Calib-<OBS>-<OBJECT>-<YYYYMMDD>-<HHMMSS>-<FILTER>-<int(EXPTIME)>.fits
    frame = names.calib_name("LOAO", "M101", when, "R", 60.0)
    assert frame == "Calib-LOAO-M101-20240229-123456-R-60.fits"
    assert names.calib_name("KCT", "NGC3367", when, "r", 120.0, copy=1) == "Calib-KCT-NGC3367-20240229-123456-r-120_2.fits"
    stack = names.stack_name("LOAO", "M101", when, "R", 180.0)
    assert stack == "Calib-LOAO-M101-20240229-123456-R-180com.fits"
    folder = names.processed_dir("M101", "LOAO", "R")
    assert folder == "processed/M101/LOAO/R"
    keys = names.difference_keys(f"{folder}/{stack}")
    assert keys["diff"] == f"{folder}/hdCalib-LOAO-M101-20240229-123456-R-180com.fits"
    assert keys["ref"] == f"{folder}/hcCalib-LOAO-M101-20240229-123456-R-180com.fits"
    assert keys["noise"].startswith(f"{folder}/hdCalib-") and keys["mask"].endswith("com.mask.fits")
    assert names.phot_keys(f"{folder}/{frame}")[0] == f"{folder}/phot/Calib-LOAO-M101-20240229-123456-R-60.phot.cat"
    # every product of a stack is owned by the stack's stem, gpPy's prefixes included
    stem = f"{folder}/{stack[:-len('.fits')]}"
    for key in keys.values():
        assert names.beside(folder, key.rsplit("/", 1)[1]).startswith(stem + ".")
    # 7DT names unchanged
    seven = names.stack_name("7DT01", "T10779", when, "m425", 300.0)
    assert seven == "calib_7DT01_T10779_20240229_123456_m425_300com.fits"
    assert names.difference_keys(f"p/{seven}") == {"diff": "p/" + seven[:-5] + ".diff.fits",
                                                     "noise": "p/" + seven[:-5] + ".diff.noise.fits",
                                                     "mask": "p/" + seven[:-5] + ".diff.mask.fits",
                                                     "ref": "p/" + seven[:-5] + ".ref.fits"}


@pytest.mark.parametrize("value", ["../../etc", "a/b", "-rf", "x; rm -rf ~"])
def test_no_header_value_leaves_the_folder_in_a_gppy_name(value):
    when = datetime(2024, 2, 29, 12, 34, 56)
    for name in (names.calib_name("LOAO", value, when, value, 60.0), names.stack_name("LOAO", value, when, value, 60.0)):
        assert "/" not in name and ".." not in name and name.startswith("Calib-LOAO-")
