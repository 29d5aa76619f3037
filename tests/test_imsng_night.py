"""IMSNG/GECKO nights end to end: simulated nights of two sites with different cameras (LOAO: 1 m,
E2V 0.794"/px, B R against Pan-STARRS1, sexagesimal pointing 1.5' off; KCT: 0.36 m, ASI1600MM
0.306"/px, g r against APASS, RA/DEC pointing 1' off) through the same `gppy night run` as 7DT,
judged against the simulator's truth; the Argo submission, the watcher and the backlog for an LOAO
night. (Solving without a pointing, solve-field then SCAMP, is tests/test_astrometry.py's.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning
from typer.testing import CliRunner

import manifest_checks as checks
from gppy_stage.cluster import submission, watcher, workflow
from gppy_stage.science.astrometry import offset_from_truth
from gppy_stage.sim.check import match_transient
from gppy_stage.sim.imsng import simulate_site_night
from test_watcher import kube  # noqa: F401  (the Kubernetes API emulator on 127.0.0.1, as a fixture)

pytestmark = pytest.mark.slow  # two small nights, about two minutes each on 2 cores

SITES = ("LOAO", "KCT")
ZP_TOLERANCE = {"g": 0.03, "r": 0.03, "i": 0.03, "B": 0.05, "V": 0.05, "R": 0.05, "I": 0.05}
# gpPy's names (names.py): Calib-<OBS>-<OBJECT>-<YYYYMMDD>-<HHMMSS>-<filter>-<exptime>.fits
CALIB_NAME = re.compile(r"^Calib-(?P<obs>[A-Za-z0-9]+)-(?P<obj>[A-Za-z0-9]+)-\d{8}-\d{6}-(?P<filt>\w+)-(?P<exp>\d+)\.fits$")


def _run_night(root: Path, obs: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLACK_WEBHOOK_URL": "", "SLACK_BOT_TOKEN": ""}
    return subprocess.run([sys.executable, "-m", "gppy_stage.cli", "night", "run", "--root", str(root), "--obs", obs,
                           "--workers", "2"], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    out = {}
    for obs in SITES:
        root = tmp_path_factory.mktemp(obs)
        summary = simulate_site_night(root, obs, "2024-02-29", size="small", seed=1, n_science=2)
        done = _run_night(root, obs)
        folder = summary["night_folder"]
        report = json.loads((root / "runs" / obs / folder / "night_report.json").read_text())
        truth = Path(summary["truth_dir"])
        frames = {e["file"]: e for e in json.loads((truth / "frames.json").read_text()) if e["imagetyp"] == "LIGHT"}
        out[obs] = {"root": root, "summary": summary, "run": done, "report": report, "truth": frames,
                    "objects": json.loads((truth / "transients.json").read_text()),
                    "plan": json.loads((root / "runs" / obs / folder / "plan.json").read_text())}
    return out


@pytest.mark.parametrize("obs", SITES)
def test_every_science_frame_calibrated_solved_and_named(nights, obs):
    n = nights[obs]
    assert n["run"].returncode == 0, n["run"].stdout[-3000:] + n["run"].stderr[-3000:]
    frames = n["report"]["frames"]
    assert len(frames) == n["summary"]["counts"]["LIGHT"] and all(f["status"] == "done" for f in frames), frames
    by_id = {f["id"]: f for f in n["plan"]["frames"]}
    for f in frames:
        m = CALIB_NAME.match(Path(f["output"]).name)
        assert m and (m["obs"], m["obj"], m["filt"]) == (obs, n["summary"]["field"], f["filter"]), f["output"]
        assert f["output"].startswith(f"processed/{n['summary']['field']}/{obs}/{f['filter']}/")
        raw = by_id[f["id"]]["raw"].rsplit("/", 1)[-1]
        header = fits.getheader(n["root"] / f["output"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            off = offset_from_truth(WCS(header), WCS(fits.Header(n["truth"][raw]["wcs"])),
                                    (header["NAXIS2"], header["NAXIS1"]))
        print(f"{obs} {raw}: {header['ASTROMTD']}, median offset from the true WCS {np.median(off):.3f}\"")
        assert np.median(off) <= 0.1


@pytest.mark.parametrize("obs", SITES)
def test_zero_points_against_truth(nights, obs):
    n = nights[obs]
    by_id = {f["id"]: f for f in n["plan"]["frames"]}
    for f in n["report"]["frames"]:
        raw = by_id[f["id"]]["raw"].rsplit("/", 1)[-1]
        header = fits.getheader(n["root"] / f["output"])
        dzp = header["ZPTOT"] - n["truth"][raw]["zp"]
        print(f"{obs} {raw} {f['filter']}: ZPTOT - true ZP {dzp:+.4f} ({header.get('ZPTRANS', 'catalogue band')})")
        assert abs(dzp) < ZP_TOLERANCE[f["filter"]]


def _all_candidates(n) -> list[dict]:
    """Every candidate of the night's stacks (.cand.ecsv), passing the real/bogus threshold or not."""
    rows = []
    for st in n["plan"]["stacks"]:
        path = n["root"] / (st["output"][: -len(".fits")] + ".cand.ecsv")
        for c in Table.read(path):
            rows.append({"filter": st["filter"], "ra": float(c["ra"]), "dec": float(c["dec"]), "mag": float(c["mag"]),
                         "pass": bool(c["pass"]), "rb_score": float(c["rb_score"]), "flags": int(c["flags"])})
    return rows


@pytest.mark.parametrize("obs", SITES)
def test_transient_found_and_mover_flagged(nights, obs):
    n = nights[obs]
    rows = match_transient(n["objects"]["transient"], _all_candidates(n), radius_arcsec=1.0)
    for r in rows:
        assert r["found"], (obs, r)
        c = r["candidate"]
        print(f"{obs} {r['filter']}: transient {r['sep_arcsec']:.2f}\" away, dmag {r['dmag']:+.3f}, "
              f"flags {c['flags']}, rb_score {c['rb_score']:.2f}")
        assert abs(r["dmag"]) < 0.1 and c["flags"] == 0
    truth = n["objects"]["asteroid"]
    movers = n["report"]["moving"]
    assert movers, "the moving object was not flagged"
    best = min(movers, key=lambda m: abs(m["rate_arcsec_h"] - truth["rate_arcsec_per_hour"]))
    assert abs(best["rate_arcsec_h"] / truth["rate_arcsec_per_hour"] - 1) < 0.1
    assert abs((best["pa_deg"] - truth["pa_deg"] + 180) % 360 - 180) < 10


@pytest.mark.parametrize("obs", SITES)
def test_transient_passes_real_bogus(nights, obs):
    rows = match_transient(nights[obs]["objects"]["transient"], nights[obs]["report"]["candidates"], 1.0)
    assert all(r["found"] for r in rows), rows


# ----------------------------------------------------------------------------- the cluster side

def test_argo_submission_for_loao_has_the_shape_of_7dt():
    """`argo submit workflows/night.yaml -p obs=LOAO` and what the watcher/backlog submit for an LOAO
    night: the same template and parameters as 7DT's, only the values differ, and every parameter
    resolves against the rendered template."""
    library = {workflow.TEMPLATE_NAME: workflow.template_dict()}

    def shape(obj):
        if isinstance(obj, dict):
            return {k: shape(v) for k, v in obj.items() if k not in ("value", "name", "gppy.io/obs", "gppy.io/night")}
        if isinstance(obj, list):
            return [shape(v) for v in obj]
        return type(obj).__name__

    for kw in ({}, {"backlog": True}, {"too": True}):
        seven = submission.night_workflow("7DT03", "2025-01-01_gain2750", name="gppy-7dt03-x", root="s3://b", **kw)
        loao = submission.night_workflow("LOAO", "2024_0229", name=watcher.workflow_name("LOAO", "2024_0229"),
                                         root="s3://b", **kw)
        assert shape(loao) == shape(seven)
        params = {p["name"]: p.get("value") for p in loao["spec"]["arguments"]["parameters"]}
        assert params["obs"] == "LOAO" and params["night"] == "2024_0229"
        assert not checks.argo_schema_errors(loao) and not checks.reference_errors(loao, library)
    assert re.fullmatch(r"gppy-loao-2024-0229-[0-9a-f]{6}", watcher.workflow_name("LOAO", "2024_0229"))


def test_watch_and_backlog_find_the_loao_night(nights, kube, tmp_path, monkeypatch):
    """The simulated LOAO night, under a recent date, is submitted once by `gppy watch --once` (it
    watches LOAO with its YYYY_MMDD folders beside a 7DT unit), and `gppy backlog --obs LOAO` finds
    it by date; nothing else in obsdata/LOAO is taken for a night."""
    from gppy_stage.cli import app

    n = nights["LOAO"]
    recent = time.strftime("%Y_%m%d", time.gmtime(time.time() - 2 * 86400))
    root = tmp_path / "root"
    src = Path(n["summary"]["raw_dir"])
    for folder in (recent, "2024_0229"):
        (root / "obsdata/LOAO" / folder).mkdir(parents=True)
        for p in src.iterdir():
            os.link(p, root / "obsdata/LOAO" / folder / p.name)
    (root / "obsdata/LOAO/calib_library").mkdir()
    (root / "obsdata/LOAO/calib_library/x.fits").write_bytes(b"")
    runner = CliRunner()
    env = {"GPPY_ROOT": str(root), "GPPY_UNITS": "7DT01,LOAO", "GPPY_QUIET_MINUTES": "0",
           "GPPY_POLL_GAP_MINUTES": "0"}
    for _ in range(2):  # the first poll sees the folder, the second finds it unchanged
        r = runner.invoke(app, ["watch", "--once"], env=env)
        assert r.exit_code == 0, r.output
    assert kube.names() == [watcher.workflow_name("LOAO", recent)]
    wf = next(iter(kube.objects.values()))
    params = {p["name"]: p.get("value") for p in wf["spec"]["arguments"]["parameters"]}
    assert (params["obs"], params["night"]) == ("LOAO", recent)
    r = runner.invoke(app, ["backlog", "--obs", "LOAO", "--from", "2024-02-28", "--to", "2024-03-01",
                            "--root", str(root), "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = [ln.split("\t") for ln in r.output.splitlines() if ln.startswith("would-submit")]
    assert [(ln[1], ln[2]) for ln in lines] == [("LOAO", "2024_0229")]
