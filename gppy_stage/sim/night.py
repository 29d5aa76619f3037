"""simulate_night: a raw 7DT night folder, its reference catalogue and frame, and the truth.

Everything random comes from generators seeded by (seed, unit, night, what), so the same
arguments give byte-identical files, and the detector maps and the sky do not depend on the night.
"""

from __future__ import annotations

import math
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from astropy.table import Table

from .. import config, names
from ..errors import ConfigError
from . import catalog, detector, lightcurve, model, movers as movers_mod, render
from .frames import (Asteroid, Exposure, RawWriter, add_host, electrons, trail_asteroid, run_night,
                     wcs_cards, write_csv, write_fits, write_json)
from .night_plan import SCIENCE_EXPTIME, Frame, plan_night, raw_header
from .reference import N_COMBINE, REF_AIRMASS, RefBand, deep_reference

SIZES = {"small": (1024, 1536), "tiny": (512, 768)}  # rows, columns; "full" comes from the instrument registry
CATALOGUE_MARGIN_DEG = 5.0 / 60.0


def frame_shape(size: str, unit: str) -> tuple[int, int]:
    if size == "full":
        return config.instrument(unit).shape
    if size in SIZES:
        return SIZES[size]
    raise ConfigError(f"unknown size {size!r} (small, tiny or full)")


class _NightSim:
    """One simulated night, in phases: the sky and the night's conditions, the detector, the raw
    frames, then the truth and the references. Each phase draws from its own seeded generator."""

    def __init__(self, out: Path, unit: str, night: str, filters: tuple[str, ...], size: str, seed: int,
                 calib: tuple[str, ...], n_science: int, field: str, filter_gap_s: float,
                 transient_lc: lightcurve.LightCurve | None, movers: str | list | None):
        self.out, self.unit, self.night, self.filters, self.size, self.seed = out, unit, night, filters, size, seed
        self.calib, self.n_science, self.field, self.transient_lc = calib, n_science, field, transient_lc
        self.ra0, self.dec0 = model.field_center(field)
        self.inst = config.instrument(unit)
        self.dark_e = self.inst.dark if self.inst.dark is not None else 0.01
        self.pixscale = self.inst.pixscale
        self.shape = frame_shape(size, unit)
        self.frames = plan_night(unit, night, filters, calib, n_science, field, seed, filter_gap_s)
        self.sci = [f for f in self.frames if f.imagetyp == "LIGHT"]
        self.t_ref = self.sci[0].mid if self.sci else self.frames[0].start
        self.night_dir = names.night_folder(self.frames[0].start)
        assert self.night_dir == f"{night}_gain2750", self.night_dir  # the plan keeps every frame in its night
        self.raw_dir = out / "obsdata" / unit / self.night_dir
        self.truth_dir = out / "truth" / unit / self.night_dir
        self.offsets = catalog.tangent_wcs(self.ra0, self.dec0, 1.0, (1, 1))  # arcsec offsets to the sky
        self.mover_specs = movers
        self.asteroid_track: dict[str, dict] = {}
        self.mover_rows: list[dict] = []
        self._flats: dict[str, np.ndarray] = {}

    # ---- the sky of the field (night- and unit-independent) and the night's conditions

    def sky(self) -> None:
        ny, nx = self.shape
        pixscale = self.pixscale
        half = (nx * pixscale / 7200.0 + CATALOGUE_MARGIN_DEG, ny * pixscale / 7200.0 + CATALOGUE_MARGIN_DEG)
        self.boost = {"small": 4.0, "tiny": 16.0}.get(self.size, 1.0)  # frames smaller than full get denser fields
        self.stars, self.tycho_used = catalog.star_field(self.ra0, self.dec0, half, self.seed, self.field,
                                                         boost=self.boost)
        refcat = catalog.reference_catalogue(self.stars, self.seed, self.field)
        self.n_refcat = len(refcat)
        self.refcat_path = self.out / "ref_cat" / f"gaiaxp_dr3_synphot_{self.field}.csv"
        fmt = {c: "{:.6f}" for c in refcat.colnames} | {"source_id": "{:d}", "ra": "{:.9f}", "dec": "{:.9f}"}
        write_csv(self.refcat_path, refcat, fmt)
        write_csv(self.truth_dir / "stars.csv", self.stars, fmt | {"tycho2": "{:d}"})

    def field_objects(self) -> None:
        """The host galaxy and its new transient: they belong to the field."""
        ny, nx = self.shape
        pixscale = self.pixscale
        frng = model.rng_for(self.seed, "objects", self.field)
        gx_off = (-0.35 * nx * pixscale / 2, 0.35 * ny * pixscale / 2)  # arcsec, inside the frame
        g_ra, g_dec = (float(v) for v in self.offsets.wcs_pix2world(1 + gx_off[0], 1 + gx_off[1], 1))
        self.galaxy = {"ra": g_ra, "dec": g_dec, "mag_g": float(frng.uniform(13.8, 14.3)), "bp_rp": 1.0,
                       "r_eff_arcsec": float(frng.uniform(5.0, 8.0)), "sersic_n": 1.0,
                       "axis_ratio": float(frng.uniform(0.45, 0.7)), "pa_deg": float(frng.uniform(0, 180))}
        sep = float(frng.uniform(1.5, 2.5))
        ang = float(frng.uniform(0, 2 * math.pi))
        t_dra, t_ddec = sep * math.sin(ang), sep * math.cos(ang)
        tr_g = float(frng.uniform(17.0, 17.8))
        self.transient = {"ra": g_ra + t_dra / 3600.0 / math.cos(math.radians(g_dec)), "dec": g_dec + t_ddec / 3600.0,
                          "host_offset_arcsec": sep, "host_offset_east_arcsec": t_dra,
                          "host_offset_north_arcsec": t_ddec,
                          "mag": {f: float(model.sed_mag(tr_g, 0.1, f)) for f in self.filters}}

    def conditions(self) -> None:
        """The night's asteroid, seeing, pointing offset and weather; the unit's camera rotation."""
        ny, nx = self.shape
        pixscale = self.pixscale
        nrng = model.rng_for(self.seed, self.unit, self.night, "night")
        ast_rate = float(nrng.uniform(25.0, 60.0))  # arcsec/hour
        ast_pa = float(nrng.uniform(0, 2 * math.pi))
        ast_g = float(nrng.uniform(17.0, 17.8))
        a_x0, a_y0 = (float(v) for v in (nrng.uniform(-0.25, 0.25) * nx * pixscale,
                                         nrng.uniform(-0.25, 0.25) * ny * pixscale))
        a_ra0, a_dec0 = (float(v) for v in self.offsets.wcs_pix2world(1 + a_x0, 1 + a_y0, 1))
        self.asteroid = Asteroid(a_ra0, a_dec0, ast_rate, ast_pa, ast_g, self.t_ref)
        self.seeing0 = float(nrng.uniform(2.3, 2.9))
        self.point_mag = float(nrng.uniform(15.0, 45.0))
        self.point_ang = float(nrng.uniform(0, 2 * math.pi))
        self.rot_deg = float(model.rng_for(self.seed, self.unit, "mount").uniform(-1.0, 1.0))
        self.weather = {"ambtemp": round(float(nrng.uniform(14, 20)), 1),
                        "humidity": round(float(nrng.uniform(20, 50)), 1),
                        "pressure": round(float(nrng.uniform(835, 845)), 1),
                        "windspd": round(float(nrng.uniform(0, 8)), 1),
                        "skytemp": round(float(nrng.uniform(-35, -25)), 1)}
        self.place_movers()

    def place_movers(self) -> None:
        """Solar-system movers from their own generator: a night without them draws what it always did."""
        movers = self.mover_specs
        ny, nx = self.shape
        pixscale, gain, rdnoise = self.pixscale, self.inst.gain, self.inst.rdnoise
        specs = movers_mod.parse_specs(movers) if isinstance(movers, str) else list(movers or [])
        self.movers = specs
        if specs:
            t_last = self.sci[-1].mid if self.sci else self.t_ref
            self.movers = movers_mod.place(
                specs, model.rng_for(self.seed, self.unit, self.night, "movers"), self.offsets,
                (nx * pixscale, ny * pixscale), self.t_ref, t_last,
                lambda snr: movers_mod.mag_for_snr(snr, self.filters[0], self.n_science, 2.6, pixscale, gain,
                                                   rdnoise, SCIENCE_EXPTIME))

    # ---- detector maps (unit- and seed-dependent only)

    def detector_maps(self) -> None:
        shape, gain = self.shape, self.inst.gain
        self.bias = detector.bias_pattern(shape, self.unit, self.seed)
        self.dark_adu, self.hot = detector.dark_rate(shape, self.unit, self.seed, self.dark_e, gain)
        write_fits(self.truth_dir / "bias.fits", self.bias)
        write_fits(self.truth_dir / "dark_rate.fits", self.dark_adu)
        for filt in self.filters:
            write_fits(self.truth_dir / f"flat_{filt}.fits", self.flat(filt))

    def flat(self, filt: str) -> np.ndarray:
        if filt not in self._flats:
            self._flats.clear()  # one at a time: a full-size flat is 245 MB
            self._flats[filt] = detector.true_flat(self.shape, self.unit, self.seed, filt)
        return self._flats[filt]

    # ---- the raw frames

    def write_frames(self, progress: Callable[[int, int, str], None] | None) -> RawWriter:
        writer = RawWriter(self.raw_dir, self.truth_dir, self.bias, self.inst, len(self.frames), progress,
                                  tcspy_sidecars=True)
        seqs: dict[tuple, int] = {}
        for fr in self.frames:
            key = (fr.obj, fr.filt)
            seqs[key] = seqs.get(key, 0) + 1
            name = names.raw_name(self.unit, fr.start, fr.obj, fr.filt, 1, fr.exptime, seqs[key])
            rng = model.rng_for(self.seed, self.unit, self.night, "frame", name[: -len(".fits")])
            entry = {"file": name, "imagetyp": fr.imagetyp, "filter": fr.filt, "exptime": fr.exptime,
                     "date_obs": fr.start.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]}
            weather = self.weather | {"ccd_temp": round(-10.0 + float(rng.normal(0, 0.05)), 2),
                                      "skyfwhm": round(self.seeing0 * 0.9, 2)}
            cosmic = detector.cosmic_rays(self.shape, fr.exptime, rng)
            header = partial(raw_header, fr, self.unit, self.inst, *self.pointing(fr), weather)
            writer.write(name, fr.imagetyp, rng, cosmic, partial(self.expected_e, fr, rng, name, entry), header,
                         entry)
        return writer

    def pointing(self, fr: Frame) -> tuple[float, float, model.Horizontal]:
        """Where the mount points at the start of ``fr``."""
        jd0 = model.julian_date(fr.start)
        if fr.imagetyp == "LIGHT":
            ra, dec = self.ra0, self.dec0
        elif fr.imagetyp == "FLAT":
            ra, dec = model.radec_of(75.0, 90.0, jd0)  # dusk sky flats: high in the east, away from the setting sun
        else:
            ra, dec = model.radec_of(40.0, 0.0, jd0)  # parked, dome closed
        return ra, dec, model.altaz(ra, dec, jd0)

    def expected_e(self, fr: Frame, rng: np.random.Generator, name: str, entry: dict) -> np.ndarray | None:
        """The electrons ``fr`` expects in each pixel (None for a bias); its truth goes to ``entry``."""
        gain = self.inst.gain
        if fr.imagetyp == "LIGHT":
            return self.science_e(fr, rng, name, entry)
        if fr.imagetyp == "FLAT":
            entry["level"] = fr.extra["level"]
            return electrons(self.flat(fr.filt) * np.float32(fr.extra["level"]), self.dark_adu, fr.exptime,
                                    gain)
        return None if fr.imagetyp == "BIAS" else self.dark_adu * np.float32(gain * fr.exptime)

    def exposure(self, fr: Frame, rng: np.random.Generator) -> Exposure:
        pixscale = self.pixscale
        airmass = model.altaz(self.ra0, self.dec0, model.julian_date(fr.mid)).airmass
        jitter = float(rng.normal(0, 0.02))
        zp = model.frame_zp(fr.filt, fr.exptime, airmass, jitter)
        fwhm = float(np.clip(self.seeing0 + rng.normal(0, 0.12), 2.0, 3.5))
        beta = float(np.clip(rng.normal(2.75, 0.08), 2.5, 3.0))
        sky_zp = model.ZP100[fr.filt] + 2.5 * math.log10(fr.exptime / 100.0)
        sky_adu = float(10 ** (-0.4 * (model.sky_surface_brightness(fr.filt) - sky_zp)) * pixscale**2
                        * rng.uniform(0.9, 1.15))
        sky_grad = (float(rng.normal(0, 0.02)), float(rng.normal(0, 0.02)))
        # the true centre: the night's pointing offset plus a few arcsec of jitter, within 60"
        de = self.point_mag * math.cos(self.point_ang) + rng.normal(0, 3.0)
        dn = self.point_mag * math.sin(self.point_ang) + rng.normal(0, 3.0)
        err = math.hypot(de, dn)
        if err > 58.0:
            de, dn = de * 58.0 / err, dn * 58.0 / err
        c_ra = self.ra0 + de / 3600.0 / math.cos(math.radians(self.dec0))
        c_dec = self.dec0 + dn / 3600.0
        wcs = catalog.tangent_wcs(c_ra, c_dec, pixscale, self.shape, self.rot_deg)
        return Exposure(airmass, jitter, zp, fwhm, beta, sky_adu, de, dn, wcs, model.julian_year(fr.mid), sky_grad)

    def science_e(self, fr: Frame, rng: np.random.Generator, name: str, entry: dict) -> np.ndarray:
        """A science frame: stars, the host and its transient, the asteroid's trail, the movers."""
        x = self.exposure(fr, rng)
        pixscale, stars, galaxy, transient = self.pixscale, self.stars, self.galaxy, self.transient
        s_ra, s_dec = catalog.positions_at(stars, x.epoch)
        sky_tab = Table({"ra": s_ra, "dec": s_dec, "mag": stars[f"mag_{fr.filt}"]})
        signal = render.render_sky(self.shape, x.wcs, sky_tab, x.fwhm, x.sky_adu, x.zp, beta=x.beta,
                                   sky_gradient=x.sky_grad)
        fwhm_px = x.fwhm / pixscale
        g_mag = float(model.sed_mag(galaxy["mag_g"], galaxy["bp_rp"], fr.filt))
        gxy = add_host(signal, x.wcs, galaxy, g_mag, x.zp, pixscale, fwhm_px, x.beta)
        alpha = model.moffat_alpha(fwhm_px, x.beta)
        txp, typ = x.wcs.all_world2pix(transient["ra"], transient["dec"], 0)
        t_mag = lightcurve.frame_mag(self.transient_lc, transient["mag"][fr.filt], fr, self.sci)
        render.add_moffat(signal, float(txp), float(typ), 10 ** (-0.4 * (t_mag - x.zp)), alpha, x.beta)
        a_mag = float(model.sed_mag(self.asteroid.mag_g, 0.85, fr.filt))
        track = trail_asteroid(signal, x.wcs, self.asteroid, fr, a_mag, x.zp, alpha, x.beta)
        for row in movers_mod.render_frame(signal, x.wcs, fr.start, fr.exptime, fr.filt, x.zp, self.movers, alpha,
                                           x.beta, fwhm_px, pixscale):
            self.mover_rows.append(row | {"frame": name})
        self.asteroid_track[name] = track
        signal *= self.flat(fr.filt)
        entry |= {"zp": x.zp, "zp_jitter": x.jitter, "fwhm_arcsec": x.fwhm, "moffat_beta": x.beta,
                  "sky_adu": x.sky_adu, "sky_gradient": list(x.sky_grad), "wcs": wcs_cards(x.wcs),
                  "pointing_error_arcsec": math.hypot(x.de, x.dn), "pointing_error_east_north_arcsec": [x.de, x.dn],
                  "airmass": x.airmass, "epoch": x.epoch, "transient_xy": [float(txp), float(typ)],
                  "galaxy_xy": list(gxy), "asteroid_xy": [track["x"], track["y"]]}
        if self.transient_lc is not None:
            entry["transient_mag"] = t_mag
        return electrons(signal, self.dark_adu, fr.exptime, self.inst.gain)

    # ---- the truth and the references

    def write_truth(self, writer: RawWriter) -> None:
        write_json(self.truth_dir / "frames.json", writer.entries)
        if self.transient_lc is not None:
            self.transient["light_curve"] = self.transient_lc.describe()
        write_json(self.truth_dir / "transients.json", {
            "transient": self.transient, "host": self.galaxy, "asteroid": self.asteroid.truth(self.asteroid_track)})
        if self.movers:
            movers_mod.write_truth(self.truth_dir, self.movers, self.mover_rows)

    def references(self) -> dict[str, str]:
        epoch = model.julian_year(self.t_ref) - 1.0
        return {filt: str(_reference_frame(self.out, self.field, filt, self.shape, self.pixscale, self.stars,
                                           self.galaxy, self.seeing0, epoch, self.inst.gain, self.inst.rdnoise,
                                           self.seed))
                for filt in self.filters}

    def summary(self, writer: RawWriter, ref_paths: dict[str, str]) -> dict:
        summary = {
            "unit": self.unit, "night": self.night, "night_folder": self.night_dir, "field": self.field,
            "filters": list(self.filters), "size": self.size, "shape": list(self.shape), "seed": self.seed,
            "counts": writer.counts, "n_frames": len(self.frames), "raw_dir": str(self.raw_dir),
            "truth_dir": str(self.truth_dir), "ref_cat": str(self.refcat_path), "ref_frames": ref_paths,
            "files": writer.files, "tycho2": self.tycho_used, "n_catalogue_stars": self.n_refcat,
            "n_tycho2_stars": int(np.sum(self.stars["tycho2"])),
        }
        if not self.tycho_used:
            summary["note"] = "Tycho-2 index files not found: synthetic stars only"
        return summary

    def write_night_truth(self, summary: dict) -> None:
        inst, filters = self.inst, self.filters
        write_json(self.truth_dir / "truth.json", {
            "unit": self.unit, "night": self.night, "night_folder": self.night_dir, "field": self.field,
            "field_center": [self.ra0, self.dec0], "seed": self.seed, "size": self.size, "shape": list(self.shape),
            "filters": list(filters), "calib": list(self.calib), "gain_e_per_adu": inst.gain,
            "rdnoise_e": inst.rdnoise, "dark_e_per_s": self.dark_e, "bias_level_adu": model.BIAS_LEVEL,
            "n_hot_pixels": int(self.hot.size), "pixscale_arcsec": self.pixscale, "rotation_deg": self.rot_deg,
            "saturation_adu": inst.saturation, "zp100": {f: model.ZP100[f] for f in filters},
            "extinction_mag_per_airmass": {f: model.extinction_coeff(f) for f in filters},
            "zp_definition": "mag = zp - 2.5 log10(total ADU of the source in the bias-, dark- and flat-corrected frame)",
            "noise_model": ("raw_adu = round(bias + (Poisson(gain*(signal_adu*flat + dark_adu_s*t)) + CR_e "
                            "+ N(0, rdnoise_e)) / gain); var_adu = (signal_adu*flat + dark_adu_s*t)/gain "
                            "+ (rdnoise_e/gain)**2 + 1/12"),
            "star_density_boost": self.boost, "tycho2": self.tycho_used, "catalogue_margin_deg": CATALOGUE_MARGIN_DEG,
            "catalogue_epoch": model.GAIA_EPOCH, "stars_csv": "stars.csv (true mags, J2016 positions, pm)",
            "summary": {k: v for k, v in summary.items() if k != "files"},
        })


def _check_args(filters, calib, night: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
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
    return filters, calib


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
    filters, calib = _check_args(filters, calib, night)
    sim = _NightSim(Path(out), unit, night, filters, size, seed, calib, n_science, field, filter_gap_s, transient_lc,
                    movers)
    return run_night(sim, progress, reference)


def _reference_frame(out: Path, field: str, filt: str, shape: tuple[int, int], pixscale: float, stars: Table,
                     galaxy: dict, seeing0: float, epoch: float, gain: float, rdnoise: float, seed: int) -> Path:
    exptime = N_COMBINE * SCIENCE_EXPTIME
    band = RefBand(field, filt, exptime, model.frame_zp(filt, exptime, REF_AIRMASS), model.ZP100[filt],
                   model.sky_surface_brightness(filt), stars[f"mag_{filt}"],
                   float(model.sed_mag(galaxy["mag_g"], galaxy["bp_rp"], filt)), "7DT", "GAIN",
                   "mag = ZP - 2.5 log10(ADU)")
    return deep_reference(out / "ref_frame" / filt / f"ref_7DT_{field}_{filt}_deep.fits", band,
                          model.rng_for(seed, "ref", field, filt, *shape), model.field_center(field), shape, pixscale,
                          stars, galaxy, seeing0, epoch, gain, rdnoise)
