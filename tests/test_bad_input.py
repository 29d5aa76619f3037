"""The bad-input corpus: a good simulated night damaged one way at a time, run as a user runs it.

One tiny night (512x768) is simulated and processed once; each case copies it under a fresh
``<case>/a/root``, damages the copy with a small function, runs ``gppy`` in a subprocess and checks
what an operator needs: the documented exit code, no traceback, the damaged file and the reason
named, the rest of the night still made, raw files byte-identical, and nothing written outside the
root (``a/`` holds nothing but ``root``). Work already done is skipped on the copy (products carry
the hash of their inputs), so each case pays only for what its damage changes.

Exit codes per case are in CASES; a night run exits 0 when the damage ends in a clean quarantine
(the night went on without that frame), 78 for a wrong root or configuration.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time

from gppy_stage.sim import simulate_night

UNIT, NIGHT = "7DT01", "2025-01-01_gain2750"
RAW = Path("obsdata") / UNIT / NIGHT
CONFIG = Path(__file__).resolve().parents[1] / "config"


def _gppy(args: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gppy_stage.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=cwd)


def _night_run(root: Path, night: str = NIGHT) -> list[str]:
    return ["night", "run", "--root", str(root), "--obs", UNIT, "--night", night, "--workers", "1"]


def _plan(root: Path) -> list[str]:
    return ["plan", "--root", str(root), "--obs", UNIT, "--night", NIGHT]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """The good night, processed once: (root, plan)."""
    root = tmp_path_factory.mktemp("good") / "root"
    simulate_night(root, filters=("m425",), size="tiny", seed=5, n_science=2)
    shutil.rmtree(root / "truth")  # the simulator's answers: no case needs them
    proc = _gppy(_night_run(root))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = json.loads((root / "runs" / UNIT / NIGHT / "plan.json").read_text())
    assert len(plan["frames"]) == 2 and len(plan["stacks"]) == 1 and not plan["quarantine"]
    return root, plan


# --- damage: each takes the copied root and returns what the case runs, if not the whole night ---


def _science(root: Path) -> list[Path]:
    return sorted((root / RAW).glob("*_T10779_m425_*.fits"))


def _calib(root: Path, kind: str) -> list[Path]:
    return sorted((root / RAW).glob(f"*_{kind}_*.fits"))


def _new_light(root: Path, *, hours: float = 3.0, seq: int = 3, same_time: bool = False, header: dict | None = None,
               data: np.ndarray | None = None, remove: tuple[str, ...] = ()) -> Path:
    """A new LIGHT frame made from the first science frame: later in the night (a stack block of
    its own, so the good frames' stack is untouched) unless ``same_time``, with header changes."""
    src = _science(root)[0]
    with fits.open(src, do_not_scale_image_data=True) as hdul:
        hdr, pixels = hdul[0].header.copy(), hdul[0].data.copy()
    when = datetime.fromisoformat(hdr["DATE-OBS"]) + (timedelta() if same_time else timedelta(hours=hours))
    hdr["DATE-OBS"] = when.isoformat(timespec="milliseconds")
    hdr["MJD"] = Time(when).mjd
    hdr["JD"] = Time(when).jd
    for key, value in (header or {}).items():
        hdr[key] = value
    for key in remove:
        hdr.remove(key, ignore_missing=True)
    if data is not None:
        for key in ("BZERO", "BSCALE"):
            hdr.remove(key, ignore_missing=True)
        pixels = data
    path = root / RAW / f"{UNIT}_{when:%Y%m%d_%H%M%S}_T10779_m425_1x1_100.0s_{seq:04d}.fits"
    fits.PrimaryHDU(pixels, hdr).writeto(path, output_verify="silentfix")
    return path


def _raw_bytes(root: Path, name: str, blob: bytes) -> Path:
    path = root / RAW / name
    path.write_bytes(blob)
    return path


def _tail(name: str) -> str:
    return f"{UNIT}_20250102_040000_T10779_m425_1x1_100.0s_{name}.fits"


def truncated(root):
    blob = _science(root)[0].read_bytes()
    _raw_bytes(root, _tail("0007"), blob[: len(blob) // 2])
    return {"says": [_tail("0007"), "truncated"]}


def zero_bytes(root):
    _raw_bytes(root, _tail("0007"), b"")
    return {"says": [_tail("0007"), "FITS header"]}


def text_as_fits(root):
    _raw_bytes(root, _tail("0007"), b"this is not a FITS file\n" * 200)
    return {"says": [_tail("0007"), "FITS header"]}


def gzip_as_fits(root):
    _raw_bytes(root, _tail("0007"), gzip.compress(_science(root)[0].read_bytes()))
    return {"says": [_tail("0007"), "FITS header"]}


def nan_data(root):
    p = _new_light(root, data=np.full((512, 768), np.nan, np.float32))
    return {"says": [p.stem, "no finite pixel"]}  # named at reduce, not left to fail at astrometry


def all_zero_data(root):
    p = _new_light(root, data=np.zeros((512, 768), np.int16))
    return {"says": [p.stem]}


def float_bitpix(root):
    src = _science(root)[0]
    p = _new_light(root, data=fits.getdata(src).astype(np.float32))
    return {"says": [p.name, "floating-point"], "made": [p.stem]}


def cube_3d(root):
    p = _new_light(root, data=np.zeros((2, 512, 768), np.int16))
    return {"says": [p.name, "NAXIS=3"]}


def wrong_shape(root):
    p = _new_light(root, data=np.zeros((256, 384), np.int16))
    return {"says": [p.name, "384x256"]}


def exptime_missing(root):
    p = _new_light(root, remove=("EXPTIME", "EXPOSURE"))
    return {"says": [p.name, "no EXPTIME"]}


def exptime_zero(root):
    p = _new_light(root, header={"EXPTIME": 0.0, "EXPOSURE": 0.0})
    return {"says": [p.name, "EXPTIME 0"]}


def exptime_negative(root):
    p = _new_light(root, header={"EXPTIME": -100.0, "EXPOSURE": -100.0})
    return {"says": [p.name, "EXPTIME -100"]}


def exptime_absurd(root):
    p = _new_light(root, header={"EXPTIME": 1e9, "EXPOSURE": 1e9})
    return {"says": [p.name, "not a valid exposure"]}


def exptime_text(root):
    p = _new_light(root, header={"EXPTIME": "long", "EXPOSURE": "long"})
    return {"says": [p.name, "not a number"]}


def dateobs_missing(root):
    p = _new_light(root, remove=("DATE-OBS",))
    return {"says": [p.name, "DATE-OBS"]}


def dateobs_absurd(root):
    p = _new_light(root, header={"DATE-OBS": "yesterday evening"})
    return {"says": [p.name, "not an ISO date"]}


def unknown_filter(root):
    p = _new_light(root, header={"FILTER": "m999"})
    return {"says": [p.name, "no master flat"]}


def unknown_imagetyp(root):
    p = _new_light(root, header={"IMAGETYP": "SKYGLOW"})
    return {"says": [p.name, "unknown IMAGETYP"]}


def non_ascii_comment(root):
    p = _new_light(root)
    blob = bytearray(p.read_bytes())
    at = blob.index(b"Target name")
    blob[at:at + 2] = "\u00b0".encode("latin-1") + b"x"
    p.write_bytes(bytes(blob))
    return {"says": [p.name, "non-ASCII"], "made": [p.stem]}


def head_disagrees(root):
    src = _science(root)[0]
    head = src.with_suffix(".head")
    head.write_text(head.read_text().replace("EXPTIME =                100.0", "EXPTIME =                 60.0"))
    return {"says": [head.name, "EXPTIME"]}


def head_orphan(root):
    head = (root / RAW / _tail("0009")).with_suffix(".head")
    head.write_text(_science(root)[0].with_suffix(".head").read_text())
    return {"says": [head.name, "no FITS file beside it"]}


def head_corrupt(root):
    head = _science(root)[1].with_suffix(".head")
    head.write_bytes(os.urandom(3000))
    return {"says": [head.name]}


def duplicate_identical(root):
    src = _science(root)[0]
    dup = root / RAW / src.name.replace("_0001.fits", "_0005.fits")
    shutil.copyfile(src, dup)
    return {"says": [dup.name, f"duplicate of {src.name}"]}


def duplicate_same_second(root):
    rng = np.random.default_rng(1)
    src = _science(root)[0]
    data = fits.getdata(src).astype(np.int32) + rng.integers(0, 3, (512, 768))
    p = _new_light(root, same_time=True, seq=5, data=data.astype(np.uint16))
    return {"says": [p.name, "same second"], "made": [p.stem]}


def saturated(root):
    p = _new_light(root, data=np.full((512, 768), 65535, np.uint16))
    return {"says": [p.stem]}


def other_unit(root):
    p = _new_light(root, header={"TELESCOP": "7DT02"})
    return {"says": [p.name, "TELESCOP is 7DT02"]}


def _other_night(root, kinds: tuple[str, ...]) -> str:
    night = "2025-01-02_gain2750"
    folder = root / "obsdata" / UNIT / night
    folder.mkdir()
    for kind in kinds:
        for p in _calib(root, kind):
            shutil.copyfile(p, folder / p.name)
    return night


def empty_night(root):
    night = _other_night(root, ())
    return {"args": _night_run(root, night), "says": ["holds no FITS frames"], "keeps": "nothing new"}


def biases_only(root):
    night = _other_night(root, ("BIAS",))
    return {"args": _night_run(root, night), "says": ["calibration sets: 1"], "keeps": "nothing new"}


def flats_without_bias(root):
    night = _other_night(root, ("FLAT",))
    return {"args": _night_run(root, night), "says": ["calibration sets: 1"], "keeps": "nothing new"}


def _refcat(root) -> Path:
    return root / "ref_cat" / "gaiaxp_dr3_synphot_T10779.csv"


def refcat_text_in_mag(root):
    path = _refcat(root)
    lines = path.read_text().splitlines()
    cols = lines[0].split(",")
    at = cols.index("mag_m425")
    row = lines[5].split(",")
    row[at] = "n/a-bright"
    lines[5] = ",".join(row)
    path.write_text("\n".join(lines) + "\n")
    return {"says": ["ref_cat/gaiaxp_dr3_synphot_T10779.csv", "'mag_m425'", "n/a-bright"], "keeps": "reduced"}


def refcat_missing(root):
    _refcat(root).unlink()
    return {"says": ["ref_cat/gaiaxp_dr3_synphot_T10779.csv"], "keeps": "reduced"}


def refcat_empty(root):
    _refcat(root).write_bytes(b"")
    return {"says": ["gaiaxp_dr3_synphot_T10779.csv", "empty"], "keeps": "reduced"}


def ref_frame_missing(root):
    shutil.rmtree(root / "ref_frame")
    return {"says": ["no reference frame for T10779"], "keeps": "frames"}


def ref_frame_corrupt(root):
    for p in (root / "ref_frame").rglob("*.fits"):
        p.write_bytes(p.read_bytes()[:5000])
    return {"says": ["ref_7DT_T10779_m425_deep.fits"], "keeps": "frames"}


def plan_corrupt_stage(root, plan):
    (root / "runs" / UNIT / NIGHT / "plan.json").write_text('{"schema": "gppy-stage/plan/1", "frames": [')
    args = ["stage", "reduce", "--root", str(root), "--obs", UNIT, "--night", NIGHT, "--frame", plan["frames"][0]["id"]]
    return {"args": args, "says": ["plan.json", "not valid JSON"]}


def plan_corrupt_night(root):
    (root / "runs" / UNIT / NIGHT / "plan.json").write_bytes(b"\x00\xff garbage")
    return {"says": ["science out: 2"]}


def product_sidecar_corrupt(root, plan):
    (root / (plan["frames"][0]["output"] + ".json")).write_text("{not json")
    return {"says": ["science out: 2"]}


def config_yaml_broken(root, tmp):
    cfg = tmp / "config"
    shutil.copytree(CONFIG, cfg)
    (cfg / "pipeline.yaml").write_text((cfg / "pipeline.yaml").read_text() + "\nplan: [unclosed\n  x: {\n")
    return {"env": {"GPPY_CONFIG": str(cfg)}, "says": ["pipeline.yaml: line ", "not valid YAML"],
            "never": ["<unicode string>"], "keeps": "nothing new"}


def root_missing(root):
    shutil.rmtree(root)
    return {"says": ["has no obsdata/7DT01/"], "keeps": "nothing new"}


def object_traversal(root):
    p = _new_light(root, header={"OBJECT": "../../etc"})
    return {"says": [p.name, "not a safe name"], "made": [p.stem]}


def object_shell(root):
    p = _new_light(root, header={"OBJECT": "x; rm -rf ~ $(id) 'q' \"z\" `w`"})
    return {"says": [p.name, "not a safe name"], "made": [p.stem]}


def filter_traversal(root):
    p = _new_light(root, header={"FILTER": "../../../tmp/x"})
    return {"says": [p.name, "no master flat"]}


@dataclass(frozen=True)
class Case:
    damage: Callable
    code: int = 0
    # what the case runs: "plan" where the damage shows in the plan (the frame is quarantined,
    # skipped or warned about there), else the whole night
    run: str = "night"
    # what must still be made: "all" (the good frames calibrated, with photometry, and their stack),
    # "frames" (the good frames with photometry), "reduced" (the good frames reduced), "planned"
    # (the plan still makes the good frames exactly as before, and their products are there),
    # "nothing new" (a run that makes nothing: the good night's products stay as they were)
    keeps: str = "all"
    extra: tuple = field(default=())


def _planned(damage) -> Case:
    return Case(damage, run="plan", keeps="planned")


CASES = [
    _planned(truncated), _planned(zero_bytes), _planned(text_as_fits), _planned(gzip_as_fits),
    Case(nan_data), Case(all_zero_data), Case(float_bitpix), _planned(cube_3d), _planned(wrong_shape),
    _planned(exptime_missing), _planned(exptime_zero), _planned(exptime_negative), _planned(exptime_absurd),
    _planned(exptime_text), _planned(dateobs_missing), _planned(dateobs_absurd), _planned(unknown_filter),
    _planned(unknown_imagetyp), Case(non_ascii_comment), _planned(head_disagrees), _planned(head_orphan),
    _planned(head_corrupt), _planned(duplicate_identical), Case(duplicate_same_second), Case(saturated),
    _planned(other_unit), Case(empty_night), Case(biases_only), Case(flats_without_bias),
    Case(refcat_text_in_mag), Case(refcat_missing), Case(refcat_empty), Case(ref_frame_missing),
    Case(ref_frame_corrupt), Case(plan_corrupt_stage, code=78, keeps="nothing new", extra=("plan",)),
    Case(plan_corrupt_night), Case(product_sidecar_corrupt, extra=("plan",)),
    Case(config_yaml_broken, code=78, extra=("tmp",)), Case(root_missing, code=78),
    Case(object_traversal), Case(object_shell), _planned(filter_traversal),
]


def _hashes(root: Path) -> dict[str, str]:
    raw = root / "obsdata"
    return {str(p.relative_to(raw)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(raw.rglob("*")) if p.is_file()} if raw.is_dir() else {}


def _opens(path: Path) -> bool:
    try:
        with fits.open(path) as hdul:
            return hdul[0].data is not None
    except (OSError, ValueError):
        return False


def _check_kept(root: Path, plan: dict, keeps: str, made: list[str]) -> None:
    outputs = {f["id"]: root / f["output"] for f in plan["frames"]}
    if keeps == "nothing new":
        return
    new_plan = json.loads((root / "runs" / UNIT / NIGHT / "plan.json").read_text())
    if keeps == "planned":
        now = {f["id"]: (f["output"], f["masters"]) for f in new_plan["frames"]}
        for f in plan["frames"]:
            assert now.get(f["id"]) == (f["output"], f["masters"]), f"the good frame {f['id']} is planned otherwise"
        assert [c["id"] for c in new_plan["calsets"]] == [c["id"] for c in plan["calsets"]]
        for old, new in zip(plan["calsets"], new_plan["calsets"]):
            assert old == new, "the calibration set changed"
    for fid, path in outputs.items():
        assert _opens(path), f"the good frame {fid} lost its product {path}"
        if keeps in ("all", "frames", "planned"):
            header = fits.getheader(path)
            assert header.get("ASTROMTD") and "ZP_APER_1" in header, f"{fid}: astrometry/photometry lost"
    if keeps in ("all", "planned"):
        for stack in plan["stacks"]:
            assert _opens(root / stack["output"]), f"the good stack {stack['id']} is missing"
    for stem in made:  # a frame the pipeline was to keep (with a warning) was made too
        entry = next((f for f in new_plan["frames"] if f["id"] == stem), None)
        assert entry is not None, f"{stem} is not in the plan"
        assert entry.get("warnings"), f"{stem} was kept without the warning it needs in plan.json"
        assert _opens(root / entry["output"]), f"{stem} was kept but not made"
        assert (root / entry["output"]).resolve().is_relative_to(root.resolve())


@pytest.mark.parametrize("case", CASES, ids=[c.damage.__name__ for c in CASES])
def test_bad_input(case, good, tmp_path):
    base, plan = good
    outside = tmp_path / "a"
    root = outside / "root"
    shutil.copytree(base, root, symlinks=False)
    kwargs = {"plan": plan, "tmp": tmp_path}
    spec = case.damage(root, **{k: kwargs[k] for k in case.extra}) or {}
    before = _hashes(root)
    default = _plan(root) if case.run == "plan" else _night_run(root)
    proc = _gppy(spec.get("args", default), env=spec.get("env"), cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == case.code, f"exit {proc.returncode}, expected {case.code}:\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    for text in spec.get("says", []):
        assert text in output, f"the output does not say {text!r}:\n{output[-4000:]}"
    for text in spec.get("never", []):
        assert text not in output, f"the output says {text!r}:\n{output[-4000:]}"
    if case.run == "plan":  # the plan lists what it did with the file, for the night report
        new_plan = json.loads((root / "runs" / UNIT / NIGHT / "plan.json").read_text())
        listed = json.dumps([new_plan["quarantine"], new_plan["skipped"], new_plan["warnings"]])
        assert spec["says"][0] in listed, f"plan.json does not list {spec['says'][0]}"
    assert _hashes(root) == before, "a raw file changed"
    assert sorted(p.name for p in outside.iterdir()) == (["root"] if before else []), "written outside the root"
    assert not (tmp_path / "etc").exists() and not any(tmp_path.glob("*/etc"))
    _check_kept(root, plan, spec.get("keeps", case.keeps), spec.get("made", []))
