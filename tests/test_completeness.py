"""Completeness every night: artificial stars of the stack's own PSF, injected into a copy,
subtracted and searched again; judged against the stack's 5-sigma depth, which the photometry
stage measured independently (SExtractor's sky noise in its best aperture).

The night is test_stack's (three 100 s m425 frames, shared through ``built_night``), copied so
this module's header rewrite cannot reach the other modules' products.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from gppy_stage.runner import execute
from gppy_stage.science import completeness as cm
from test_stack import NIGHT, STACK_GOOD, UNIT, built_night, plan_of

pytestmark = pytest.mark.slow
CMPL_KEYS = ("CMPL50", "CMPL90", "CMPLHASH")


def _moffat(shape, x0, y0, fwhm, beta):
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    p = (1.0 + ((xx - x0) ** 2 + (yy - y0) ** 2) / alpha**2) ** (-beta)
    return p * (beta - 1.0) / (math.pi * alpha**2)


def test_empirical_psf_is_the_stars_moffat_not_a_gaussian():
    rng = np.random.default_rng(4)
    shape, fwhm, beta = (600, 600), 4.5, 2.5
    img = np.full(shape, 100.0)
    for x, y in rng.uniform(40, 560, (40, 2)):
        img += 2e5 * _moffat(shape, x, y, fwhm, beta)
    img += rng.normal(0, 3.0, shape)
    psf, n, _ = cm.empirical_psf(img.astype(np.float32), np.full(shape, 9.0, np.float32), np.zeros(shape, bool), fwhm=fwhm)
    assert n >= 10
    h = psf.shape[0] // 2
    truth = _moffat(psf.shape, h, h, fwhm, beta)
    truth /= truth.sum()
    # the wings beyond 2.5 FWHM hold a Moffat's 2.7 % of the light (a Gaussian's: 1e-7); each
    # star's sky, taken from a ring just outside the box, takes a fifth of that (0.5 % of the flux)
    ring = np.hypot(*np.mgrid[-h:h + 1, -h:h + 1]) > 2.5 * fwhm
    assert 0.7 < psf[ring].sum() / truth[ring].sum() < 1.1, (psf[ring].sum(), truth[ring].sum())
    assert np.abs(psf - truth).max() < 0.03 * truth.max()


def test_logistic_fit_finds_the_50_and_90_percent_magnitudes():
    rng = np.random.default_rng(2)
    mag = rng.uniform(18, 22, 600)
    p = 0.98 / (1 + np.exp((mag - 20.3) / 0.15))
    fit = cm.fit_completeness(mag, rng.uniform(size=600) < p)
    true50, true90 = (20.3 + 0.15 * math.log(0.98 / level - 1) for level in (0.5, 0.9))
    # 600 draws pin the 50 % point to about 0.03 mag: 0.1 is three of those
    assert abs(fit["cmpl50"] - true50) < 0.1 and abs(fit["cmpl90"] - true90) < 0.15, fit
    assert cm.fit_completeness(mag, np.ones(600, bool))["cmpl50"] is None  # no transition: no number


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stack_digest(path: Path) -> str:
    """The stack's pixels and its headers but for the completeness keys."""
    h = hashlib.sha256()
    with fits.open(path) as hdul:
        for k, hdu in enumerate(hdul):
            head = hdu.header.copy()
            for key in CMPL_KEYS if k == 0 else ():
                head.remove(key, ignore_missing=True)
            h.update(head.tostring().encode())
            h.update(np.ascontiguousarray(hdu.data).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    shared, _ = built_night(str(tmp_path_factory.getbasetemp()))
    root = tmp_path_factory.mktemp("completeness") / "root"
    shutil.copytree(shared, root)
    entry = next(s for s in plan_of(root)["stacks"] if s["id"] == STACK_GOOD)
    stack = root / entry["output"]
    before = {p: _digest(p) for p in (root / "processed").rglob("*") if p.is_file() and p != stack
              and ".completeness." not in p.name}
    stack_before = _stack_digest(stack)
    record = execute("completeness", str(root), UNIT, NIGHT, STACK_GOOD, force=True)
    return root, entry, record, before, stack_before


def test_cmpl50_agrees_with_the_stacks_5_sigma_depth(measured):
    root, entry, record, _, _ = measured
    assert record["status"] == "done", record
    res = record["result"]
    table = json.loads((root / res["products"]["table"]).read_text())
    header = fits.getheader(root / entry["output"])
    depth = float(header["UL5_APER"])  # the photometry stage's 5-sigma depth in its best aperture
    print(f"CMPL50 {table['cmpl50']:.3f} CMPL90 {table['cmpl90']:.3f} UL5_APER {depth:.3f} "
          f"({table['n_recovered']}/{table['n_injected']} found, PSF of {table['psf_stars']} stars, bright "
          f"sources measured {table['mag_offset_bright']:+.3f} mag from their injected magnitudes)")
    assert abs(table["cmpl50"] - depth) < 0.3
    assert table["cmpl90"] < table["cmpl50"] and table["n_injected"] >= 300
    # the artificial stars carry the flux they were given: the search measures them back
    assert abs(table["mag_offset_bright"]) < 0.1
    rows = table["bins"]
    assert sum(r["injected"] for r in rows) == table["n_injected"] and rows[0]["fraction"] >= 0.9
    assert rows[-1]["fraction"] <= 0.1
    assert header["CMPL50"] == table["cmpl50"] and header["CMPL90"] == table["cmpl90"]
    assert (root / res["products"]["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_products_are_not_modified_and_a_rerun_changes_nothing(measured):
    root, entry, record, before, stack_before = measured
    stack = root / entry["output"]
    after = {p: _digest(p) for p in before}
    assert after == before, [str(p) for p in before if after[p] != before[p]]
    assert _stack_digest(stack) == stack_before
    everything = {p: _digest(p) for p in (root / "processed").rglob("*") if p.is_file()}
    again = execute("completeness", str(root), UNIT, NIGHT, STACK_GOOD)
    assert again["status"] == "skipped" and again["result"]["cmpl50"] == record["result"]["cmpl50"], again
    assert {p: _digest(p) for p in everything} == everything
    # nor is the subtraction or the search redone: their skip-if-done reads the stack's sidecar
    for stage in ("subtract", "detect"):
        rec = execute(stage, str(root), UNIT, NIGHT, STACK_GOOD)
        assert rec["status"] == "skipped", (stage, rec)
    assert {p: _digest(p) for p in everything} == everything


def test_the_night_report_shows_cmpl50_and_cmpl90(measured):
    root, _, record, _, _ = measured
    execute("curate", str(root), UNIT, NIGHT)
    rep = json.loads((root / "runs" / UNIT / NIGHT / "night_report.json").read_text())
    stack = next(s for s in rep["stacks"] if s["id"] == STACK_GOOD)
    assert stack["cmpl50"] == record["result"]["cmpl50"] and stack["cmpl90"] == record["result"]["cmpl90"]
    md = (root / "runs" / UNIT / NIGHT / "report.md").read_text()
    assert "| CMPL50 | CMPL90 |" in md and f"{stack['cmpl50']:.2f}" in md
