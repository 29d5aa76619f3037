"""An IMSNG/GECKO night's exposures (biases and darks in the afternoon, dusk flats, the science
frames around the field's transit), its night folder and file names, and the header MaxIm DL
writes: no WCS, no MJD, whole-second DATE-OBS, the pointing the site's way."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from astropy.io import fits

from .. import config
from ..errors import ConfigError
from . import model
from .sites import FIELDS, SiteSim

N_BIAS, N_DARK, N_FLATS = 5, 5, 5  # a master needs 5 (pipeline.yaml min_frames)
FLAT_TARGET_ADU = 25000.0


@dataclass
class Frame:
    imagetyp: str  # BIAS DARK FLAT LIGHT
    filt: str | None
    exptime: float
    start: datetime
    seq: int
    level: float = 0.0

    @property
    def mid(self) -> datetime:
        return self.start + timedelta(seconds=self.exptime / 2)


def plan_frames(obs: str, site: SiteSim, night: str, filters, n_science: int, seed: int) -> list[Frame]:
    """Biases and darks in the afternoon, dusk flats, then the science frames around transit."""
    rng = model.rng_for(seed, obs, night, "plan")
    day = datetime.fromisoformat(night).replace(tzinfo=timezone.utc)
    local_noon = day + timedelta(hours=12 - site.utc_offset_h)
    t = local_noon + timedelta(hours=4)
    frames: list[Frame] = []
    for k in range(N_BIAS):
        frames.append(Frame("BIAS", None, 0.0, t, k + 1))
        t += timedelta(seconds=4 + rng.uniform(0, 1))
    for k in range(N_DARK):
        frames.append(Frame("DARK", None, site.exptime, t, k + 1))
        t += timedelta(seconds=site.exptime + 4 + rng.uniform(0, 1))
    t = local_noon + timedelta(hours=6, minutes=20)  # sunset at ~18:00 local: flats from dusk
    for filt in filters:
        for k in range(N_FLATS):
            level = FLAT_TARGET_ADU * rng.uniform(0.8, 1.2)
            frames.append(Frame("FLAT", filt, float(round(rng.uniform(2.0, 8.0), 1)), t, k + 1, level))
            t += timedelta(seconds=20 + rng.uniform(0, 2))
        t += timedelta(seconds=30)
    ra, _ = FIELDS[site.field]
    jd = model.julian_date(local_noon)
    transit = local_noon + timedelta(seconds=((ra - model.lst_deg(jd, site.lon)) % 360.0) / 360.0 * 86164.1)
    duration = len(filters) * n_science * (site.exptime + 10)
    start = min(max(transit - timedelta(seconds=duration / 2), local_noon + timedelta(hours=7, minutes=30)),
                local_noon + timedelta(hours=17))
    t = start
    for filt in filters:
        for k in range(n_science):
            frames.append(Frame("LIGHT", filt, site.exptime, t, k + 1))
            t += timedelta(seconds=site.exptime + 8 + rng.uniform(0, 1))
        t += timedelta(seconds=30)
    for f in frames:  # MaxIm writes whole seconds
        f.start = f.start.replace(microsecond=0)
    return frames


def night_folder(obs: str, night: str) -> str:
    pattern = config.site(obs).night_folder
    d = datetime.fromisoformat(night)
    fmt = {"YYYY_MMDD": "%Y_%m%d", "YYYYMMDD": "%Y%m%d", "YYYY-MM-DD": "%Y-%m-%d"}.get(pattern)
    if fmt is None:
        raise ConfigError(f"{obs}'s night folder pattern {pattern!r} is not an IMSNG/GECKO one")
    return d.strftime(fmt)


def file_name(obs: str, site: SiteSim, fr: Frame, index: int) -> str:
    if site.file_names == "autosave":
        return f"image.{index:03d}.fits"
    if fr.imagetyp == "LIGHT":
        return f"{obs}_{site.field}_{fr.filt}_{fr.exptime:g}s_{fr.seq:03d}.fit"
    what = {"BIAS": "bias", "DARK": f"dark_{fr.exptime:g}s", "FLAT": f"skyflat_{fr.filt}"}[fr.imagetyp]
    return f"{obs}_{what}_{fr.seq:03d}.fit"


MAXIM_TYPES = {"BIAS": "Bias Frame", "DARK": "Dark Frame", "FLAT": "Flat Field", "LIGHT": "Light Frame"}


def maxim_header(obs: str, site: SiteSim, inst: config.Instrument, fr: Frame, pointing: tuple[float, float] | None,
                 airmass: float | None, ccd_temp: float) -> fits.Header:
    """A MaxIm DL header: no WCS, no MJD, whole-second DATE-OBS, the pointing the site's way."""
    local = fr.start + timedelta(hours=site.utc_offset_h)
    h = fits.Header()
    cards = [
        ("IMAGETYP", MAXIM_TYPES[fr.imagetyp], "Type of image"),
        ("EXPTIME", fr.exptime, "[s] Exposure time"),
        ("EXPOSURE", fr.exptime, "[s] Exposure time"),
        ("DATE-OBS", fr.start.strftime("%Y-%m-%dT%H:%M:%S"), "[ISO 8601] UTC start of exposure"),
        ("DATE-LOC", local.strftime("%Y-%m-%dT%H:%M:%S"), "Local start of exposure"),
        ("JD", round(model.julian_date(fr.start), 6), "Julian date of exposure start"),
        ("XBINNING", 1, "Binning factor in width"),
        ("YBINNING", 1, "Binning factor in height"),
        ("XPIXSZ", 9.0, "[um] Pixel width incl. binning"),
        ("CCD-TEMP", ccd_temp, "[C] CCD temperature"),
        ("SET-TEMP", -30.0, "[C] CCD set point"),
        ("EGAIN", inst.gain, "[e-/ADU] Electronic gain"),
        ("INSTRUME", inst.camera, "Camera"),
        ("TELESCOP", site.telescope, "Telescope"),
        ("SITELAT", f"{site.lat:+.4f}", "Site latitude"),
        ("SITELONG", f"{site.lon:+.4f}", "Site longitude"),
        ("SWCREATE", "MaxIm DL Version 6.13 (gppy-stage simulator)", "Software"),
    ]
    if fr.filt is not None:
        cards.append(("FILTER", fr.filt, "Filter"))
    if fr.imagetyp == "LIGHT":
        cards.append(("OBJECT", site.field, "Target"))
        if airmass is not None:
            cards.append(("AIRMASS", round(airmass, 4), "Airmass at exposure start"))
    elif fr.imagetyp == "FLAT":
        cards.append(("OBJECT", "skyflat", "Target"))
    if pointing is not None and site.pointing == "sexagesimal":
        ra_s, dec_s = model.sexagesimal(*pointing)
        cards += [("OBJCTRA", ra_s.replace(":", " "), "[hms J2000] Target right ascension"),
                  ("OBJCTDEC", dec_s.replace(":", " "), "[dms J2000] Target declination")]
    elif pointing is not None and site.pointing == "degrees":
        cards += [("RA", round(pointing[0], 5), "[deg] Telescope right ascension"),
                  ("DEC", round(pointing[1], 5), "[deg] Telescope declination")]
    for k, v, c in cards:
        h[k] = (v, c)
    return h
