"""simulate_site_night: a raw IMSNG/GECKO night (LOAO, KCT, RASA36) as MaxIm DL writes it.

The detector is the site's registry row (gain, read noise, pixel scale; the frame cut down to
``--size`` as for 7DT), the headers MaxIm's (``IMAGETYP = 'Light Frame'``, ``XBINNING``, the
pointing as OBJCTRA/OBJCTDEC sexagesimal, RA/DEC degrees or missing, per site), the night folder
and the file names the site's way. The sky, detector maps and noise come from the 7DT simulator's
modules (catalog, detector, render, model, frames, reference), so the same seed gives byte-identical
files; the sites, their bands and their catalogues are in sites.py.
"""

from __future__ import annotations

import math
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .. import config
from ..errors import ConfigError
from . import catalog, detector, model, render
from .frames import (Asteroid, Exposure, RawWriter, add_host, electrons, trail_asteroid, run_night,
                     wcs_cards, write_csv, write_fits, write_json)
from .reference import N_COMBINE, REF_AIRMASS, RefBand, deep_reference
from .site_plan import Frame, file_name, maxim_header, night_folder, plan_frames
from .sites import (FIELDS, SiteSim, check_filter, extinction, flat_band, frame_zp, object_mag, reference_catalogue,
                    site_sim, sky_mag, star_mags, transform_name, zp100)

CATALOGUE_MARGIN_DEG = 3.0 / 60.0
# a small 7DT frame (1024 x 1536 px of 0.505", seeing ~2.6" = 5.1 px, star density boost 4): each site's
# frame gets as many stars per seeing disc as it has, which the 7DT photometry is proven on
SEVEN_DT_SMALL = {"deg2": 1024 * 1536 * (0.505 / 3600.0) ** 2, "npix": 1024 * 1536, "fwhm_px": 2.6 / 0.505,
                  "boost": 4.0}
FRINGE_BANDS = ("z", "y")  # the bands whose sky fringes (LOAO z and y in gpPy)
FRINGE_AMPLITUDE = 0.06  # peak fringe / sky
# one-sided, so that a tiny frame keeps the site's pixel scale and enough stars
SIZES = {"small": 1024, "tiny": 512}


def fringe_pattern(shape: tuple[int, int], obs: str, seed: int, band: str) -> np.ndarray:
    """A fringe map (fraction of the sky, peak about FRINGE_AMPLITUDE): a few interfering waves of
    20-80 px, the same every night of a site (it belongs to the detector and the band)."""
    rng = model.rng_for(seed, obs, "fringe", band, *shape)
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    out = np.zeros(shape, np.float32)
    for _ in range(4):
        period, theta, phase = rng.uniform(20.0, 80.0), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        k = np.float32(2 * np.pi / period)
        out += np.sin(k * (x * np.float32(math.cos(theta)) + y * np.float32(math.sin(theta))) + np.float32(phase))
    out *= np.float32(FRINGE_AMPLITUDE / np.abs(out).max())
    return out


# ----------------------------------------------------------------------------- the night

def _shape(size: str, inst: config.Instrument) -> tuple[int, int]:
    if size == "full":
        return inst.shape
    if size in SIZES:
        return (min(inst.ny, SIZES[size]), min(inst.nx, SIZES[size]))
    raise ConfigError(f"unknown size {size!r} (small, tiny or full)")


class _SiteNightSim:
    """One simulated site night, in phases: the sky and the night's conditions, the detector, the
    raw frames, then the truth and the references. Each phase draws from its own seeded generator."""

    def __init__(self, out: Path, obs: str, site: SiteSim, inst: config.Instrument, night: str,
                 filters: tuple[str, ...], size: str, seed: int, n_science: int):
        self.out, self.obs, self.night, self.filters, self.size, self.seed = out, obs, night, filters, size, seed
        self.site, self.inst = site, inst
        self.shape = _shape(size, self.inst)
        self.pixscale = self.inst.pixscale
        self.dark_e = self.inst.dark if self.inst.dark is not None else 0.01
        self.field = self.site.field
        self.ra0, self.dec0 = FIELDS[self.field]
        self.folder = night_folder(obs, night)
        self.raw_dir = out / "obsdata" / obs / self.folder
        self.truth_dir = out / "truth" / obs / self.folder
        self.offsets = catalog.tangent_wcs(self.ra0, self.dec0, 1.0, (1, 1))  # arcsec offsets to the sky
        self.frames = plan_frames(obs, self.site, night, filters, n_science, seed)
        self.t_ref = [f for f in self.frames if f.imagetyp == "LIGHT"][0].mid
        self.track: dict[str, dict] = {}

    def sky(self) -> None:
        """The stars: as crowded (stars per seeing disc) as a small 7DT frame."""
        site, (ny, nx), pixscale = self.site, self.shape, self.pixscale
        half = (nx * pixscale / 7200.0 + CATALOGUE_MARGIN_DEG, ny * pixscale / 7200.0 + CATALOGUE_MARGIN_DEG)
        area = nx * ny * (pixscale / 3600.0) ** 2
        fwhm_px = sum(site.seeing) / 2 / pixscale
        ref = SEVEN_DT_SMALL
        self.boost = float(np.clip(site.crowding * ref["boost"] * ref["deg2"] / area * (nx * ny / ref["npix"])
                                   * (ref["fwhm_px"] / fwhm_px) ** 2, 1.0, 40.0))
        self.stars, self.tycho_used = catalog.star_field(self.ra0, self.dec0, half, self.seed, self.field,
                                                         boost=self.boost)
        refcat, self.refcat_name = reference_catalogue(self.stars, site.refcat, self.seed, self.field)
        self.n_refcat = len(refcat)
        self.refcat_path = self.out / "ref_cat" / self.refcat_name
        fmt = {c: "{:.5f}" for c in refcat.colnames} | {"objID": "{:d}", "recno": "{:d}", "raMean": "{:.8f}",
                                                      "decMean": "{:.8f}", "RAJ2000": "{:.8f}", "DEJ2000": "{:.8f}"}
        write_csv(self.refcat_path, refcat, fmt)
        truth_stars = Table(self.stars)
        for band in self.filters:
            truth_stars[f"true_{band}"] = star_mags(self.stars, band, site.refcat)
        write_csv(self.truth_dir / "stars.csv", truth_stars, {c: "{:.6f}" for c in truth_stars.colnames}
                  | {"source_id": "{:d}", "tycho2": "{:d}", "ra": "{:.9f}", "dec": "{:.9f}"})

    def field_objects(self) -> None:
        """The field's galaxy and its new point source."""
        site, (ny, nx), pixscale = self.site, self.shape, self.pixscale
        frng = model.rng_for(self.seed, "objects", self.obs, self.field)
        g_ra, g_dec = (float(v) for v in self.offsets.wcs_pix2world(1 - 0.3 * nx * pixscale / 2,
                                                                    1 + 0.3 * ny * pixscale / 2, 1))
        self.galaxy = {"ra": g_ra, "dec": g_dec, "mag_g": float(frng.uniform(14.0, 14.5)), "bp_rp": 1.0,
                       "r_eff_arcsec": float(frng.uniform(5.0, 8.0)), "sersic_n": 1.0,
                       "axis_ratio": float(frng.uniform(0.45, 0.7)), "pa_deg": float(frng.uniform(0, 180))}
        sep, ang = float(frng.uniform(2.0, 3.0)), float(frng.uniform(0, 2 * math.pi))
        t_dra, t_ddec = sep * math.sin(ang), sep * math.cos(ang)
        tr_g = float(frng.uniform(16.8, 17.3)) + (site.zp_offset < -1.0) * -0.8  # brighter for a small telescope
        tr_color = 0.1
        self.transient = {"ra": g_ra + t_dra / 3600.0 / math.cos(math.radians(g_dec)), "dec": g_dec + t_ddec / 3600.0,
                          "host_offset_arcsec": sep,
                          "mag": {b: object_mag(tr_g, tr_color, b, site.refcat) for b in self.filters}}

    def conditions(self) -> None:
        """The night's moving object, seeing and pointing error; the site's camera rotation."""
        (ny, nx), pixscale = self.shape, self.pixscale
        nrng = model.rng_for(self.seed, self.obs, self.night, "night")
        ast_rate, ast_pa = float(nrng.uniform(30.0, 60.0)), float(nrng.uniform(0, 2 * math.pi))
        ast_g = float(nrng.uniform(16.5, 17.0))
        a_ra0, a_dec0 = (float(v) for v in self.offsets.wcs_pix2world(1 + nrng.uniform(-0.2, 0.2) * nx * pixscale,
                                                                      1 + nrng.uniform(-0.2, 0.2) * ny * pixscale, 1))
        self.asteroid = Asteroid(a_ra0, a_dec0, ast_rate, ast_pa, ast_g, self.t_ref)
        self.seeing0 = float(nrng.uniform(*self.site.seeing))
        self.rot_deg = float(model.rng_for(self.seed, self.obs, "mount").uniform(-0.5, 0.5))
        self.point_ang = float(nrng.uniform(0, 2 * math.pi))

    def detector_maps(self) -> None:
        """Bias, dark, flats and fringes: site- and seed-dependent only."""
        shape, obs, seed, truth = self.shape, self.obs, self.seed, self.truth_dir
        self.bias = detector.bias_pattern(shape, obs, seed)
        self.dark_adu, self.hot = detector.dark_rate(shape, obs, seed, self.dark_e, self.inst.gain)
        write_fits(truth / "bias.fits", self.bias)
        write_fits(truth / "dark_rate.fits", self.dark_adu)
        self.flats = {f: detector.true_flat(shape, obs, seed, flat_band(f)) for f in self.filters}
        self.fringes = {f: fringe_pattern(shape, obs, seed, f) for f in self.filters if f in FRINGE_BANDS}
        for f in self.filters:
            write_fits(truth / f"flat_{f}.fits", self.flats[f])
        for f, pattern in self.fringes.items():
            write_fits(truth / f"fringe_{f}.fits", pattern)

    def write_frames(self, progress: Callable[[int, int, str], None] | None) -> RawWriter:
        writer = RawWriter(self.raw_dir, self.truth_dir, self.bias, self.inst, len(self.frames), progress)
        for index, fr in enumerate(self.frames):
            name = file_name(self.obs, self.site, fr, index)
            rng = model.rng_for(self.seed, self.obs, self.night, "frame", name)
            entry = {"file": name, "imagetyp": fr.imagetyp, "filter": fr.filt, "exptime": fr.exptime,
                     "date_obs": fr.start.strftime("%Y-%m-%dT%H:%M:%S")}
            cosmic = detector.cosmic_rays(self.shape, fr.exptime, rng)
            writer.write(name, fr.imagetyp, rng, cosmic, partial(self.expected_e, fr, rng, name, entry),
                         partial(self.header, fr, rng), entry)
        return writer

    def header(self, fr: Frame, rng: np.random.Generator) -> fits.Header:
        """MaxIm's header; the CCD temperature is the frame's last draw."""
        light = fr.imagetyp == "LIGHT"
        pointing = (self.ra0, self.dec0) if light and self.site.pointing != "missing" else None
        return maxim_header(self.obs, self.site, self.inst, fr, pointing, self.airmass(fr) if light else None,
                            round(-30.0 + float(rng.normal(0, 0.1)), 2))

    def airmass(self, fr: Frame) -> float:
        return model.altaz(self.ra0, self.dec0, model.julian_date(fr.mid), self.site.lat, self.site.lon).airmass

    def expected_e(self, fr: Frame, rng: np.random.Generator, name: str, entry: dict) -> np.ndarray | None:
        """The electrons ``fr`` expects in each pixel (None for a bias); its truth goes to ``entry``."""
        gain = self.inst.gain
        if fr.imagetyp == "LIGHT":
            return self.science_e(fr, rng, name, entry)
        if fr.imagetyp == "FLAT":
            entry["level"] = fr.level
            return electrons(self.flats[fr.filt] * np.float32(fr.level), self.dark_adu, fr.exptime, gain)
        return None if fr.imagetyp == "BIAS" else self.dark_adu * np.float32(gain * fr.exptime)

    def exposure(self, fr: Frame, rng: np.random.Generator) -> Exposure:
        site, pixscale = self.site, self.pixscale
        airmass = self.airmass(fr)
        jitter = float(rng.normal(0, 0.02))
        zp = frame_zp(site, fr.filt, fr.exptime, airmass, jitter)
        fwhm = float(np.clip(self.seeing0 + rng.normal(0, 0.1), 1.2, 4.5))
        beta = float(np.clip(rng.normal(2.75, 0.08), 2.5, 3.0))
        sky_zp = zp100(site, fr.filt) + 2.5 * math.log10(fr.exptime / 100.0)
        sky_adu = float(10 ** (-0.4 * (sky_mag(site, fr.filt) - sky_zp)) * pixscale**2 * rng.uniform(0.9, 1.15))
        # the true centre is the rough pointing's error away from the field centre
        err = site.pointing_error_arcmin * 60.0
        de = err * math.cos(self.point_ang) + rng.normal(0, 2.0)
        dn = err * math.sin(self.point_ang) + rng.normal(0, 2.0)
        c_ra, c_dec = self.ra0 + de / 3600.0 / math.cos(math.radians(self.dec0)), self.dec0 + dn / 3600.0
        wcs = catalog.tangent_wcs(c_ra, c_dec, pixscale, self.shape, self.rot_deg)
        return Exposure(airmass, jitter, zp, fwhm, beta, sky_adu, de, dn, wcs, model.julian_year(fr.mid))

    def science_e(self, fr: Frame, rng: np.random.Generator, name: str, entry: dict) -> np.ndarray:
        """A science frame: stars (fringed in z and y), the host and its transient, the mover's trail."""
        x = self.exposure(fr, rng)
        kind, pixscale, galaxy, transient = self.site.refcat, self.pixscale, self.galaxy, self.transient
        s_ra, s_dec = catalog.positions_at(self.stars, x.epoch)
        signal = render.render_sky(self.shape, x.wcs, Table({"ra": s_ra, "dec": s_dec,
                                                             "mag": star_mags(self.stars, fr.filt, kind)}),
                                   x.fwhm, x.sky_adu, x.zp, beta=x.beta)
        fringed = fr.filt in self.fringes
        if fringed:
            signal += np.float32(x.sky_adu) * self.fringes[fr.filt]
        fwhm_px = x.fwhm / pixscale
        add_host(signal, x.wcs, galaxy, object_mag(galaxy["mag_g"], galaxy["bp_rp"], fr.filt, kind), x.zp, pixscale,
                 fwhm_px, x.beta)
        alpha = model.moffat_alpha(fwhm_px, x.beta)
        txp, typ = x.wcs.all_world2pix(transient["ra"], transient["dec"], 0)
        render.add_moffat(signal, float(txp), float(typ), 10 ** (-0.4 * (transient["mag"][fr.filt] - x.zp)), alpha,
                          x.beta)
        a_mag = object_mag(self.asteroid.mag_g, 0.85, fr.filt, kind)
        track = self.track[name] = trail_asteroid(signal, x.wcs, self.asteroid, fr, a_mag, x.zp, alpha, x.beta)
        signal *= self.flats[fr.filt]
        entry |= {"object": self.field, "zp": x.zp, "zp_jitter": x.jitter, "fwhm_arcsec": x.fwhm,
                  "moffat_beta": x.beta, "sky_adu": x.sky_adu, "wcs": wcs_cards(x.wcs),
                  "pointing_error_arcsec": math.hypot(x.de, x.dn), "header_pointing": self.site.pointing,
                  "airmass": x.airmass, "epoch": x.epoch, "transient_xy": [float(txp), float(typ)],
                  "asteroid_xy": [track["x"], track["y"]],
                  "fringe_amplitude_adu": x.sky_adu * FRINGE_AMPLITUDE if fringed else 0.0}
        return electrons(signal, self.dark_adu, fr.exptime, self.inst.gain)

    def write_truth(self, writer: RawWriter) -> None:
        write_json(self.truth_dir / "frames.json", writer.entries)
        write_json(self.truth_dir / "transients.json", {
            "transient": self.transient, "host": self.galaxy, "asteroid": self.asteroid.truth(self.track)})

    def references(self) -> dict[str, str]:
        epoch = model.julian_year(self.t_ref) - 1.0
        return {filt: str(_reference_frame(self.out, self.obs, self.site, filt, self.shape, self.pixscale, self.stars,
                                           self.galaxy, self.seeing0, epoch, self.inst.gain, self.inst.rdnoise,
                                           self.seed))
                for filt in self.filters}

    def summary(self, writer: RawWriter, ref_paths: dict[str, str]) -> dict:
        return {"obs": self.obs, "unit": self.obs, "night": self.night, "night_folder": self.folder,
                "field": self.field, "filters": list(self.filters), "size": self.size, "shape": list(self.shape),
                "seed": self.seed, "counts": writer.counts, "n_frames": len(self.frames),
                "raw_dir": str(self.raw_dir), "truth_dir": str(self.truth_dir), "ref_cat": str(self.refcat_path),
                "ref_cat_kind": self.site.refcat, "ref_frames": ref_paths, "files": writer.files,
                "tycho2": self.tycho_used, "n_catalogue_stars": self.n_refcat, "pointing": self.site.pointing}

    def write_night_truth(self, summary: dict) -> None:
        site, inst, filters = self.site, self.inst, self.filters
        write_json(self.truth_dir / "truth.json", {
            "obs": self.obs, "night": self.night, "night_folder": self.folder, "field": self.field,
            "field_center": [self.ra0, self.dec0], "seed": self.seed, "size": self.size, "shape": list(self.shape),
            "filters": list(filters), "gain_e_per_adu": inst.gain, "rdnoise_e": inst.rdnoise,
            "dark_e_per_s": self.dark_e, "bias_level_adu": model.BIAS_LEVEL, "n_hot_pixels": int(self.hot.size),
            "pixscale_arcsec": self.pixscale, "rotation_deg": self.rot_deg, "saturation_adu": inst.saturation,
            "zp100": {f: zp100(site, f) for f in filters},
            "extinction_mag_per_airmass": {f: extinction(f) for f in filters},
            "zp_definition": "mag (AB) = zp - 2.5 log10(total ADU of the source in the bias-, dark- and flat-corrected frame)",
            "johnson_cousins_truth": f"{transform_name(site.refcat)} from the true g r i, plus Blanton & Roweis (2007) "
                                     "Vega-to-AB (science/transforms.py)",
            "fringe": {f: f"fringe_{f}.fits: raw signal += sky_adu * map, before the flat" for f in self.fringes},
            "star_density_boost": self.boost, "ref_cat": self.refcat_name, "ref_cat_kind": site.refcat,
            "summary": {k: v for k, v in summary.items() if k != "files"},
        })


def simulate_site_night(out: str | Path, obs: str = "LOAO", night: str = "2024-02-29",
                        filters: tuple[str, ...] | list[str] | None = None, size: str = "small", seed: int = 0,
                        n_science: int = 2, reference: bool = True,
                        progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Write a raw IMSNG/GECKO night under out/ (a storage root) plus its truth; the summary."""
    obs = obs.upper()
    site = site_sim(obs)
    inst = config.instrument(obs)
    filters = tuple(check_filter(f) for f in (filters or site.filters))
    try:
        datetime.fromisoformat(night)
    except ValueError:
        raise ConfigError(f"night must be YYYY-MM-DD, got {night!r}") from None
    return run_night(_SiteNightSim(Path(out), obs, site, inst, night, filters, size, seed, n_science), progress,
                     reference)


def _reference_frame(out: Path, obs: str, site: SiteSim, filt: str, shape, pixscale: float, stars: Table,
                     galaxy: dict, seeing0: float, epoch: float, gain: float, rdnoise: float, seed: int) -> Path:
    """Named as subtract.yaml's patterns find it: the first (ref_7DT_<obj>_*) is the one for a site's
    own deep stack."""
    exptime = N_COMBINE * site.exptime
    band = RefBand(site.field, filt, exptime, frame_zp(site, filt, exptime, REF_AIRMASS), zp100(site, filt),
                   sky_mag(site, filt), star_mags(stars, filt, site.refcat),
                   object_mag(galaxy["mag_g"], galaxy["bp_rp"], filt, site.refcat), obs, "EGAIN",
                   "mag (AB) = ZP - 2.5 log10(ADU)")
    return deep_reference(out / "ref_frame" / filt / f"ref_7DT_{site.field}_{filt}_{obs}_deep.fits", band,
                          model.rng_for(seed, "ref", obs, site.field, filt, *shape), FIELDS[site.field], shape,
                          pixscale, stars, galaxy, seeing0, epoch, gain, rdnoise)
