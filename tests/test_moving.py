"""Moving objects: tracks through candidates from the night's per-frame catalogues, their rate and
angle, the night report's one row per object, known objects named from an ephemeris file.

The night: a tiny simulated 7DT night of one field in two filters whose stacks are 90 minutes
apart (``filter_gap_s``), with movers of 5, 30, 100, 300 and 60 "/h at five angles (the 30 "/h one at
S/N about 15 in a stack, the 60 "/h one at S/N 10: under the frames' catalogues, it is caught by
centroids on per-frame cut-outs), the simulator's own asteroid and its static transient beside a galaxy.
A 5 "/h mover shifts 0.4" within a stack, under what a stack's frames can show: it is caught only
between the two stacks (7.5" apart). A 300 "/h one leaves the frame before the second stack: it
is caught inside its stack.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from gppy_stage.errors import BadInputError
from gppy_stage.report import link_movers, markdown
from gppy_stage.science import moving
from gppy_stage.sim import movers as sim_movers

UNIT, DATE, NIGHT, SEED = "7DT01", "2025-01-01", "2025-01-01_gain2750", 3
MOVERS = "5:40,30:130:snr15,100:250,300:320:16.3,60:200:snr10"
KNOWN = "2025 XK12"  # the name the ephemeris file gives the 30 "/h mover (SIM002)
PIXSCALE = 0.505
# the floor is S/N 10 per stack; the snr10 mover (SIM005) is measured at 8.5 in m425
MIN_SNR = 8.0


# ---- the kernel on synthetic catalogues (no images) --------------------------------------


def _tan(shape=(2000, 2000)) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [30.0, -20.0]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cd = np.array([[-PIXSCALE / 3600, 0], [0, PIXSCALE / 3600]])
    return w


def _synthetic_night(rng, tracks, n_noise=30):
    """Two stacks of three 100 s frames 90 min apart: per-frame (x, y) of 300 static stars, of the
    movers ((x0, y0) at t = 0, rate "/h, PA deg), of a transient seen only in the first stack
    and of fresh noise detections; with the frames' times (days) and stack labels."""
    w = _tan()
    stars = rng.uniform(100, 1900, (300, 2))
    times = np.array([0, 103, 206, 5606, 5709, 5812]) / 86400.0
    frames, groups = [], []
    for k, t in enumerate(times):
        xs, ys = list(stars[:, 0] + rng.normal(0, 0.08, 300)), list(stars[:, 1] + rng.normal(0, 0.08, 300))
        for (x0, y0), rate, pa in tracks:
            d_px = rate * t * 24.0 / PIXSCALE
            # east is -x, north +y on this grid
            xs.append(x0 - d_px * math.sin(math.radians(pa)) + rng.normal(0, 0.2))
            ys.append(y0 + d_px * math.cos(math.radians(pa)) + rng.normal(0, 0.2))
        if k < 3:
            xs.append(700.0 + rng.normal(0, 0.15))
            ys.append(1300.0 + rng.normal(0, 0.15))
        noise = rng.uniform(0, 2000, (n_noise, 2))
        frames.append((np.r_[xs, noise[:, 0]], np.r_[ys, noise[:, 1]]))
        groups.append("a" if k < 3 else "b")
    return w, frames, times, groups


def test_tracks_give_rate_and_angle_and_leave_a_transient_alone():
    rng = np.random.default_rng(11)
    tracks = [((800.0, 900.0), 5.0, 40.0), ((1200.0, 700.0), 30.0, 130.0), ((1000.0, 1500.0), 100.0, 250.0),
              ((400.0, 500.0), 300.0, 320.0)]
    w, frames, times, groups = _synthetic_night(rng, tracks)
    span = (times[0] - 50 / 86400, times[2] + 50 / 86400)
    t_mid = 0.5 * (span[0] + span[1])
    # the candidates of the first stack: each mover at the stack's mid-time, and the transient
    cx, cy = [], []
    for (x0, y0), rate, pa in tracks:
        d_px = rate * t_mid * 24.0 / PIXSCALE
        cx.append(x0 - d_px * math.sin(math.radians(pa)))
        cy.append(y0 + d_px * math.cos(math.radians(pa)))
    cx, cy = np.r_[cx, 700.0], np.r_[cy, 1300.0]
    tr = moving.link_tracks(cx, cy, span, frames, times, vmax=400 * 24 / PIXSCALE, tol=2.0, r0=4.0,
                            static_tol=1.2, fit_tol=1.0, groups=groups)
    rate, pa = moving.rate_and_pa(w, tr["x0"], tr["y0"], tr["vx"], tr["vy"], per_hour=24.0)
    for k, ((_, true_rate, true_pa), r, a) in enumerate(zip(tracks, rate, pa)):
        print(f"mover {true_rate:5.0f}\"/h PA {true_pa:3.0f}: moving {tr['moving'][k]}, {r:7.2f}\"/h PA {a:6.1f}, "
              f"{tr['n_points'][k]} detections")
        assert tr["moving"][k]
        assert abs(r - true_rate) < 0.05 * true_rate
        assert abs((a - true_pa + 180) % 360 - 180) < 5
    # the slow one is on a track only through both stacks; the fast one leaves no other stack behind
    assert tr["n_points"][0] == 6
    assert not tr["moving"][-1] and np.isnan(rate[-1])


def test_two_objects_lined_up_across_stacks_are_not_one_track():
    """A mover in the first stack (gone from the field by the second) and another, faster one in
    the second that happens to lie on its extension: joined, the speeds inside the stacks
    disagree with the speed between them, so the track keeps the first stack's detections."""
    rng = np.random.default_rng(2)
    w, frames, times, groups = _synthetic_night(rng, [((600.0, 600.0), 47.0, 225.0)], n_noise=0)
    # where a 77 "/h track from the first mover's start would be an hour and a half later,
    # something moving 100 "/h at PA 250 (as in the simulated night this case came from)
    x_b = 600.0 - 77.0 * 1.5 / PIXSCALE * math.sin(math.radians(225.0))
    y_b = 600.0 + 77.0 * 1.5 / PIXSCALE * math.cos(math.radians(225.0))
    for k in (3, 4, 5):
        dt_h = (times[k] - times[3]) * 24.0
        fx, fy = np.delete(frames[k][0], 300), np.delete(frames[k][1], 300)  # the first left the field
        frames[k] = (np.r_[fx, x_b - 100.0 * dt_h / PIXSCALE * math.sin(math.radians(250))],
                     np.r_[fy, y_b + 100.0 * dt_h / PIXSCALE * math.cos(math.radians(250))])
    span = (times[0] - 50 / 86400, times[2] + 50 / 86400)
    d_px = 47.0 * 0.5 * (span[0] + span[1]) * 24.0 / PIXSCALE
    c = (600.0 - d_px * math.sin(math.radians(225)), 600.0 + d_px * math.cos(math.radians(225)))
    tr = moving.link_tracks([c[0]], [c[1]], span, frames, times, vmax=400 * 24 / PIXSCALE, tol=2.5, r0=4.0,
                            static_tol=1.2, fit_tol=1.0, groups=groups)
    rate, pa = moving.rate_and_pa(w, tr["x0"], tr["y0"], tr["vx"], tr["vy"], per_hour=24.0)
    print(f"{rate[0]:.1f}\"/h PA {pa[0]:.1f} from {tr['n_points'][0]} detections")
    assert tr["moving"][0] and tr["n_points"][0] == 3
    assert abs(rate[0] - 47.0) < 0.2 * 47.0 and abs((pa[0] - 225 + 180) % 360 - 180) < 15


def test_ephemeris_file_read_interpolated_and_checked(tmp_path):
    text = ("name,ra,dec,mjd,err_arcsec\n"
            "(433) Eros,10.0,-20.0,60000.0,1.0\n(433) Eros,10.01,-20.0,60000.5,1.0\n"
            "2025 AB,11.0,-21.0,60000.0,2.0\n")
    eph = moving.read_ephemeris(text.encode(), "ref_cat/sso/n.csv")
    pred = moving.predict(eph, 60000.25)
    assert [p[0] for p in pred] == ["(433) Eros"]  # one epoch of 2025 AB brackets nothing
    name, ra, dec, err, rate = pred[0]
    assert abs(ra - 10.005) < 1e-9 and dec == -20.0 and err == 1.0
    assert abs(rate - 0.01 * math.cos(math.radians(20)) * 3600 / 12) < 1e-6
    off = 1.5 / 3600 / math.cos(math.radians(20))
    names = moving.match_known([10.005, 10.005 + off, 10.3], [-20.0, -20.0, -20.0], eph, (60000.25, 60000.25))
    assert list(names) == ["(433) Eros", "", ""]
    with pytest.raises(BadInputError, match=r"lacks column\(s\) err_arcsec") as exc:
        moving.read_ephemeris(b"name,ra,dec,mjd\nx,1,2,3\n", "ref_cat/sso/bad.csv")
    assert "ref_cat/sso/bad.csv" in str(exc.value)


def test_report_links_detections_of_one_object_and_keeps_others_apart():
    def det(stack, cid, mjd, ra, dec, rate, pa, name=None):
        return {"stack": stack, "filter": stack[-1], "id": cid, "mjd": mjd, "ra": ra, "dec": dec, "mag": 18.0,
                "rate_arcsec_h": rate, "pa_deg": pa, "half_span_h": 0.04, "sso_name": name}

    east = 60.0 / 3600 / math.cos(math.radians(-25))  # 60" east
    rows = link_movers([
        det("s_a", 1, 60000.0, 10.0, -25.0, 40.0, 90.0), det("s_b", 4, 60000.0 + 1.5 / 24, 10.0 + east, -25.0, 41.0, 91.0, "X"),
        det("s_a", 2, 60000.0, 10.1, -25.0, 40.0, 270.0),  # same rate, the opposite way: another object
        det("s_a", 3, 60000.0, 10.0, -25.1, 300.0, 10.0), det("s_a", 5, 60000.0, 10.0, -25.1 + 6 / 3600, 290.0, 12.0),
    ])
    assert sorted(len(r["detections"]) for r in rows) == [1, 2, 2]
    pair = next(r for r in rows if r["stacks"] == ["s_a", "s_b"])
    assert pair["name"] == "X" and pair["first"]["mjd"] == 60000.0 and 40 <= pair["rate_arcsec_h"] <= 41
    text = markdown({"unit": "u", "night": "n", "pipeline_version": "0", "root": "/r",
                     "counts": {k: 0 for k in ("science_done", "science_planned", "raw_frames", "stacks_done",
                                               "stacks_planned", "candidates_pass", "candidates", "failures",
                                               "flagged")},
                     "seeing_median": None, "depth": {"frame_median": None, "stack_best": None}, "frames": [],
                     "stacks": [], "candidates": [], "moving": rows, "failures": [], "flagged": [], "warnings": [],
                     "timing": {}})
    assert "## Moving objects" in text and "| X | 40.5 |" in text


# ---- a simulated night through every stage ------------------------------------------------


def _true_movers(root: Path) -> list[dict]:
    """name, rate, PA and a function giving (ra, dec) at an MJD, for the simulator's movers and
    its own asteroid."""
    truth = root / "truth" / UNIT / NIGHT
    out = []
    for r in Table.read(truth / "movers.csv", format="ascii.csv"):
        out.append({"name": str(r["name"]), "rate": float(r["rate_arcsec_h"]), "pa": float(r["pa_deg"]),
                    "at": _linear(float(r["ra_ref"]), float(r["dec_ref"]), float(r["mjd_ref"]),
                                  float(r["rate_arcsec_h"]), float(r["pa_deg"]))})
    ast = json.loads((truth / "transients.json").read_text())["asteroid"]
    p0 = list(ast["positions"].values())[0]
    mjd0 = datetime.fromisoformat(p0["mid_utc"]).timestamp() / 86400.0 + 40587.0
    out.append({"name": "asteroid", "rate": ast["rate_arcsec_per_hour"], "pa": ast["pa_deg"],
                "at": _linear(p0["ra"], p0["dec"], mjd0, ast["rate_arcsec_per_hour"], ast["pa_deg"])})
    return out


def _linear(ra0, dec0, mjd0, rate, pa):
    def at(mjd):
        d = rate * (mjd - mjd0) * 24.0
        return (ra0 + d * math.sin(math.radians(pa)) / 3600 / math.cos(math.radians(dec0)),
                dec0 + d * math.cos(math.radians(pa)) / 3600)
    return at


def _sep(ra1, dec1, ra2, dec2):
    return np.hypot((np.asarray(ra1) - ra2) * np.cos(np.radians(dec2)), np.asarray(dec1) - dec2) * 3600.0


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    from gppy_stage.runner import run_night
    from gppy_stage.sim.night import simulate_night

    root = tmp_path_factory.mktemp("moving") / "root"
    simulate_night(root, unit=UNIT, night=DATE, filters=("m425", "m475"), size="tiny", seed=SEED,
                   movers=MOVERS, filter_gap_s=90 * 60)
    # the ephemeris a survey would fetch for the night: the 30 "/h mover, every 20 minutes
    row = next(r for r in Table.read(root / "truth" / UNIT / NIGHT / "movers.csv", format="ascii.csv")
               if r["name"] == "SIM002")
    t_ref = datetime(1858, 11, 17, tzinfo=timezone.utc) + timedelta(days=float(row["mjd_ref"]))
    mv = sim_movers.Mover(KNOWN, float(row["rate_arcsec_h"]), float(row["pa_deg"]), 0.0, float(row["ra_ref"]),
                          float(row["dec_ref"]), t_ref)
    sso = root / "ref_cat" / "sso" / f"{NIGHT}.csv"
    sso.parent.mkdir(parents=True)
    sso.write_text(sim_movers.ephemeris_csv([mv], [t_ref + timedelta(minutes=20 * k - 20) for k in range(8)]))
    run_night(str(root), UNIT, NIGHT, workers=2, progress=False)
    report = json.loads((root / "runs" / UNIT / NIGHT / "night_report.json").read_text())
    tables = {}
    for s in report["stacks"]:
        t = Table.read(root / s["detect"]["candidates"], format="ascii.ecsv")
        tables[s["id"]] = t
    return root, report, tables


def test_every_mover_flagged_with_its_rate_and_angle(night):
    root, _, tables = night
    found = {}
    for sid, t in tables.items():
        mid = 0.5 * (t.meta["MJDSTART"] + t.meta["MJDEND"])
        half_h = (t.meta["MJDEND"] - t.meta["MJDSTART"]) * 12.0
        for mv in _true_movers(root):
            ra, dec = mv["at"](mid)
            near = t[_sep(t["ra"], t["dec"], ra, dec) < 3.0 + mv["rate"] * half_h]
            for c in near:
                print(f"{sid} {mv['name']:8s} {mv['rate']:6.1f}\"/h PA {mv['pa']:5.1f}: #{c['id']} moving {c['moving']} "
                      f"{c['rate_arcsec_h']:.1f}\"/h PA {c['pa_deg']:.1f} S/N {c['snr']:.1f}")
                # SIM005 in m475: leaving the frame (its truth is off the frame in two of the three
                # frames), S/N 6.3 in the stack: nothing to measure a motion from
                if c["snr"] < MIN_SNR:
                    continue
                assert c["moving"], (sid, mv["name"])
                assert abs(c["rate_arcsec_h"] - mv["rate"]) < 0.2 * mv["rate"]
                assert abs((c["pa_deg"] - mv["pa"] + 180) % 360 - 180) < 15
                found.setdefault(mv["name"], []).append(sid)
    assert sorted(found) == sorted(m["name"] for m in _true_movers(root)), found
    # the slow one only between the stacks: seen in both; the fast one in the first only
    assert len(set(found["SIM001"])) == 2 and set(found["SIM004"]) == {"T10779_m425_7DT01_0"}


def test_static_transient_not_moving(night):
    root, _, tables = night
    tr = json.loads((root / "truth" / UNIT / NIGHT / "transients.json").read_text())["transient"]
    for sid, t in tables.items():
        d = _sep(t["ra"], t["dec"], tr["ra"], tr["dec"])
        c = t[int(np.argmin(d))]
        print(f"{sid} transient: #{c['id']} {d.min():.2f}\" moving {c['moving']} pass {c['pass']}")
        assert d.min() < 1.0 and not c["moving"] and np.isnan(c["rate_arcsec_h"]) and c["pass"]


def test_night_report_has_one_row_per_mover(night):
    root, report, _ = night
    truth = _true_movers(root)
    rows = report["moving"]
    for r in rows:
        print(f"{r['name']}: {r['rate_arcsec_h']}\"/h PA {r['pa_deg']} in {r['stacks']} ({len(r['detections'])} detections)")
    matched = []
    for r in rows:
        ra, dec = r["first"]["ra"], r["first"]["dec"]
        hits = [m["name"] for m in truth if _sep(ra, dec, *m["at"](r["first"]["mjd"])) < 3.0 + 0.05 * m["rate"]
                and abs(r["rate_arcsec_h"] - m["rate"]) < 0.2 * m["rate"]]
        assert len(hits) == 1, r
        matched.append(hits[0])
    assert sorted(matched) == sorted(m["name"] for m in truth)
    md = (root / "runs" / UNIT / NIGHT / "report.md").read_text()
    assert "## Moving objects" in md and md.count("| unknown ") == len(truth) - 1


def test_known_object_named_from_the_ephemeris(night):
    root, report, tables = night
    row = next(r for r in report["moving"] if r["name"] == KNOWN)
    assert abs(row["rate_arcsec_h"] - 30.0) < 6.0 and len(row["stacks"]) == 2
    named = [(sid, int(c["id"])) for sid, t in tables.items() for c in t if c["sso_name"]]
    assert len(named) == 2 and all(t.meta["SSOFILE"] == f"ref_cat/sso/{NIGHT}.csv" for t in tables.values())
    stack = next(s for s in report["stacks"] if s["id"] == "T10779_m425_7DT01_0")
    regions = (root / stack["detect"]["candidates"].replace(".cand.ecsv", ".cand.reg")).read_text()
    assert KNOWN in regions and regions.count(" moving ") >= 4


def test_two_frames_of_one_stack_show_a_shift_of_half_a_fwhm():
    """The manifest night's case: one stack of two frames 103 s apart, an asteroid at 47 "/h moves
    2.7 px there (FWHM 5.9 px): more than "the same place" (0.3 FWHM), so it moves."""
    rng = np.random.default_rng(4)
    stars = rng.uniform(50, 950, (200, 2))
    frames = [(np.r_[stars[:, 0], 500.0 + dx], np.r_[stars[:, 1], 400.0 - dx]) for dx in (0.0, 1.9)]
    fwhm = 5.9
    tr = moving.link_tracks([500.95], [399.05], (0.0, 1.0), frames, [0.0, 1.0], vmax=3 * fwhm, tol=0.5 * fwhm,
                            r0=fwhm, static_tol=0.3 * fwhm, fit_tol=0.25 * fwhm)
    assert tr["moving"][0] and tr["n_points"][0] == 2
    still = moving.link_tracks([500.0], [400.0], (0.0, 1.0), [(f[0][:-1], f[1][:-1]) for f in frames],
                               [0.0, 1.0], vmax=3 * fwhm, tol=0.5 * fwhm, r0=fwhm, static_tol=0.3 * fwhm)
    assert not still["moving"][0]


def _gauss_frames(rng, positions, snr, fwhm=5.1, size=64):
    """Difference cut-outs of unit noise, a Gaussian point source of optimal-extraction S/N
    ``snr`` at each (x, y)."""
    s = fwhm / 2.3548
    yy, xx = np.mgrid[:size, :size]
    flux = snr * math.sqrt(4 * math.pi * s * s)
    return [(flux * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s)) / (2 * math.pi * s * s)
             + rng.normal(0, 1, (size, size)), np.ones((size, size)), np.zeros((size, size), bool))
            for x, y in positions]


def test_centroids_on_frame_cutouts_catch_a_faint_mover_and_leave_a_static_source():
    """S/N 5.8 per frame (10 in a stack of three), FWHM 5.1 px: a 60 "/h mover shifts 5 px a
    frame; a static source's centroids scatter by about 0.5 px and must not read as motion."""
    rng = np.random.default_rng(7)
    fwhm, times = 5.1, np.array([0.0, 103.0, 206.0]) / 86400.0
    flagged, v_err = {"static": 0, "mover": 0}, []
    for _ in range(40):
        for kind, pos in (("static", [(32.0, 32.0)] * 3), ("mover", [(27.0 + 5 * k, 32.0 - 1.5 * k) for k in range(3)])):
            c = np.array([moving.residual_centroid(*f, 32.3, 31.6, fwhm) for f in _gauss_frames(rng, pos, 5.8)])
            moves, vx, vy, x0, y0 = moving.centroid_motion(times, *c.T, times[1], min_motion=0.3 * fwhm)
            flagged[kind] += moves
            if kind == "mover" and moves:
                v_err.append(math.hypot(vx / 86400 * 103 - 5.0, vy / 86400 * 103 + 1.5))  # px per frame
    print(flagged, f"velocity error median {np.median(v_err):.2f}, 90 % {np.percentile(v_err, 90):.2f} px/frame")
    assert flagged["static"] == 0 and flagged["mover"] >= 34
    # the centroids' own scatter (about 0.55 px) allows ~0.45 px/frame per axis on the velocity
    assert np.median(v_err) < 0.9 and np.percentile(v_err, 90) < 1.8
    # nothing there: no centroid, so no motion
    empty = moving.residual_centroid(*_gauss_frames(rng, [(32.0, 32.0)], 0.0)[0], 32.0, 32.0, fwhm)
    assert not np.isfinite(empty[0]) or not moving.centroid_motion(times[:1], [empty[0]], [empty[1]], [empty[2]], 0.0,
                                                                   min_motion=1.0)[0]


def test_mover_specs_parsed_or_refused_by_name():
    from gppy_stage.errors import ConfigError

    assert sim_movers.parse_specs("5:40, 300:-40:snr10,30:130:17.5") == [(5.0, 40.0, None), (300.0, 320.0, "snr10"),
                                                                          (30.0, 130.0, "17.5")]
    for bad in ("5", "5:north", "0:10", "5:10:bright"):
        with pytest.raises(ConfigError, match=f"mover '{bad}'"):
            sim_movers.parse_specs(bad)
