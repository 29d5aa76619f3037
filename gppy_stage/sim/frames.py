"""What the 7DT and the IMSNG/GECKO night simulators share: the writers (whole files or none), the
true WCS as header cards, the night's asteroid, the host galaxy as a frame shows it, and the raw
frame writer (digitise, the raw FITS, its cosmic-ray truth, its truth entry, the counts, progress).

Each piece draws from the generator it is given in the order the simulators always have, so a
seed gives the same bytes whichever simulator calls it.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from .. import config
from . import detector, render

ASTEROID_SUBEXPOSURES = 5  # the asteroid trails during an exposure: rendered at this many instants


def write_fits(path: Path, data: np.ndarray, header: fits.Header | None = None, compress: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    if compress:
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header)]).writeto(tmp, overwrite=True)
    else:
        fits.PrimaryHDU(data, header=header).writeto(tmp, overwrite=True)
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def write_csv(path: Path, table: Table, formats: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = table.colnames
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in table.iterrows(*cols):
            w.writerow([formats.get(c, "{}").format(v) for c, v in zip(cols, row)])


def wcs_cards(w: WCS) -> dict:
    """The true WCS as plain FITS cards (CD matrix form)."""
    cd = w.wcs.cd
    return {
        "WCSAXES": 2, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg", "CUNIT2": "deg",
        "CRVAL1": float(w.wcs.crval[0]), "CRVAL2": float(w.wcs.crval[1]),
        "CRPIX1": float(w.wcs.crpix[0]), "CRPIX2": float(w.wcs.crpix[1]),
        "CD1_1": float(cd[0, 0]), "CD1_2": float(cd[0, 1]), "CD2_1": float(cd[1, 0]), "CD2_2": float(cd[1, 1]),
        "RADESYS": "ICRS", "EQUINOX": 2000.0,
    }


@dataclass(frozen=True)
class Exposure:
    """A science frame's conditions, drawn from its generator."""

    airmass: float
    jitter: float  # of the zero point
    zp: float
    fwhm: float  # arcsec
    beta: float  # Moffat
    sky_adu: float
    de: float  # arcsec east of the field centre: where the telescope really points
    dn: float
    wcs: WCS
    epoch: float  # Julian year of mid-exposure
    sky_grad: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Asteroid:
    """The night's main-belt asteroid: a straight track through (ra0, dec0) at t_ref."""

    ra0: float
    dec0: float
    rate: float  # arcsec/hour
    pa: float  # radians east of north
    mag_g: float
    t_ref: datetime

    def at(self, when: datetime) -> tuple[float, float]:
        dt_h = (when - self.t_ref).total_seconds() / 3600.0
        d_e, d_n = self.rate * dt_h * math.sin(self.pa), self.rate * dt_h * math.cos(self.pa)
        return self.ra0 + d_e / 3600.0 / math.cos(math.radians(self.dec0)), self.dec0 + d_n / 3600.0

    def truth(self, positions: dict) -> dict:
        return {"rate_arcsec_per_hour": self.rate, "pa_deg": math.degrees(self.pa) % 360.0, "mag_g": self.mag_g,
                "positions": positions}


def trail_asteroid(signal: np.ndarray, wcs: WCS, asteroid: Asteroid, fr, mag: float, zp: float, alpha: float,
                   beta: float) -> dict:
    """Add the asteroid's trail to ``signal`` over frame ``fr``'s exposure; its truth at mid-exposure."""
    n = ASTEROID_SUBEXPOSURES
    for k in range(n):
        when = fr.start + timedelta(seconds=fr.exptime * (k + 0.5) / n)
        axp, ayp = wcs.all_world2pix(*asteroid.at(when), 0)
        render.add_moffat(signal, float(axp), float(ayp), 10 ** (-0.4 * (mag - zp)) / n, alpha, beta)
    a_ra, a_dec = asteroid.at(fr.mid)
    axp, ayp = wcs.all_world2pix(a_ra, a_dec, 0)
    return {"ra": a_ra, "dec": a_dec, "x": float(axp), "y": float(ayp), "mag": mag, "filter": fr.filt,
            "mid_utc": fr.mid.isoformat()}


def add_host(signal: np.ndarray, wcs: WCS, galaxy: dict, mag: float, zp: float, pixscale: float, fwhm_px: float,
             beta: float) -> tuple[float, float]:
    """Render the host galaxy of magnitude ``mag`` into ``signal``; its pixel position."""
    gxp, gyp = wcs.all_world2pix(galaxy["ra"], galaxy["dec"], 0)
    render.render_galaxy(signal, float(gxp), float(gyp), 10 ** (-0.4 * (mag - zp)), galaxy["r_eff_arcsec"] / pixscale,
                         galaxy["sersic_n"], galaxy["axis_ratio"], galaxy["pa_deg"], fwhm_px, beta)
    return float(gxp), float(gyp)


def electrons(expected_adu: np.ndarray, dark_adu: np.ndarray, exptime: float, gain: float) -> np.ndarray:
    """Flat-fielded signal (ADU) plus the dark current, to electrons, in place (a full-size frame is 245 MB)."""
    expected_adu += dark_adu * np.float32(exptime)
    expected_adu *= np.float32(gain)
    return expected_adu


@dataclass
class RawWriter:
    """Writes a night's raw frames one by one and keeps what the truth and the summary list of them."""

    raw_dir: Path
    truth_dir: Path
    bias: np.ndarray
    inst: config.Instrument
    n_frames: int
    progress: Callable[[int, int, str], None] | None = None
    # TCSpy's text header beside each raw frame, and the cosmic rays' hit list in the truth (7DT only)
    tcspy_sidecars: bool = False
    entries: list = dc_field(default_factory=list)
    files: list = dc_field(default_factory=list)
    counts: dict = dc_field(default_factory=dict)

    def write(self, name: str, imagetyp: str, rng: np.random.Generator, cosmic: tuple,
              expected_e: Callable[[], np.ndarray | None], header: Callable[[], fits.Header], entry: dict) -> None:
        """Digitise ``expected_e()`` (electrons; None for a bias) with the ``cosmic`` rays
        (detector.cosmic_rays' triple), then draw the header. Both are callables so that the
        expected frame is freed as soon as it is digitised, and rng's draws keep their order."""
        cr_idx, cr_val, hits = cosmic
        inst = self.inst
        raw = detector.digitise(expected_e(), self.bias, inst.gain, inst.rdnoise, rng, (cr_idx, cr_val),
                                inst.saturation)
        stem = Path(name).stem
        path = self.raw_dir / name
        write_fits(path, raw, header())
        if self.tcspy_sidecars:
            (self.raw_dir / (stem + ".head")).write_text(fits.getheader(path).tostring(sep="\n"))
        write_fits(self.truth_dir / "crmask" / f"{stem}.fits", detector.cr_mask(raw.shape, cr_idx), compress=True)
        if self.tcspy_sidecars:
            write_json(self.truth_dir / "crhits" / f"{stem}.json", hits)
        entry["n_cosmic_rays"] = len(hits)
        self.entries.append(entry)
        self.files.append(str(path))
        self.counts[imagetyp] = self.counts.get(imagetyp, 0) + 1
        if self.progress:
            self.progress(len(self.files), self.n_frames, name)


def run_night(sim, progress: Callable[[int, int, str], None] | None, reference: bool) -> dict:
    """Run a night simulator's phases (night.py's and imsng.py's have the same ones) in the order
    the files have always been drawn in: the sky, the field's objects, the night's conditions, the
    detector, the raw frames, the truth, the references; the night's summary."""
    sim.sky()
    sim.field_objects()
    sim.conditions()
    sim.detector_maps()
    writer = sim.write_frames(progress)
    sim.write_truth(writer)
    summary = sim.summary(writer, sim.references() if reference else {})
    sim.write_night_truth(summary)
    return summary
