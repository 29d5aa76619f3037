"""simulate_night: a raw 7DT night folder, its reference catalogue and frame, and the truth.

Everything random comes from generators seeded by (seed, unit, night, what), so the same
arguments give byte-identical files, and the detector maps and the sky do not depend on the night.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from .. import config, names
from ..errors import ConfigError
from . import lightcurve
from . import catalog, detector, model, movers as movers_mod, render

SIZES = {"small": (1024, 1536), "tiny": (512, 768)}  # rows, columns; "full" comes from the instrument registry
CATALOGUE_MARGIN_DEG = 5.0 / 60.0
REF_MARGIN_PX = 128
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


def frame_shape(size: str, unit: str) -> tuple[int, int]:
    if size == "full":
        return config.instrument(unit).shape
    if size in SIZES:
        return SIZES[size]
    raise ConfigError(f"unknown size {size!r} (small, tiny or full)")


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


def _write_fits(path: Path, data: np.ndarray, header: fits.Header | None = None, compress: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    if compress:
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header)]).writeto(tmp, overwrite=True)
    else:
        fits.PrimaryHDU(data, header=header).writeto(tmp, overwrite=True)
    tmp.replace(path)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _write_csv(path: Path, table: Table, formats: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = table.colnames
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in table.iterrows(*cols):
            w.writerow([formats.get(c, "{}").format(v) for c, v in zip(cols, row)])


def simulate_night(out: str | Path, unit: str = "7DT01", night: str = "2025-01-01",
                   filters: tuple[str, ...] | list[str] = ("m425", "m475"), size: str = "small", seed: int = 0,
                   calib: tuple[str, ...] | list[str] = ("bias", "dark", "flat"), n_science: int = 3,
                   field: str = "T10779", reference: bool = True, movers: str | list | None = None,
                   filter_gap_s: float = 30.0,
                   transient_lc: lightcurve.LightCurve | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Write a raw 7DT night under out/ (laid out as the pipeline's storage root) plus its truth.

    progress, when given, is called as progress(done, total, file_name) after each raw frame.
    ``movers`` (``sim.movers.parse_specs``'s text or its list) adds solar-system movers with their truth;
    ``filter_gap_s`` is the time between one filter's frames and the next's.
    Returns a JSON-able summary (night folder, counts, paths)."""
    out = Path(out)
    filters = tuple(model.check_filter(f) for f in filters)
    if not filters:
        raise ConfigError("simulate_night needs at least one filter")
    calib = tuple(c.lower() for c in calib)
    unknown = set(calib) - {"bias", "dark", "flat"}
    if unknown:
        raise ConfigError(f"unknown calibration kinds {sorted(unknown)} (bias, dark, flat)")
    try:
        datetime.fromisoformat(night)
    except ValueError:
        raise ConfigError(f"night must be YYYY-MM-DD, got {night!r}") from None
    ra0, dec0 = model.field_center(field)
    inst = config.instrument(unit)
    gain, rdnoise = inst.gain, inst.rdnoise
    dark_e = inst.dark if inst.dark is not None else 0.01
    pixscale = inst.pixscale
    shape = frame_shape(size, unit)
    ny, nx = shape

    frames = plan_night(unit, night, filters, calib, n_science, field, seed, filter_gap_s)
    night_dir = names.night_folder(frames[0].start)
    assert night_dir == f"{night}_gain2750", night_dir  # the plan keeps every frame in its night
    raw_dir = out / "obsdata" / unit / night_dir
    truth_dir = out / "truth" / unit / night_dir

    # ---- the sky of the field (night- and unit-independent)
    half = (nx * pixscale / 7200.0 + CATALOGUE_MARGIN_DEG, ny * pixscale / 7200.0 + CATALOGUE_MARGIN_DEG)
    boost = {"small": 4.0, "tiny": 16.0}.get(size, 1.0)  # frames smaller than full get denser fields
    stars, tycho_used = catalog.star_field(ra0, dec0, half, seed, field, boost=boost)
    refcat = catalog.reference_catalogue(stars, seed, field)
    refcat_path = out / "ref_cat" / f"gaiaxp_dr3_synphot_{field}.csv"
    fmt = {c: "{:.6f}" for c in refcat.colnames} | {"source_id": "{:d}", "ra": "{:.9f}", "dec": "{:.9f}"}
    _write_csv(refcat_path, refcat, fmt)
    _write_csv(truth_dir / "stars.csv", stars, fmt | {"tycho2": "{:d}"})

    # host galaxy and its new transient belong to the field; the asteroid to the night
    frng = model.rng_for(seed, "objects", field)
    offsets = catalog.tangent_wcs(ra0, dec0, 1.0, (1, 1))
    gx_off = (-0.35 * nx * pixscale / 2, 0.35 * ny * pixscale / 2)  # arcsec, inside the frame
    g_ra, g_dec = (float(v) for v in offsets.wcs_pix2world(1 + gx_off[0], 1 + gx_off[1], 1))
    galaxy = {"ra": g_ra, "dec": g_dec, "mag_g": float(frng.uniform(13.8, 14.3)), "bp_rp": 1.0,
              "r_eff_arcsec": float(frng.uniform(5.0, 8.0)), "sersic_n": 1.0,
              "axis_ratio": float(frng.uniform(0.45, 0.7)), "pa_deg": float(frng.uniform(0, 180))}
    sep = float(frng.uniform(1.5, 2.5))
    ang = float(frng.uniform(0, 2 * math.pi))
    t_dra, t_ddec = sep * math.sin(ang), sep * math.cos(ang)
    tr_g = float(frng.uniform(17.0, 17.8))
    transient = {"ra": g_ra + t_dra / 3600.0 / math.cos(math.radians(g_dec)), "dec": g_dec + t_ddec / 3600.0,
                 "host_offset_arcsec": sep, "host_offset_east_arcsec": t_dra, "host_offset_north_arcsec": t_ddec,
                 "mag": {f: float(model.sed_mag(tr_g, 0.1, f)) for f in filters}}
    nrng = model.rng_for(seed, unit, night, "night")
    ast_rate = float(nrng.uniform(25.0, 60.0))  # arcsec/hour
    ast_pa = float(nrng.uniform(0, 2 * math.pi))
    ast_g = float(nrng.uniform(17.0, 17.8))
    sci = [f for f in frames if f.imagetyp == "LIGHT"]
    t_ref = sci[0].mid if sci else frames[0].start
    a_x0, a_y0 = (float(v) for v in (nrng.uniform(-0.25, 0.25) * nx * pixscale, nrng.uniform(-0.25, 0.25) * ny * pixscale))
    a_ra0, a_dec0 = (float(v) for v in offsets.wcs_pix2world(1 + a_x0, 1 + a_y0, 1))
    movers = movers_mod.parse_specs(movers) if isinstance(movers, str) else list(movers or [])
    if movers:  # their own generator: a night without movers draws exactly what it did before
        movers = movers_mod.place(
            movers, model.rng_for(seed, unit, night, "movers"), offsets, (nx * pixscale, ny * pixscale), t_ref,
            sci[-1].mid if sci else t_ref, lambda snr: movers_mod.mag_for_snr(snr, filters[0], n_science, 2.6, pixscale, gain, rdnoise,
                                                            SCIENCE_EXPTIME))
    mover_rows: list[dict] = []

    def asteroid_at(when: datetime) -> tuple[float, float]:
        dt_h = (when - t_ref).total_seconds() / 3600.0
        d_e, d_n = ast_rate * dt_h * math.sin(ast_pa), ast_rate * dt_h * math.cos(ast_pa)
        return a_ra0 + d_e / 3600.0 / math.cos(math.radians(a_dec0)), a_dec0 + d_n / 3600.0

    # ---- per-night conditions and the unit's camera rotation
    seeing0 = float(nrng.uniform(2.3, 2.9))
    point_mag = float(nrng.uniform(15.0, 45.0))
    point_ang = float(nrng.uniform(0, 2 * math.pi))
    urng = model.rng_for(seed, unit, "mount")
    rot_deg = float(urng.uniform(-1.0, 1.0))
    weather = {"ambtemp": round(float(nrng.uniform(14, 20)), 1), "humidity": round(float(nrng.uniform(20, 50)), 1),
               "pressure": round(float(nrng.uniform(835, 845)), 1), "windspd": round(float(nrng.uniform(0, 8)), 1),
               "skytemp": round(float(nrng.uniform(-35, -25)), 1)}

    # ---- detector maps (unit- and seed-dependent only)
    bias = detector.bias_pattern(shape, unit, seed)
    dark_adu, hot = detector.dark_rate(shape, unit, seed, dark_e, gain)
    _write_fits(truth_dir / "bias.fits", bias)
    _write_fits(truth_dir / "dark_rate.fits", dark_adu)
    flats: dict[str, np.ndarray] = {}

    def flat_of(filt: str) -> np.ndarray:
        if filt not in flats:
            flats.clear()  # one at a time: a full-size flat is 245 MB
            flats[filt] = detector.true_flat(shape, unit, seed, filt)
        return flats[filt]

    for filt in filters:
        _write_fits(truth_dir / f"flat_{filt}.fits", flat_of(filt))

    # ---- the frames
    entries, asteroid_track, counts = [], {}, {}
    files = []
    seqs: dict[tuple, int] = {}
    for i, fr in enumerate(frames):
        key = (fr.obj, fr.filt)
        seqs[key] = seqs.get(key, 0) + 1
        name = names.raw_name(unit, fr.start, fr.obj, fr.filt, 1, fr.exptime, seqs[key])
        stem = name[: -len(".fits")]
        rng = model.rng_for(seed, unit, night, "frame", stem)
        jd_mid = model.julian_date(fr.mid)
        entry = {"file": name, "imagetyp": fr.imagetyp, "filter": fr.filt, "exptime": fr.exptime,
                 "date_obs": fr.start.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]}
        fr_weather = weather | {"ccd_temp": round(-10.0 + float(rng.normal(0, 0.05)), 2),
                                "skyfwhm": round(seeing0 * 0.9, 2)}
        cr_idx, cr_val, hits = detector.cosmic_rays(shape, fr.exptime, rng)
        if fr.imagetyp == "LIGHT":
            mount_ra, mount_dec = ra0, dec0
            horiz = model.altaz(ra0, dec0, model.julian_date(fr.start))
            airmass = model.altaz(ra0, dec0, jd_mid).airmass
            jitter = float(rng.normal(0, 0.02))
            zp = model.frame_zp(fr.filt, fr.exptime, airmass, jitter)
            fwhm = float(np.clip(seeing0 + rng.normal(0, 0.12), 2.0, 3.5))
            beta = float(np.clip(rng.normal(2.75, 0.08), 2.5, 3.0))
            sky_zp = model.ZP100[fr.filt] + 2.5 * math.log10(fr.exptime / 100.0)
            sky_adu = float(10 ** (-0.4 * (model.sky_surface_brightness(fr.filt) - sky_zp)) * pixscale**2
                            * rng.uniform(0.9, 1.15))
            sky_grad = (float(rng.normal(0, 0.02)), float(rng.normal(0, 0.02)))
            # the true centre: the night's pointing offset plus a few arcsec of jitter, within 60"
            de = point_mag * math.cos(point_ang) + rng.normal(0, 3.0)
            dn = point_mag * math.sin(point_ang) + rng.normal(0, 3.0)
            err = math.hypot(de, dn)
            if err > 58.0:
                de, dn = de * 58.0 / err, dn * 58.0 / err
            c_ra = ra0 + de / 3600.0 / math.cos(math.radians(dec0))
            c_dec = dec0 + dn / 3600.0
            wcs = catalog.tangent_wcs(c_ra, c_dec, pixscale, shape, rot_deg)
            epoch = model.julian_year(fr.mid)
            s_ra, s_dec = catalog.positions_at(stars, epoch)
            sky_tab = Table({"ra": s_ra, "dec": s_dec, "mag": stars[f"mag_{fr.filt}"]})
            signal = render.render_sky(shape, wcs, sky_tab, fwhm, sky_adu, zp, beta=beta, sky_gradient=sky_grad)
            fwhm_px = fwhm / pixscale
            gxp, gyp = wcs.all_world2pix(galaxy["ra"], galaxy["dec"], 0)
            render.render_galaxy(signal, float(gxp), float(gyp),
                                 10 ** (-0.4 * (float(model.sed_mag(galaxy["mag_g"], galaxy["bp_rp"], fr.filt)) - zp)),
                                 galaxy["r_eff_arcsec"] / pixscale, galaxy["sersic_n"], galaxy["axis_ratio"],
                                 galaxy["pa_deg"], fwhm_px, beta)
            alpha = model.moffat_alpha(fwhm_px, beta)
            txp, typ = wcs.all_world2pix(transient["ra"], transient["dec"], 0)
            t_mag = lightcurve.frame_mag(transient_lc, transient["mag"][fr.filt], fr, sci)
            render.add_moffat(signal, float(txp), float(typ), 10 ** (-0.4 * (t_mag - zp)), alpha, beta)
            # the asteroid trails during the exposure: five sub-exposures
            a_mag = float(model.sed_mag(ast_g, 0.85, fr.filt))
            for k in range(5):
                when = fr.start + timedelta(seconds=fr.exptime * (k + 0.5) / 5)
                axp, ayp = wcs.all_world2pix(*asteroid_at(when), 0)
                render.add_moffat(signal, float(axp), float(ayp), 10 ** (-0.4 * (a_mag - zp)) / 5, alpha, beta)
            a_ra, a_dec = asteroid_at(fr.mid)
            axp, ayp = wcs.all_world2pix(a_ra, a_dec, 0)
            for row in movers_mod.render_frame(signal, wcs, fr.start, fr.exptime, fr.filt, zp, movers, alpha, beta,
                                               fwhm_px, pixscale):
                mover_rows.append(row | {"frame": name})
            asteroid_track[name] = {"ra": a_ra, "dec": a_dec, "x": float(axp), "y": float(ayp), "mag": a_mag,
                                    "filter": fr.filt, "mid_utc": fr.mid.isoformat()}
            expected = signal
            expected *= flat_of(fr.filt)
            expected += dark_adu * np.float32(fr.exptime)
            expected *= np.float32(gain)
            entry |= {"zp": zp, "zp_jitter": jitter, "fwhm_arcsec": fwhm, "moffat_beta": beta, "sky_adu": sky_adu,
                      "sky_gradient": list(sky_grad), "wcs": wcs_cards(wcs), "pointing_error_arcsec": math.hypot(de, dn),
                      "pointing_error_east_north_arcsec": [de, dn], "airmass": airmass, "epoch": epoch,
                      "transient_xy": [float(txp), float(typ)], "galaxy_xy": [float(gxp), float(gyp)],
                      "asteroid_xy": [float(axp), float(ayp)]}
            if transient_lc is not None:
                entry["transient_mag"] = t_mag
        else:
            jd0 = model.julian_date(fr.start)
            if fr.imagetyp == "FLAT":
                # dusk sky flats: pointed high in the east, away from the setting sun
                mount_ra, mount_dec = model.radec_of(75.0, 90.0, jd0)
                expected = flat_of(fr.filt) * np.float32(fr.extra["level"])
                expected += dark_adu * np.float32(fr.exptime)
                expected *= np.float32(gain)
                entry["level"] = fr.extra["level"]
            else:
                mount_ra, mount_dec = model.radec_of(40.0, 0.0, jd0)  # parked, dome closed
                expected = None if fr.imagetyp == "BIAS" else dark_adu * np.float32(gain * fr.exptime)
            horiz = model.altaz(mount_ra, mount_dec, jd0)
        raw = detector.digitise(expected, bias, gain, rdnoise, rng, (cr_idx, cr_val), inst.saturation)
        del expected
        header = raw_header(fr, unit, inst, mount_ra, mount_dec, horiz, fr_weather)
        path = raw_dir / name
        _write_fits(path, raw, header)
        (raw_dir / (stem + ".head")).write_text(fits.getheader(path).tostring(sep="\n"))
        _write_fits(truth_dir / "crmask" / f"{stem}.fits", detector.cr_mask(shape, cr_idx), compress=True)
        _write_json(truth_dir / "crhits" / f"{stem}.json", hits)
        entry["n_cosmic_rays"] = len(hits)
        entries.append(entry)
        files.append(str(path))
        counts[fr.imagetyp] = counts.get(fr.imagetyp, 0) + 1
        if progress:
            progress(i + 1, len(frames), name)

    _write_json(truth_dir / "frames.json", entries)
    if transient_lc is not None:
        transient["light_curve"] = transient_lc.describe()
    _write_json(truth_dir / "transients.json", {
        "transient": transient, "host": galaxy,
        "asteroid": {"rate_arcsec_per_hour": ast_rate, "pa_deg": math.degrees(ast_pa) % 360.0,
                     "mag_g": ast_g, "positions": asteroid_track}})
    if movers:
        movers_mod.write_truth(truth_dir, movers, mover_rows)

    ref_paths = {}
    if reference:
        for filt in filters:
            ref_paths[filt] = str(_reference_frame(out, field, filt, shape, pixscale, stars, galaxy, seeing0,
                                                   model.julian_year(t_ref) - 1.0, gain, rdnoise, seed))
    summary = {
        "unit": unit, "night": night, "night_folder": night_dir, "field": field, "filters": list(filters),
        "size": size, "shape": list(shape), "seed": seed, "counts": counts, "n_frames": len(frames),
        "raw_dir": str(raw_dir), "truth_dir": str(truth_dir), "ref_cat": str(refcat_path), "ref_frames": ref_paths,
        "files": files, "tycho2": tycho_used, "n_catalogue_stars": len(refcat),
        "n_tycho2_stars": int(np.sum(stars["tycho2"])),
    }
    if not tycho_used:
        summary["note"] = "Tycho-2 index files not found: synthetic stars only"
    _write_json(truth_dir / "truth.json", {
        "unit": unit, "night": night, "night_folder": night_dir, "field": field, "field_center": [ra0, dec0],
        "seed": seed, "size": size, "shape": list(shape), "filters": list(filters), "calib": list(calib),
        "gain_e_per_adu": gain, "rdnoise_e": rdnoise, "dark_e_per_s": dark_e, "bias_level_adu": model.BIAS_LEVEL,
        "n_hot_pixels": int(hot.size), "pixscale_arcsec": pixscale, "rotation_deg": rot_deg,
        "saturation_adu": inst.saturation, "zp100": {f: model.ZP100[f] for f in filters},
        "extinction_mag_per_airmass": {f: model.extinction_coeff(f) for f in filters},
        "zp_definition": "mag = zp - 2.5 log10(total ADU of the source in the bias-, dark- and flat-corrected frame)",
        "noise_model": ("raw_adu = round(bias + (Poisson(gain*(signal_adu*flat + dark_adu_s*t)) + CR_e "
                        "+ N(0, rdnoise_e)) / gain); var_adu = (signal_adu*flat + dark_adu_s*t)/gain "
                        "+ (rdnoise_e/gain)**2 + 1/12"),
        "star_density_boost": boost, "tycho2": tycho_used, "catalogue_margin_deg": CATALOGUE_MARGIN_DEG,
        "catalogue_epoch": model.GAIA_EPOCH, "stars_csv": "stars.csv (true mags, J2016 positions, pm)",
        "summary": {k: v for k, v in summary.items() if k != "files"},
    })
    return summary


def _reference_frame(out: Path, field: str, filt: str, shape: tuple[int, int], pixscale: float, stars: Table,
                     galaxy: dict, seeing0: float, epoch: float, gain: float, rdnoise: float, seed: int) -> Path:
    """A deep, calibrated, sky-subtracted reference (10 x 100 s) with a correct WCS; no transient,
    no asteroid, no cosmic rays."""
    rng = model.rng_for(seed, "ref", field, filt, *shape)
    ra0, dec0 = model.field_center(field)
    rshape = (shape[0] + 2 * REF_MARGIN_PX, shape[1] + 2 * REF_MARGIN_PX)
    wcs = catalog.tangent_wcs(ra0, dec0, pixscale, rshape, 0.0)
    nexp, exptime = 10, 10 * SCIENCE_EXPTIME
    zp = model.frame_zp(filt, exptime, 1.2)
    fwhm = float(seeing0 * rng.uniform(0.85, 0.95))
    beta = 2.8
    sky = float(10 ** (-0.4 * (model.sky_surface_brightness(filt) - model.ZP100[filt] - 2.5 * math.log10(exptime / 100)))
                * pixscale**2)
    s_ra, s_dec = catalog.positions_at(stars, epoch)
    img = render.render_sky(rshape, wcs, Table({"ra": s_ra, "dec": s_dec, "mag": stars[f"mag_{filt}"]}),
                            fwhm, sky, zp, beta=beta)
    gxp, gyp = wcs.all_world2pix(galaxy["ra"], galaxy["dec"], 0)
    render.render_galaxy(img, float(gxp), float(gyp),
                         10 ** (-0.4 * (float(model.sed_mag(galaxy["mag_g"], galaxy["bp_rp"], filt)) - zp)),
                         galaxy["r_eff_arcsec"] / pixscale, galaxy["sersic_n"], galaxy["axis_ratio"], galaxy["pa_deg"],
                         fwhm / pixscale, beta)
    detector.add_noise_adu(img, gain, rdnoise * math.sqrt(nexp), rng)
    img -= np.float32(sky)
    h = fits.Header(wcs_cards(wcs))
    for k, v, c in (("OBJECT", field, "Field"), ("FILTER", filt, "Filter"), ("EXPTIME", exptime, "[s] total"),
                    ("NCOMBINE", nexp, "frames combined"), ("ZP", round(zp, 4), "mag = ZP - 2.5 log10(ADU)"),
                    ("FWHM", round(fwhm, 3), "[arcsec] seeing"), ("BUNIT", "ADU", "summed ADU of NCOMBINE frames"),
                    ("GAIN", gain, "[e-/ADU] effective gain of the sum"), ("SKYSUB", True, "sky subtracted"),
                    ("SKYVAL", round(sky, 3), "[ADU] sky level subtracted"), ("EPOCH", round(epoch, 4), "epoch of star positions"),
                    ("TELESCOP", "7DT", ""), ("SIMULATD", True, "gppy-stage simulator")):
        h[k] = (v, c)
    path = out / "ref_frame" / filt / f"ref_7DT_{field}_{filt}_deep.fits"
    _write_fits(path, img.astype(np.float32), h)
    return path
