"""IMSNG/GECKO nights planned like 7DT nights: each site's night folder pattern and MaxIm-style headers.

The frames are written as MaxIm DL writes them (IMAGETYP 'Light Frame', OBJCTRA sexagesimal,
XBINNING, EGAIN), at the registry's detector shape. Their pixels are zeros left sparse on disk: the
planner reads headers and file sizes only, so a full-size night costs no disk and no time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from astropy.io import fits

from gppy_stage import config
from gppy_stage.headers import frame_info
from gppy_stage.names import parse_night
from gppy_stage.stages.plan import latest_night, list_nights, make_plan

REPO = Path(__file__).resolve().parents[1]


def write_maxim(path: Path, obs: str, imagetyp: str | None, exptime: float, when: datetime,
                obj: str | None = None, filt: str | None = None, binning: int = 1, extra: dict | None = None) -> Path:
    """A raw frame as MaxIm DL writes it, at the site's detector shape (sparse zeros as data)."""
    inst = config.instrument(obs)
    ny, nx = inst.ny // binning, inst.nx // binning
    h = fits.Header()
    h["SIMPLE"] = True
    h["BITPIX"] = 16
    h["NAXIS"] = 2
    h["NAXIS1"] = nx
    h["NAXIS2"] = ny
    h["BZERO"] = 32768
    h["BSCALE"] = 1
    h["EXPTIME"] = exptime
    h["EXPOSURE"] = exptime
    h["DATE-OBS"] = when.strftime("%Y-%m-%dT%H:%M:%S")
    h["XBINNING"] = binning
    h["YBINNING"] = binning
    h["EGAIN"] = 2.1
    h["TELESCOP"] = f"{obs} 1m telescope"
    h["INSTRUME"] = inst.camera
    h["SWCREATE"] = "MaxIm DL Version 6.13"
    if imagetyp is not None:
        h["IMAGETYP"] = imagetyp
    if filt is not None:
        h["FILTER"] = filt
    if obj is not None:
        h["OBJECT"] = obj
    for key, value in (extra or {}).items():
        h[key] = value
    blob = h.tostring().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = 2 * nx * ny
    with open(path, "wb") as fh:
        fh.write(blob)
        fh.truncate(len(blob) + -(-data // 2880) * 2880)
    return path


def _calibs(folder: Path, obs: str, start: datetime, filters, ext: str = "fits") -> None:
    for i in range(5):
        write_maxim(folder / f"bias.{i:03d}.{ext}", obs, "Bias Frame", 0.0, start + timedelta(minutes=i))
        write_maxim(folder / f"dark60.{i:03d}.{ext}", obs, "Dark Frame", 60.0, start + timedelta(minutes=10 + i))
        for j, f in enumerate(filters):
            write_maxim(folder / f"skyflat_{f}_{i:03d}.{ext}", obs, "Flat Field", 5.0,
                        start + timedelta(minutes=30 + 10 * j + i), obj="skyflat", filt=f)


def loao_night(obsdata: Path, folder: str = "2024_0229") -> tuple[Path, dict[str, str]]:
    """An LOAO night: biases, 60 s darks, flats in B and R, M101 in B and R with varied names
    and coordinate keys, and frames without IMAGETYP. Returns the folder and the truth per file."""
    night = obsdata / "LOAO" / folder
    start = datetime.strptime(parse_night(folder, "YYYY_MMDD").date, "%Y-%m-%d") + timedelta(hours=26)
    _calibs(night, "LOAO", start, ("B", "R"))
    truth = {p.name: t for p, t in
             [(q, "BIAS") for q in night.glob("bias*")] + [(q, "DARK") for q in night.glob("dark*")]
             + [(q, "FLAT") for q in night.glob("skyflat*")]}
    lights = [
        ("LOAO_M101_R_60s_001.fit", "R", {"OBJCTRA": "14 03 12.6", "OBJCTDEC": "+54 20 56"}),
        ("LOAO_M101_R_60s_002.fit", "R", {"RA": 210.80, "DEC": 54.35}),
        ("image.000.fits", "B", {}),
        ("image.001.fits", "B", {"OBJCTRA": "14 03 12.6", "OBJCTDEC": "+54 20 56"}),
    ]
    for k, (name, filt, extra) in enumerate(lights):
        write_maxim(night / name, "LOAO", "Light Frame", 60.0, start + timedelta(hours=1, minutes=2 * k),
                    obj="M101", filt=filt, extra=extra)
        truth[name] = "LIGHT"
    # no IMAGETYP: classified from OBJECT and exposure (headers.classify_untyped)
    write_maxim(night / "untyped_light.fits", "LOAO", None, 60.0, start + timedelta(hours=1, minutes=20),
                obj="M101", filt="R")
    truth["untyped_light.fits"] = "LIGHT"
    write_maxim(night / "untyped_flat.fits", "LOAO", None, 5.0, start + timedelta(minutes=55), obj="flat_R", filt="R")
    truth["untyped_flat.fits"] = "FLAT"
    write_maxim(night / "untyped_zero.fits", "LOAO", None, 0.0, start + timedelta(minutes=56))
    truth["untyped_zero.fits"] = "BIAS"
    return night, truth


@pytest.fixture
def site_config(tmp_path, monkeypatch):
    """The repository's configuration plus a KCT rule of the kind gpPy's changehdr.dat held:
    its wheel writes digits, and its INSTRUME is wrong."""
    folder = tmp_path / "config"
    shutil.copytree(REPO / "config", folder)
    rules = yaml.safe_load((folder / "header_rules.yaml").read_text())
    rules["sites"] = {"KCT": {"filter_wheel": {"1": "g", "2": "r", "3": "i"}, "set": {"INSTRUME": "ASI1600MM"}}}
    (folder / "header_rules.yaml").write_text(yaml.safe_dump(rules))
    monkeypatch.setenv("GPPY_CONFIG", str(folder))
    return folder


def _by_raw(plan: dict) -> dict[str, str]:
    kinds = {}
    for cs in plan["calsets"]:
        for key in (cs["zero"] or {}).get("frames", []):
            kinds[key] = "BIAS"
        for d in cs["darks"]:
            kinds.update({k: "DARK" for k in d["frames"]})
        for f in cs["flats"]:
            kinds.update({k: "FLAT" for k in f["frames"]})
    kinds.update({f["raw"]: "LIGHT" for f in plan["frames"]})
    return {k.rsplit("/", 1)[-1]: v for k, v in kinds.items()}


def test_site_night_folder_patterns():
    assert parse_night("2024_0229", "YYYY_MMDD").date == "2024-02-29"
    assert parse_night("20240229", "YYYYMMDD").date == "2024-02-29"
    assert parse_night("2024-02-29_ToO", "YYYY-MM-DD").too
    assert parse_night("2025-01-01_gain2750").gain == 2750  # 7DT unchanged
    for folder, pattern in [("2024_0230", "YYYY_MMDD"), ("2024-02-29", "YYYY_MMDD"), ("20240229", "YYYY-MM-DD"),
                            ("2024_0229", "YYYY-MM-DD_gain")]:
        with pytest.raises(Exception, match="night folder"):
            parse_night(folder, pattern)
    assert config.site("LOAO").night_folder == "YYYY_MMDD" and config.site("LOAO").header_dialect == "maxim"
    assert config.site("7DT01").header_dialect == "tcspy"


def test_loao_night_classified_grouped_and_stacked(tmp_path):
    root = tmp_path / "root"
    night, truth = loao_night(root / "obsdata")
    plan = make_plan(str(root), "LOAO", "2024_0229")
    assert plan["quarantine"] == [] and plan["skipped"] == []
    assert _by_raw(plan) == truth
    [cs] = plan["calsets"]
    assert len(cs["zero"]["frames"]) == 6  # five 'Bias Frame' and the untyped 0 s frame
    assert [d["exptime"] for d in cs["darks"]] == [60.0]
    assert {f["filter"]: len(f["frames"]) for f in cs["flats"]} == {"B": 5, "R": 6}
    assert {f["id"] for f in plan["frames"]} == {"LOAO_M101_R_60s_001", "LOAO_M101_R_60s_002", "image.000",
                                                  "image.001", "untyped_light"}
    for f in plan["frames"]:
        assert set(f["masters"]) == {"zero", "dark", "flat"}
        assert f["masters"]["flat"].endswith(f"_{f['filter']}_1x1.fits")
        assert f["egain"] == 2.1 and f["rdnoise"] == config.instrument("LOAO").rdnoise  # header, else registry
        assert f["output"].startswith(f"processed/M101/LOAO/{f['filter']}/")
    stacks = {(s["field"], s["filter"]): len(s["frames"]) for s in plan["stacks"]}
    assert stacks == {("M101", "R"): 3, ("M101", "B"): 2}


def test_second_site_pattern_and_header_rules(tmp_path, site_config):
    root = tmp_path / "root"
    night = root / "obsdata" / "KCT" / "20240229"
    start = datetime(2024, 2, 29, 11)
    _calibs(night, "KCT", start, ("2",), ext="fit")
    for k in range(3):
        write_maxim(night / f"NGC1234-{k:03d}r.fit", "KCT", "Light Frame", 120.0, start + timedelta(hours=2, minutes=3 * k),
                    obj="NGC 1234", filt="2", extra={"INSTRUME": "wrong camera"})
    (root / "obsdata" / "KCT" / "notes").mkdir()  # not a night folder: ignored
    assert list_nights(str(root), "KCT") == ["20240229"]
    plan = make_plan(str(root), "KCT", "20240229")
    assert plan["quarantine"] == []
    assert {f["filter"] for f in plan["frames"]} == {"r"} and len(plan["frames"]) == 3
    assert [f["filter"] for f in plan["calsets"][0]["flats"]] == ["r"]
    assert {f["camera"] for f in plan["frames"]} == {"ASI1600MM"}
    assert {f["object"] for f in plan["frames"]} == {"NGC_1234"}  # a safe name, with a warning
    hdr = fits.getheader(night / "NGC1234-000r.fit")
    assert hdr["FILTER"] == "2" and hdr["INSTRUME"] == "wrong camera"  # raw data untouched


def test_untyped_frame_without_object_is_one_clear_error(tmp_path):
    path = write_maxim(tmp_path / "x.fits", "LOAO", None, 30.0, datetime(2024, 3, 1, 3))
    with pytest.raises(Exception, match="no IMAGETYP and no OBJECT"):
        frame_info(fits.getheader(path), str(path), path.stat().st_size, site=config.site("LOAO"))
    # 7DT keeps its rule: a TCSpy header without IMAGETYP is a bad header, not guessed
    with pytest.raises(Exception, match="header has no IMAGETYP"):
        frame_info(fits.getheader(path), str(path), path.stat().st_size, site=config.site("7DT01"))


def _gppy(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gppy_stage.cli", *args], capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=120)


def test_gppy_plan_finds_the_latest_loao_night(tmp_path):
    root = tmp_path / "root"
    loao_night(root / "obsdata", "2024_0228")
    loao_night(root / "obsdata", "2024_0229")
    (root / "obsdata" / "LOAO" / "2024_0229_test").mkdir()
    (root / "obsdata" / "LOAO" / "old stuff").mkdir()
    assert latest_night(str(root), "LOAO", now=datetime(2024, 3, 2, 12)) == "2024_0229"
    assert latest_night(str(root), "LOAO", now=datetime(2024, 3, 1, 6)) == "2024_0228"  # 02-29 still going
    out = _gppy("plan", "--root", str(root), "--obs", "LOAO")
    assert out.returncode == 0, out.stderr
    plan = json.loads((root / "runs" / "LOAO" / "2024_0229" / "plan.json").read_text())
    assert plan["night"] == "2024_0229" and len(plan["frames"]) == 5


REAL_SITES = {  # real frames of other telescopes, each in a night folder of an IMSNG site
    "saao1m_ste3_raw_object_a8280271.fits": "LOAO",
    "not_alfosc_raw_flat_gSDSS.fits.fz": "KCT",
    "apogee_alta_light_B_sipwcs.fit": "RASA36",
    "m51_kpno_B_600s_iraf_devpix.fits": "SOAO",
}


def test_real_frames_of_other_telescopes_classified_or_one_line(tmp_path, real_dir):
    root = tmp_path / "root"
    folders = {"LOAO": "2013_0712", "KCT": "20110701", "RASA36": "2011-08-31", "SOAO": "1987_0504"}
    for name, obs in REAL_SITES.items():
        dest = root / "obsdata" / obs / folders[obs]
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(real_dir / name, dest / name)
    for name, obs in REAL_SITES.items():
        out = _gppy("plan", "--root", str(root), "--obs", obs, "--night", folders[obs])
        assert "Traceback" not in out.stderr + out.stdout, out.stderr
        assert out.returncode == 0, out.stderr
        plan = json.loads((root / "runs" / obs / folders[obs] / "plan.json").read_text())
        said = [q for q in plan["quarantine"] + plan["skipped"] if q["file"].endswith(name)]
        planned = [f for f in plan["frames"] if f["raw"].endswith(name)]
        assert len(said) + len(planned) == 1, (name, plan)
        for q in said:
            assert "\n" not in q["reason"] and q["reason"], q


def test_watcher_sees_site_night_folders(tmp_path):
    from gppy_stage.cluster.watcher import candidate_nights

    root = tmp_path / "root"
    for folder in ("2024_0228", "2024_0229", "2024-03-01_gain2750", "misc"):
        (root / "obsdata" / "LOAO" / folder).mkdir(parents=True)
        (root / "obsdata" / "LOAO" / folder / "a.fits").write_bytes(b"")
    assert [n.folder for n in candidate_nights(str(root), "LOAO")] == ["2024_0228", "2024_0229"]
