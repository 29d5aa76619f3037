"""Reference catalogues: 7DT Gaia XP CSV, column maps for other catalogues, proper motion, LDAC."""

import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from astropy.time import Time

sys.path.insert(0, str(Path(__file__).parent))
from astro_synth import make_frame, refcat_csv_bytes  # noqa: E402

from gppy_stage.errors import BadInputError  # noqa: E402
from gppy_stage.science import refcat  # noqa: E402
from gppy_stage.tools import ldac  # noqa: E402


def test_gaiaxp_csv_from_bytes_and_path(tmp_path):
    _, hdr, _, truth = make_frame(seed=1, shape=(200, 200), n_stars=30)
    raw = refcat_csv_bytes(truth["refcat"])
    a = refcat.read_refcat(raw, name="gaiaxp_dr3_synphot_T10779.csv")
    p = tmp_path / refcat.refcat_name("T10779")
    p.write_bytes(raw)
    b = refcat.read_refcat(p)
    assert a.meta["REFCAT"] == b.meta["REFCAT"] == "gaiaxp_dr3_synphot_T10779.csv"
    assert a.meta["EPOCH"] == 2016.0
    assert refcat.bands(a) == ["m425"]
    np.testing.assert_allclose(a["mag_m425"], truth["refcat"]["mag_m425"])


def test_proper_motion_moves_stars_to_the_observation_epoch():
    _, hdr, _, truth = make_frame(seed=2, shape=(200, 200), n_stars=30)
    ref = refcat.read_refcat(refcat_csv_bytes(truth["refcat"]))
    moved = refcat.at_epoch(ref, Time(hdr["DATE-OBS"]))
    stars = truth["stars"]  # positions as imaged at DATE-OBS
    before = np.hypot((ref["ra"] - stars["ra"]) * np.cos(np.radians(stars["dec"])), ref["dec"] - stars["dec"]) * 3600
    after = np.hypot((moved["ra"] - stars["ra"]) * np.cos(np.radians(stars["dec"])), moved["dec"] - stars["dec"]) * 3600
    assert np.median(before) > 0.05  # 9 years of ~10 mas/yr
    assert np.max(after) < 1e-3
    assert abs(moved.meta["EPOCH"] - Time(hdr["DATE-OBS"]).jyear) < 1e-6


def test_column_maps_and_vega_to_ab():
    apass = Table({"RAJ2000": [10.0, 10.1], "DEJ2000": [-5.0, -5.1], "Bmag": [14.0, 15.0], "e_Bmag": [0.02, 0.03],
                   "Vmag": [13.5, 14.2], "e_Vmag": [0.01, 0.02]})
    out = refcat.standardize(apass, "apass")
    np.testing.assert_allclose(out["mag_B"], [13.91, 14.91])
    np.testing.assert_allclose(out["mag_V"], [13.52, 14.22])
    tm = refcat.standardize(Table({"RAJ2000": [1.0], "DEJ2000": [2.0], "Jmag": [12.0], "e_Jmag": [0.02],
                                   "Kmag": [11.0], "e_Kmag": [0.03]}), "2mass")
    assert tm["mag_J"][0] == pytest.approx(12.91) and tm["mag_Ks"][0] == pytest.approx(12.85)
    ps1 = refcat.standardize(Table({"raMean": [1.0], "decMean": [2.0], "gMeanPSFMag": [16.0],
                                    "gMeanPSFMagErr": [0.01]}), "ps1")
    assert ps1["mag_g"][0] == 16.0 and np.all(ps1["pmra"] == 0)
    assert refcat.VEGA_TO_AB["U"] == 0.79 and refcat.VEGA_TO_AB["I"] == 0.45 and refcat.VEGA_TO_AB["H"] == 1.39


def test_missing_or_broken_catalogue_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        refcat.read_refcat(tmp_path / "gaiaxp_dr3_synphot_NOPE.csv")
    with pytest.raises(BadInputError, match="empty"):
        refcat.read_refcat(b"")
    with pytest.raises(BadInputError, match="no column"):
        refcat.read_refcat(b"a,b\n1,2\n")


def test_scamp_reference_ldac():
    _, _, _, truth = make_frame(seed=3, shape=(200, 200), n_stars=30)
    ref = refcat.read_refcat(refcat_csv_bytes(truth["refcat"]))
    t = ldac.read_ldac(refcat.scamp_reference_ldac(ref, "m425"))
    assert set(["X_WORLD", "Y_WORLD", "ERRA_WORLD", "MAG", "MAGERR"]) <= set(t.colnames)
    np.testing.assert_allclose(t["X_WORLD"], ref["ra"])


def test_text_in_a_magnitude_column_names_the_file_and_the_column():
    _, _, _, truth = make_frame(seed=4, shape=(200, 200), n_stars=30)
    lines = refcat_csv_bytes(truth["refcat"]).decode().splitlines()
    at = lines[0].split(",").index("mag_m425")
    row = lines[3].split(",")
    row[at] = "bright"
    lines[3] = ",".join(row)
    with pytest.raises(BadInputError) as info:
        refcat.read_refcat("\n".join(lines).encode(), name="ref_cat/gaiaxp_dr3_synphot_T1.csv")
    assert info.value.path == "ref_cat/gaiaxp_dr3_synphot_T1.csv"
    assert "'mag_m425'" in info.value.reason and "'bright'" in info.value.reason


def test_refcat_name_of_a_hostile_object_stays_a_file_name():
    assert refcat.refcat_name("T10779") == "gaiaxp_dr3_synphot_T10779.csv"
    name = refcat.refcat_name("../../etc/passwd")
    assert "/" not in name and ".." not in name


def test_each_site_finds_its_catalogue_by_preference():
    # a northern site takes PS1 when the field has one, else falls back down its list
    stored = {"ref_cat/ps1_dr1_M101.csv", "ref_cat/gaiaxp_dr3_synphot_M101.csv", "ref_cat/apass_dr9_NGC300.csv"}
    assert refcat.locate("LOAO", "M101", stored.__contains__) == ("ref_cat/ps1_dr1_M101.csv", "ps1")
    assert refcat.locate("RASA36", "NGC300", stored.__contains__) == ("ref_cat/apass_dr9_NGC300.csv", "apass")
    assert refcat.locate("7DT01", "M101", stored.__contains__) == ("ref_cat/gaiaxp_dr3_synphot_M101.csv", "gaiaxp")
    assert refcat.locate("7DT01", "NGC300", stored.__contains__) is None
    assert refcat.site_kinds("KCT")[0] == "skymapper"


def test_apass_and_skymapper_files_as_published_in_refcat_columns():
    apass = ("RAJ2000,DEJ2000,recno,Bmag,e_Bmag,Vmag,e_Vmag,g'mag,e_g'mag,r'mag,e_r'mag,i'mag,e_i'mag\n"
             "10.0,-30.0,1,15.0,0.02,14.5,0.02,14.7,0.02,14.3,0.02,14.2,0.03\n").encode()
    t = refcat.read_refcat(apass, kind="apass", name="ref_cat/apass_dr9_NGC300.csv")
    assert t["mag_B"][0] == pytest.approx(14.91) and t["mag_g"][0] == pytest.approx(14.7)
    sm = b"raj2000,dej2000,object_id,g_psf,e_g_psf,r_psf,e_r_psf\n10.0,-30.0,7,15.1,0.01,14.6,0.01\n"
    t = refcat.read_refcat(sm, kind="skymapper")
    assert refcat.bands(t) == ["g", "r"] and t["magerr_r"][0] == pytest.approx(0.01)
