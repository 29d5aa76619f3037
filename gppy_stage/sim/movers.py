"""Solar-system movers for ``simulate_night``: several objects on straight tracks, with truth.

A mover is given as ``rate:pa[:mag]`` (arcsec/h, degrees east of north, an SDSS-g-like
magnitude; ``snrN`` instead of a magnitude asks for a point-source S/N of N in a stack of the
night's ``n_science`` frames of a filter). Each is rendered as a trail (sub-exposures half a FWHM
apart), so a fast one is as elongated as a real one. Positions are linear in time on the sky's
tangent plane at the field, which is what the pipeline's moving-object fit assumes over a night.

Truth: ``truth/<unit>/<night>/movers.csv`` (one row per mover: name, rate, PA, magnitude, its
position at the reference time) and ``movers_frames.csv`` (one row per mover and science frame:
the position and time at mid-exposure, the magnitude in that filter).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from . import model, render

# a mover's colour (g - r like): an S-type asteroid's
MOVER_BP_RP = 0.85
# the detect stage's S/N on a stack's difference over the ideal one below (reference noise,
# correlated noise, a Moffat PSF's wings): 0.65 on the tiny simulated mover night of
# tests/test_moving.py (7.7 and 7.9 measured in its two stacks for an ideal 12)
DETECT_EFFICIENCY = 0.65


@dataclass
class Mover:
    name: str
    rate: float  # arcsec/h
    pa: float  # deg east of north
    mag_g: float
    ra0: float  # position at t_ref
    dec0: float
    t_ref: datetime

    def at(self, when: datetime) -> tuple[float, float]:
        dt_h = (when - self.t_ref).total_seconds() / 3600.0
        d_e = self.rate * dt_h * math.sin(math.radians(self.pa))
        d_n = self.rate * dt_h * math.cos(math.radians(self.pa))
        return self.ra0 + d_e / 3600.0 / math.cos(math.radians(self.dec0)), self.dec0 + d_n / 3600.0


def parse_specs(text: str) -> list[tuple[float, float, str | None]]:
    """``"5:40,300:250:17.5,100:120:snr10"`` -> [(rate, pa, mag or "snrN" or None), ...]."""
    specs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        bits = part.split(":")
        try:
            if len(bits) not in (2, 3):
                raise ValueError
            rate, pa = float(bits[0]), float(bits[1])
            mag = bits[2].strip() if len(bits) == 3 else None
            if mag is not None and not mag.lower().startswith("snr"):
                float(mag)
            elif mag is not None:
                float(mag[3:])
        except ValueError:
            raise ConfigError(f"mover {part!r}: expected RATE:PA or RATE:PA:MAG or RATE:PA:snrN "
                              "(arcsec/h, deg E of N)") from None
        if not 0 < rate <= 3600:
            raise ConfigError(f"mover {part!r}: rate must be in (0, 3600] arcsec/h")
        specs.append((rate, pa % 360.0, mag))
    return specs


def mag_for_snr(snr: float, filt: str, n_frames: int, fwhm_arcsec: float, pixscale: float, gain: float,
                rdnoise: float, exptime: float, airmass: float = 1.2) -> float:
    """The g magnitude of a point source the detect stage sees at S/N ``snr`` in a stack of
    ``n_frames`` in ``filt`` (optimal extraction of a Gaussian PSF, effective area 4 pi sigma^2,
    on the simulator's sky, scaled by ``DETECT_EFFICIENCY``)."""
    zp = model.frame_zp(filt, exptime, airmass)
    sky_zp = model.ZP100[filt] + 2.5 * math.log10(exptime / 100.0)
    sky_e = 10 ** (-0.4 * (model.sky_surface_brightness(filt) - sky_zp)) * pixscale**2 * gain
    area = 4 * math.pi * (fwhm_arcsec / pixscale / 2.3548) ** 2
    s = snr / DETECT_EFFICIENCY / math.sqrt(n_frames)  # ideal, per frame
    bg = area * (sky_e + rdnoise**2)
    flux_e = 0.5 * (s * s + math.sqrt(s**4 + 4 * s * s * bg))  # F = s sqrt(F + bg)
    m_filt = zp - 2.5 * math.log10(flux_e / gain)
    return float(m_filt - (float(model.sed_mag(0.0, MOVER_BP_RP, filt))))


def place(specs, rng: np.random.Generator, wcs_offsets, frame_arcsec: tuple[float, float], t_ref: datetime,
          t_end: datetime, mag_of_snr) -> list[Mover]:
    """Movers whose tracks start inside the frame's central part and stay in it as long as they
    can: a slow track is centred on its start, a fast one starts near the edge it moves away from.
    ``wcs_offsets`` maps arcsec offsets (1-based pixels of 1") to the sky; ``mag_of_snr(snr)``."""
    span_h = max((t_end - t_ref).total_seconds() / 3600.0, 1e-6)
    w, h = frame_arcsec
    # one cell of a 3 x 3 grid each (the host galaxy's, north-east, left out), so no two
    # movers start on top of each other
    cells = [(e, n) for n in (-0.2, 0.0, 0.2) for e in (-0.2, 0.0, 0.2) if (e, n) != (0.2, 0.2)]
    order = rng.permutation(len(cells))
    out = []
    for k, (rate, pa, mag) in enumerate(specs):
        ue, un = math.sin(math.radians(pa)), math.cos(math.radians(pa))
        # how far the track can run inside 70 % of the frame along its direction
        room = 0.7 / max(abs(ue) / w + abs(un) / h, 1e-9)
        back = min(rate * span_h, room) / 2
        ce, cn = cells[int(order[k % len(cells)])]
        cx, cy = float((ce + rng.uniform(-0.04, 0.04)) * w), float((cn + rng.uniform(-0.04, 0.04)) * h)
        x0, y0 = cx - back * ue, cy - back * un  # east, north offsets; east is -x of the offsets WCS
        ra0, dec0 = (float(v) for v in wcs_offsets.wcs_pix2world(1 - x0, 1 + y0, 1))
        if mag is None:
            mag_g = float(rng.uniform(16.5, 17.5))
        elif str(mag).lower().startswith("snr"):
            mag_g = mag_of_snr(float(str(mag)[3:]))
        else:
            mag_g = float(mag)
        out.append(Mover(f"SIM{k + 1:03d}", rate, pa, mag_g, ra0, dec0, t_ref))
    return out


def render_frame(signal: np.ndarray, wcs, start: datetime, exptime: float, filt: str, zp: float, movers: list[Mover],
                 alpha: float, beta: float, fwhm_px: float, pixscale: float) -> list[dict]:
    """Add every mover's trail to ``signal`` in place; their mid-exposure truth rows."""
    rows = []
    mid = start + timedelta(seconds=exptime / 2)
    for mv in movers:
        mag = float(model.sed_mag(mv.mag_g, MOVER_BP_RP, filt))
        flux = 10 ** (-0.4 * (mag - zp))
        trail_px = mv.rate * exptime / 3600.0 / pixscale
        n = max(5, int(math.ceil(trail_px / (0.5 * fwhm_px))))
        for k in range(n):
            x, y = wcs.all_world2pix(*mv.at(start + timedelta(seconds=exptime * (k + 0.5) / n)), 0)
            render.add_moffat(signal, float(x), float(y), flux / n, alpha, beta)
        ra, dec = mv.at(mid)
        x, y = wcs.all_world2pix(ra, dec, 0)
        rows.append({"name": mv.name, "mjd": model.julian_date(mid) - 2400000.5, "ra": ra, "dec": dec,
                     "x": float(x), "y": float(y), "mag": mag, "filter": filt})
    return rows


def write_truth(truth_dir: Path, movers: list[Mover], frame_rows: list[dict]) -> None:
    truth_dir.mkdir(parents=True, exist_ok=True)
    with open(truth_dir / "movers.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "rate_arcsec_h", "pa_deg", "mag_g", "ra_ref", "dec_ref", "mjd_ref"])
        for mv in movers:
            w.writerow([mv.name, f"{mv.rate:.4f}", f"{mv.pa:.3f}", f"{mv.mag_g:.3f}", f"{mv.ra0:.8f}",
                        f"{mv.dec0:.8f}", f"{model.julian_date(mv.t_ref) - 2400000.5:.8f}"])
    with open(truth_dir / "movers_frames.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        cols = ["name", "frame", "filter", "mjd", "ra", "dec", "x", "y", "mag"]
        w.writerow(cols)
        for r in frame_rows:
            w.writerow([r["name"], r["frame"], r["filter"], f"{r['mjd']:.8f}", f"{r['ra']:.8f}", f"{r['dec']:.8f}",
                        f"{r['x']:.3f}", f"{r['y']:.3f}", f"{r['mag']:.3f}"])


def ephemeris_csv(movers: list[Mover], times: list[datetime], err_arcsec: float = 2.0) -> str:
    """An ``ref_cat/sso/<night>.csv`` for these movers (name, ra, dec, mjd, err_arcsec): what an
    ephemeris service would predict, sampled at ``times``."""
    lines = ["name,ra,dec,mjd,err_arcsec"]
    for mv in movers:
        for t in times:
            ra, dec = mv.at(t)
            lines.append(f"{mv.name},{ra:.8f},{dec:.8f},{model.julian_date(t) - 2400000.5:.8f},{err_arcsec:g}")
    return "\n".join(lines) + "\n"
