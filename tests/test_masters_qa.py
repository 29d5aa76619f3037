"""Per-frame QA of a master's inputs: a broken bias, dark or flat is rejected by name before combining.

The sigma-clipped median ignores NaN and outvotes a frame of random bytes pixel by pixel, so
without this a master of 8 good biases and one broken one claimed NCOMBINE 9 and QA "good".
Each case damages raw frames of a small simulated night (its own copy), plans it and runs the
masters stage, then reads the master, its sidecar and the stage result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from gppy_stage import runner
from gppy_stage.science.combine import clipped_stats
from gppy_stage.sim import simulate_night

UNIT, NIGHT = "7DT01", "2025-01-01_gain2750"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("mqa") / "root"
    simulate_night(root, filters=("m475",), seed=5, n_science=1, reference=False)
    return root


@pytest.fixture
def night(pristine, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(pristine, root)
    return root


def _raw(root: Path, kind: str) -> list[Path]:
    return sorted((root / "obsdata" / UNIT / NIGHT).glob(f"*_{kind}_*.fits"))


def _random_bytes(path: Path) -> None:
    """Keep the header, fill the data with random bytes: the right size, and nonsense."""
    with fits.open(path) as hdul:
        offset = hdul[0]._data_offset
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.random.default_rng(1).bytes(size - offset))


def _all_nan(path: Path) -> None:
    with fits.open(path) as hdul:
        header = hdul[0].header.copy()
        shape = hdul[0].data.shape
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    fits.PrimaryHDU(np.full(shape, np.nan, dtype=np.float32), header).writeto(path, overwrite=True)


def _set_level(path: Path, value: float) -> None:
    with fits.open(path, mode="update") as hdul:
        hdul[0].data[...] = value


def _masters(root: Path) -> dict:
    plan = runner.execute("plan", str(root), UNIT, NIGHT)
    assert plan["status"] == "done", plan
    calsets = json.loads((root / "runs" / UNIT / NIGHT / "plan.json").read_text())["calsets"]
    assert len(calsets) == 1
    record = runner.execute("masters", str(root), UNIT, NIGHT, item=calsets[0]["id"])
    saved = json.loads((root / "runs" / UNIT / NIGHT / "results" / "masters" / f"{calsets[0]['id']}.json").read_text())
    assert saved["status"] == record["status"]
    return record, calsets[0], json.loads((root / "runs" / UNIT / NIGHT / "plan.json").read_text())


def test_broken_inputs_are_rejected_by_name(night):
    biases, darks, flats = _raw(night, "BIAS"), _raw(night, "DARK"), _raw(night, "FLAT")
    _all_nan(biases[2])
    _random_bytes(biases[5])
    _random_bytes(darks[1])
    _set_level(flats[3], 65535)  # saturated: a level no flat may have
    record, calset, plan = _masters(night)
    assert record["status"] == "done", record
    made = {m["kind"]: m for m in record["result"]["masters"]}
    quarantined = {Path(q["file"]).name for q in plan["quarantine"]}  # a float raw frame may be refused earlier

    zero = made["zero"]
    rejected = {Path(r["file"]).name: r["reason"] for r in zero["rejected"]}
    assert biases[5].name in rejected and "outside the bias window" in rejected[biases[5].name]
    assert biases[2].name in rejected or biases[2].name in quarantined
    if biases[2].name in rejected:
        assert "finite" in rejected[biases[2].name]
    path = night / calset["zero"]["output"]
    data, header = fits.getdata(path), fits.getheader(path)
    good = [b for b in biases if b not in (biases[2], biases[5])]
    assert header["NCOMBINE"] == len(good) == zero["ncombine"]
    assert {header[f"INPUT{i:03d}"] for i in range(1, len(good) + 1)} == {b.name for b in good}
    assert {header[f"REJ{i:03d}"] for i in range(1, header["NREJECT"] + 1)} == set(rejected)
    sidecar = json.loads(Path(str(path) + ".json").read_text())
    assert {Path(r["file"]).name for r in sidecar["rejected"]} == set(rejected)
    assert all(Path(k).name not in rejected for k in sidecar["inputs"])
    # and the master is the one the good frames make: the simulator's bias level, every pixel finite
    med, std = clipped_stats(data)
    assert header["QAVERDCT"] == "good" and 512 <= med <= 514 and std < 2.5 and np.isfinite(data).all()
    truth = np.median(np.stack([fits.getdata(b).astype(np.float32) for b in good]), axis=0)
    assert np.abs(data - truth).mean() < 0.5

    dark = made["dark"]
    assert [Path(r["file"]).name for r in dark["rejected"]] == [darks[1].name]
    assert "level" in dark["rejected"][0]["reason"] or "noise" in dark["rejected"][0]["reason"]
    dheader = fits.getheader(night / calset["darks"][0]["output"])
    assert dheader["NCOMBINE"] == len(darks) - 1 and dheader["REJ001"] == darks[1].name

    # 5 flats were planned, the minimum: with one rejected no flat is made, and the set says which and why
    flat = {f["kind"]: f for f in record["result"]["failed"]}["flat"]
    assert [Path(r["file"]).name for r in flat["rejected"]] == [flats[3].name]
    assert "after bias subtraction outside" in flat["rejected"][0]["reason"] and flats[3].name in flat["reason"]
    assert "only 4 of 5 flat frames passed QA" in flat["reason"]
    assert not (night / calset["flats"][0]["output"]).exists()


def test_too_few_good_inputs_make_no_master_and_the_calset_says_why(night):
    biases = _raw(night, "BIAS")
    for b in biases[:5]:  # 4 good biases left, a master needs 5
        _random_bytes(b)
    record, calset, _ = _masters(night)
    # no bias, so no dark or flat either (the library is empty): the calset's result says why, by name
    assert record["status"] == "quarantined" and record["exit_code"] == 65, record
    reason = record["error"]["reason"]
    assert "only 4 of 9 zero frames passed QA (a master needs 5)" in reason
    assert all(b.name in reason for b in biases[:5]) and "outside the bias window" in reason
    assert not any(b.name in reason for b in biases[5:])
    assert not (night / calset["zero"]["output"]).exists()
    assert not (night / calset["flats"][0]["output"]).exists()
    assert not list((night / "master_frame").rglob("*.fits")) if (night / "master_frame").exists() else True
