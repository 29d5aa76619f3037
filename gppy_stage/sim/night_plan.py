"""The 7DT night's exposures (dusk flats, biases, darks, then the science frames around the
field's transit) and the TCSpy header each raw frame gets: pointing only, no WCS."""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import datetime, timedelta, timezone

from astropy.io import fits

from .. import config
from . import model

N_FLATS, N_BIAS, N_DARK = 5, 9, 9
DARK_EXPTIME = 100.0
SCIENCE_EXPTIME = 100.0
FLAT_TARGET_ADU = 30000.0
TWILIGHT_TAU_S = 300.0  # e-folding time of the twilight sky brightness


@dataclass
class Frame:
    imagetyp: str
    filt: str
    exptime: float
    start: datetime
    seq: int
    extra: dict = dc_field(default_factory=dict)

    @property
    def obj(self) -> str:
        return self.extra.get("object", self.imagetyp if self.imagetyp != "LIGHT" else "")

    @property
    def mid(self) -> datetime:
        return self.start + timedelta(seconds=self.exptime / 2)


def _transit_utc(ra: float, day: datetime) -> datetime:
    """The first transit of ra after `day` (UTC)."""
    jd = model.julian_date(day)
    dha = (ra - model.lst_deg(jd)) % 360.0
    return day + timedelta(seconds=dha / 360.0 * 86164.1)


def plan_night(unit: str, night: str, filters: tuple[str, ...], calib: tuple[str, ...], n_science: int,
               field: str, seed: int, filter_gap_s: float = 30.0) -> list[Frame]:
    """The night's exposures in time order: dusk flats, biases, darks, then science frames."""
    rng = model.rng_for(seed, unit, night, "plan")
    day = datetime.fromisoformat(night).replace(tzinfo=timezone.utc)
    # January sunset at El Sauce is ~23:50 UTC: flats from 23:35 UTC, biases and darks after dusk
    t = day + timedelta(hours=23, minutes=35)
    frames: list[Frame] = []
    if "flat" in calib:
        for filt in filters:
            rate0 = FLAT_TARGET_ADU / rng.uniform(0.5, 2.0)
            t0 = t
            for k in range(N_FLATS):
                rate = rate0 * math.exp(-(t - t0).total_seconds() / TWILIGHT_TAU_S)
                target = FLAT_TARGET_ADU * rng.uniform(0.85, 1.15)
                exptime = float(min(20.0, max(0.1, round(target / rate, 1))))
                level = rate * TWILIGHT_TAU_S * (1.0 - math.exp(-exptime / TWILIGHT_TAU_S))
                frames.append(Frame("FLAT", filt, exptime, t, k + 1, {"level": level}))
                # readout plus TCSpy's exposure estimate between flats
                t += timedelta(seconds=exptime + model.READOUT_S + 15.0 + rng.uniform(0, 2))
            t += timedelta(seconds=40)  # filter change, re-pointing
    else:
        t = day + timedelta(hours=23, minutes=50)
    t += timedelta(minutes=10)
    for kind, n, exptime in (("BIAS", N_BIAS, 0.0), ("DARK", N_DARK, DARK_EXPTIME)):
        if kind.lower() not in calib:
            continue
        for k in range(n):
            frames.append(Frame(kind, filters[0], exptime, t, k + 1))
            t += timedelta(seconds=exptime + model.READOUT_S + rng.uniform(0, 0.5))
    ra, _ = model.field_center(field)
    duration = len(filters) * n_science * (SCIENCE_EXPTIME + model.READOUT_S + 0.5)
    transit = _transit_utc(ra, day + timedelta(hours=12))
    start = max(t + timedelta(minutes=5), transit - timedelta(seconds=duration / 2),
                day + timedelta(days=1, minutes=40))
    start = min(start, day + timedelta(days=1, hours=7))
    t = start
    for filt in filters:
        for k in range(n_science):
            frames.append(Frame("LIGHT", filt, SCIENCE_EXPTIME, t, k + 1, {"object": field}))
            t += timedelta(seconds=SCIENCE_EXPTIME + model.READOUT_S + rng.uniform(0, 0.5))
        t += timedelta(seconds=filter_gap_s)  # filter change (a longer gap spaces the stacks for slow movers)
    # drop sub-second parts below a millisecond so DATE-OBS text and the file name agree
    for f in frames:
        f.start = f.start.replace(microsecond=(f.start.microsecond // 1000) * 1000)
    return frames


def raw_header(frame: Frame, unit: str, inst: config.Instrument, ra: float, dec: float, horiz: model.Horizontal,
               weather: dict) -> fits.Header:
    """A TCSpy-style raw header: pointing only, no WCS."""
    local = frame.start + timedelta(hours=model.LOCAL_UTC_OFFSET_H)
    jd = model.julian_date(frame.start)
    objra, objdec = model.sexagesimal(ra, dec)
    h = fits.Header()
    cards = [
        ("IMAGETYP", frame.imagetyp, "Type of image"),
        ("EXPTIME", frame.exptime, "[s] Exposure time"),
        ("EXPOSURE", frame.exptime, "[s] Exposure time"),
        ("DATE-OBS", frame.start.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3], "UTC start of exposure"),
        ("DATE-LOC", local.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3], "Local start of exposure"),
        ("JD", round(jd, 8), "Julian date of exposure start"),
        ("MJD", round(jd - 2400000.5, 8), "Modified Julian date of exposure start"),
        ("XBINNING", 1, "Binning in x"),
        ("YBINNING", 1, "Binning in y"),
        ("FILTER", frame.filt, "Filter"),
        ("INSTRUME", "Moravian C3-61000 Pro", "Camera"),
        ("GAIN", 2750, "Camera gain setting"),
        ("EGAIN", inst.gain, "[e-/ADU] Electronic gain"),
        ("CCD-TEMP", weather["ccd_temp"], "[C] Sensor temperature"),
        ("SET-TEMP", -10.0, "[C] Cooler set point"),
        ("XPIXSZ", model.PIXEL_UM, "[um] Pixel size in x"),
        ("YPIXSZ", model.PIXEL_UM, "[um] Pixel size in y"),
        ("TELESCOP", unit, "Telescope unit"),
        ("FOCALLEN", 1537.0, "[mm] Focal length"),
        ("RA", round(ra, 6), "[deg] Mount right ascension"),
        ("DEC", round(dec, 6), "[deg] Mount declination"),
        ("ALTITUDE", round(horiz.alt, 4), "[deg] Mount altitude"),
        ("AZIMUTH", round(horiz.az, 4), "[deg] Mount azimuth"),
        ("AIRMASS", round(horiz.airmass, 4), "Airmass at exposure start"),
        ("OBJECT", frame.obj, "Target name"),
        ("OBJCTRA", objra, "Target right ascension"),
        ("OBJCTDEC", objdec, "Target declination"),
        ("IS_TOO", False, "Target of opportunity"),
        ("OBSERVAT", "El Sauce", "Observatory"),
        ("SITELAT", model.SITE_LAT, "[deg] Site latitude"),
        ("SITELONG", model.SITE_LON, "[deg] Site longitude"),
        ("SITEELEV", model.SITE_HEIGHT, "[m] Site elevation"),
        ("AMBTEMP", weather["ambtemp"], "[C] Ambient temperature"),
        ("HUMIDITY", weather["humidity"], "[%] Relative humidity"),
        ("PRESSURE", weather["pressure"], "[hPa] Air pressure"),
        ("WINDSPD", weather["windspd"], "[m/s] Wind speed"),
        ("SKYTEMP", weather["skytemp"], "[C] Sky temperature"),
        ("SKYFWHM", weather["skyfwhm"], "[arcsec] Seeing monitor FWHM"),
        ("SWCREATE", "TCSpy (gppy-stage simulator)", "Software"),
    ]
    for k, v, c in cards:
        h[k] = (v, c)
    return h
