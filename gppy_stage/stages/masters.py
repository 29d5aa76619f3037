"""The masters stage: one calibration set -> master bias, darks (per exposure) and flats (per filter).

Frames are combined in row chunks read through memory maps, so nine 61-Mpix frames combine in a
few hundred MB (the bench measures peak RSS). Each master gets QA keys and a verdict, and a
sidecar that is its entry in the master library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import numpy as np
from astropy.io import fits
from astropy.time import Time

from .. import config, library, log, names, storage
from ..errors import BadInputError
from ..fitsio import RawFrame, combine_files, open_raw, put_hdul, read_hdul
from ..headers import normalise
from ..science import fringe, frame_qa, overscan
from ..science.combine import clipped_stats
from ..xp import device_name, get_xp
from .base import Night, Timer, input_hash, is_done, product_identity, stamp_provenance, write_sidecar
from .reduce import calibrated, defringe_settings, overscan_settings, resolve_masters

_log = log.get("masters")


def _mean_mjd(frames: list[RawFrame]) -> float:
    mjds = []
    for f in frames:
        h = _observation(f)
        if "MJD" in h:
            mjds.append(float(h["MJD"]))
        elif "DATE-OBS" in h:
            mjds.append(Time(h["DATE-OBS"], scale="utc").mjd)
    return float(np.mean(mjds)) if mjds else float("nan")


def _observation(frame: RawFrame, site: str | None = None) -> fits.Header:
    """The frame's header in the 7DT vocabulary (EXPTIME from EXPOSURE or ITIME...), as the
    planner read it; with ``site``, after that site's header rules."""
    return normalise(frame.header, frame.url, site=site)


def _header(kind: str, calset: dict, inputs: list[str], frames: list[RawFrame], qa: dict, extra: dict) -> fits.Header:
    h = fits.Header()
    first = frames[0].header
    for key in ("TELESCOP", "INSTRUME", "GAIN", "EGAIN", "XBINNING", "YBINNING", "CCD-TEMP", "SET-TEMP"):
        if key in first:
            h[key] = first[key]
    mjd = _mean_mjd(frames)
    h["IMAGETYP"] = {"zero": "BIAS", "dark": "DARK", "flat": "FLAT"}[kind]
    h["OBSTYPE"] = (f"master {kind}", "gppy-stage master frame")
    h["MJD"] = (mjd, "mean MJD of the inputs")
    h["DATE-OBS"] = (Time(mjd, format="mjd").isot, "mean time of the inputs")
    for key, value in extra.items():
        h[key] = value
    h["NCOMBINE"] = (len(inputs), "frames combined")
    h["COMBINE"] = ("sigclip-median", "combination method")
    h["CLIPMED"] = (qa["clipped_median"], "sigma-clipped median of the master")
    h["CLIPSTD"] = (qa["clipped_std"], "sigma-clipped std of the master")
    h["QAVERDCT"] = (qa["verdict"], "master QA verdict")
    stamp_provenance(h)
    h["CALSET"] = calset["id"]
    for i, key in enumerate(inputs):
        h[f"INPUT{i + 1:03d}"] = storage.basename(key)
    return h


def _qa(kind: str, image: np.ndarray, reg: config.Instrument, levels: list[float] | None = None) -> dict:
    cfg = config.settings("masters")["qa"]
    med, std = clipped_stats(image)
    qa = {"clipped_median": round(med, 4), "clipped_std": round(std, 4), "verdict": "good", "reasons": []}
    if kind == "zero":
        if reg.bias_min is not None and reg.bias_max is not None and not reg.bias_min <= med <= reg.bias_max:
            qa["reasons"].append(f"median {med:.2f} ADU outside {reg.bias_min:g}-{reg.bias_max:g}")
        if reg.bias_std_max is not None and std > reg.bias_std_max:
            qa["reasons"].append(f"std {std:.2f} ADU above {reg.bias_std_max:g}")
    if kind == "flat" and levels:
        bad = [lv for lv in levels if not cfg["flat_median_min_adu"] <= lv <= cfg["flat_median_max_adu"]]
        if bad:
            qa["reasons"].append(f"{len(bad)} input flats with levels outside the allowed range: {bad}")
    if qa["reasons"]:
        qa["verdict"] = "bad"
    return qa


class _Masters:
    """State of one calibration set while its masters are made (the bias feeds darks and flats)."""

    def __init__(self, ctx: Night, calset: dict):
        self.ctx, self.calset = ctx, calset
        self.cfg = config.settings("masters")
        self.xp = get_xp()
        listing = storage.list_objects(ctx.url(ctx.raw_prefix))
        self.sizes = {f"{ctx.raw_prefix}/{o.key}": o.size for o in listing}

    def _load(self, key: str) -> np.ndarray:
        with read_hdul(self.ctx.url(key)) as hdul:
            return np.asarray(hdul[0].data, dtype=np.float32)

    def _support(self, kind: str, exptime: float | None = None) -> tuple[str, float | None] | None:
        """Tonight's good master of a kind if made, else the library's nearest (key, exptime)."""
        cs = self.calset
        found = library.find(self.ctx.root, cs["unit"], kind, mjd=cs["mjd"], binning=cs["binning"], gain=cs["gain"],
                             exptime=exptime)
        return (found.key, found.exptime) if found else None

    def _supports(self, kind: str) -> dict:
        """The masters a kind is made with: a bias for darks and flats, a scalable dark for flats."""
        support: dict = {}
        if kind in ("dark", "flat"):
            zero = self._support("zero")
            if zero is None:
                raise BadInputError(f"no master bias for calibration set {self.calset['id']}: cannot make the {kind}")
            support["zero"] = zero[0]
        if kind == "flat":
            dark = self._support("dark", exptime=None)
            if dark is not None and dark[1]:  # a dark without an exposure time cannot be scaled
                support["dark"], support["dark_exptime"] = dark
        return support

    def _work(self, kind: str, entry: dict, support: dict) -> str:
        unit = self.calset["unit"]
        inputs = [{"key": k, "size": self.sizes.get(k)} for k in entry["frames"]]
        used = [product_identity(self.ctx, support[k]) for k in ("zero", "dark") if k in support]
        settings = {k: self.cfg[k] for k in ("sigma", "iterations")} | {"qa": self.cfg["qa"]} | \
            {"instrument": dataclasses.asdict(config.instrument(unit))}
        if overscan_settings(unit) is not None:  # none for 7DT: its hashes stay as they were
            settings["overscan"] = overscan_settings(unit)
        return input_hash(f"masters/{kind}", inputs + [support] + used, settings)

    def _kind_cards(self, kind: str, entry: dict, image, frames: list) -> dict:
        """The cards of one kind of master (a flat is normalised here, in place, to its median)."""
        extra = {}
        if kind == "flat":
            norm = float(np.nanmedian(image[::4, ::4]))
            image /= norm
            extra["FILTER"] = entry["filter"]
            extra["FLATNORM"] = (norm, "median the master was divided by")
        if kind == "dark":
            extra["EXPTIME"] = (entry["exptime"], "exposure of the darks (s)")
            gain = float(frames[0].header.get("EGAIN", config.instrument(self.calset["unit"]).gain))
            hot = int(np.count_nonzero(image * gain / max(entry["exptime"], 1e-3)
                                       > config.settings("reduce")["hot_dark_rate"]))
            extra["NHOTPIX"] = (hot, "pixels above the hot dark-rate threshold")
        if kind == "zero":
            extra["EXPTIME"] = 0.0
        return extra

    def build(self, kind: str, entry: dict) -> dict:
        ctx, cs = self.ctx, self.calset
        output = entry["output"]
        support = self._supports(kind)
        work = self._work(kind, entry, support)
        url = ctx.url(output)
        if is_done(url, work, ctx.force):
            log.event(_log, "already made from the same inputs and settings", master=output)
            return {"kind": kind, "output": output, "skipped": True}
        timer = Timer()
        bias = self._load(support["zero"]) if "zero" in support else None
        dark = self._load(support["dark"]) if "dark" in support else None
        with contextlib.ExitStack() as stack:
            fit_order = config.settings("overscan")["fit_order"]
            # overscan-subtracted and trimmed as the science frames will be, so the shapes agree
            opened = [overscan.prepare(f, _observation(f, cs["unit"]), fit_order)
                      for f in (stack.enter_context(open_raw(ctx.url(k))) for k in entry["frames"])]
            kept, levels, rejected = self._screen(kind, entry["frames"], opened, bias, dark,
                                                  support.get("dark_exptime"))
            frames = [opened[entry["frames"].index(k)] for k in kept]
            exptimes = [_exptime(f) for f in frames]  # once, not for every chunk
            scales = levels if kind == "flat" else [1.0] * len(frames)
            levels = [round(lv, 1) for lv in levels] if kind == "flat" else None

            def prepare(rows, start, stop, i):
                if bias is not None:
                    rows -= bias[start:stop]
                if kind == "flat" and dark is not None:
                    rows -= dark[start:stop] * (exptimes[i] / support["dark_exptime"])
                if scales[i] != 1.0:
                    rows /= scales[i]
                return rows

            image, fewest = combine_files(frames, prepare, sigma=self.cfg["sigma"], iterations=self.cfg["iterations"],
                                          chunk_rows=int(self.cfg["chunk_rows"]), xp=self.xp)
            extra = self._kind_cards(kind, entry, image, frames)
            qa = _qa(kind, image, config.instrument(cs["unit"]), levels)
            if isinstance(frames[0], overscan.Prepared):
                extra.update({k: v for k, v in frames[0].cards(fit_order).items() if k != "OVERSCAN"})
            for name, key in (("zero", "MASTBIAS"), ("dark", "MASTDARK")):
                if name in support:
                    extra[key] = storage.basename(support[name])
            header = _header(kind, cs, kept, frames, qa, extra)
            header["NMINUSED"] = (fewest, "fewest frames kept at any pixel after clipping")
            header["NREJECT"] = (len(rejected), "inputs rejected by per-frame QA (REJnnn)")
            for i, rej in enumerate(rejected):
                header[f"REJ{i + 1:03d}"] = (storage.basename(rej["file"]), rej["reason"][:40])
            mjd = float(header["MJD"])
        put_hdul(url, fits.HDUList([fits.PrimaryHDU(image.astype(np.float32), header)]))
        write_sidecar(url, work, kind=kind, unit=cs["unit"], night=cs["night"], calset=cs["id"], mjd=mjd,
                      binning=cs["binning"], gain=cs["gain"], camera=cs["camera"], exptime=entry.get("exptime", 0.0 if kind == "zero" else None),
                      filter=entry.get("filter"), qa=qa, inputs=kept, rejected=rejected, support=support,
                      device=device_name(self.xp))
        log.event(_log, "master made", master=output, verdict=qa["verdict"], ncombine=len(frames),
                  median=qa["clipped_median"], std=qa["clipped_std"], seconds=timer.seconds)
        return {"kind": kind, "output": output, "verdict": qa["verdict"], "reasons": qa["reasons"],
                "ncombine": len(frames), "rejected": rejected, "seconds": timer.seconds}

    def _screen(self, kind: str, keys: list[str], frames: list[RawFrame], bias, dark, dark_exptime):
        """Judge each input on its own (science/frame_qa.py) and keep the good ones. Returns the
        keys kept, their levels (flats: median after bias/dark, the scale each is divided by)
        and the rejected ones by name with the reason. Too few left: no master, and why."""
        reg, qa = config.instrument(self.calset["unit"]), self.cfg["qa"]
        kept, levels, rejected = [], [], []
        for key, f in zip(keys, frames):
            step = frame_qa.grid_step(f.shape)
            sample = np.stack([f.rows(r, r + 1)[0, ::step] for r in range(0, f.shape[0], step)])
            stats = frame_qa.sample_stats(sample)
            gain = float(f.header.get("EGAIN", reg.gain))
            level = None
            if kind == "zero":
                reasons = frame_qa.bias_reasons(stats, bias_min=reg.bias_min, bias_max=reg.bias_max,
                                                rdnoise_e=reg.rdnoise, gain=gain, qa=qa)
            elif kind == "dark":
                reasons = frame_qa.dark_reasons(stats, exptime=_exptime(f), bias_min=reg.bias_min,
                                                bias_max=reg.bias_max, rdnoise_e=reg.rdnoise, gain=gain,
                                                dark_e_per_s=reg.dark, qa=qa)
            else:
                if bias is not None:
                    sample -= bias[::step, ::step]
                if dark is not None and dark_exptime:
                    sample -= dark[::step, ::step] * (_exptime(f) / dark_exptime)
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN flat: its reason says so
                    level = float(np.nanmedian(sample))
                reasons = frame_qa.flat_reasons(stats, level, qa)
            if reasons:
                rejected.append({"file": key, "reason": "; ".join(reasons), **stats})
                log.event(_log, "input frame rejected", level=30, file=storage.basename(f.url),
                          reason="; ".join(reasons))
                continue
            kept.append(key)
            levels.append(level)
        need = int(self.cfg["min_frames"])
        if len(kept) < need:
            named = "; ".join(f"{storage.basename(r['file'])}: {r['reason']}" for r in rejected)
            raise _TooFewInputs(f"only {len(kept)} of {len(frames)} {kind} frames passed QA (a master needs "
                                f"{need}): {named}", rejected)
        return kept, levels, rejected

    def fringe(self, filt: str, science: list[dict], cfg: dict) -> dict:
        """The master fringe frame of one band from the night's science frames of this set's
        binning and gain (science/fringe.py), with its scale pairs as a PAIRS table."""
        ctx, cs = self.ctx, self.calset
        night = names.parse_night(cs["night"], config.site(cs["unit"]).night_folder)
        output = library.fringe_name(cs["unit"], night.date, cs["binning"], cs["gain"], filt, too=night.too)
        chosen, used, rejected = [], {}, []
        for f in sorted(science, key=lambda f: f["mjd"]):
            try:
                used[f["id"]] = resolve_masters(ctx, f)
            except BadInputError as exc:  # its masters failed: reduce quarantines it, the others go on
                rejected.append({"file": f["raw"], "reason": exc.reason})
                continue
            chosen.append(f)
        chosen = chosen[: int(cfg["max_frames"])]
        support = sorted({k for f in chosen for k in used[f["id"]].values()})
        inputs = [{"key": f["raw"], "size": self.sizes.get(f["raw"])} for f in chosen]
        settings = {"defringe": cfg, "overscan": overscan_settings(cs["unit"]), "reduce": config.settings("reduce"),
                    "sigma": self.cfg["sigma"], "iterations": self.cfg["iterations"]}
        work = input_hash("masters/fringe", inputs + [product_identity(ctx, k) for k in support], settings)
        url = ctx.url(output)
        if is_done(url, work, ctx.force):
            log.event(_log, "already made from the same inputs and settings", master=output)
            return {"kind": library.FRINGE, "output": output, "skipped": True}
        timer = Timer()
        relative, kept, mjds = [], [], []
        for f in chosen:
            try:
                cal, _, _ = calibrated(ctx, f, used[f["id"]])
                relative.append(fringe.relative_sky(np.where(cal.mask == 0, cal.data, np.nan))[0])
            except (BadInputError, ValueError) as exc:  # the frame is named again, and quarantined, by reduce
                reason = getattr(exc, "reason", str(exc))
                rejected.append({"file": f["raw"], "reason": reason})
                log.event(_log, "frame left out of the master fringe", level=30, file=f["raw"], reason=reason)
                continue
            kept.append(f["raw"])
            mjds.append(f["mjd"])
        if len(kept) < int(cfg["min_frames"]):
            raise BadInputError(f"only {len(kept)} {filt} frames could be calibrated for the master fringe "
                                f"(it needs {cfg['min_frames']})")
        image = fringe.build_master(relative, sigma=self.cfg["sigma"], iterations=self.cfg["iterations"])
        del relative
        pairs = fringe.choose_pairs(image, grid=int(cfg["grid"]), box=int(cfg["box"]))
        mjd = float(np.mean(mjds))
        header = _fringe_header(cs, filt, mjd, kept, len(pairs))
        table = fits.BinTableHDU.from_columns(
            [fits.Column(name=n, format="J", array=pairs[:, i]) for i, n in enumerate(("YBRIGHT", "XBRIGHT", "YDARK", "XDARK"))],
            name="PAIRS")
        put_hdul(url, fits.HDUList([fits.PrimaryHDU(image, header), table]))
        write_sidecar(url, work, kind=library.FRINGE, unit=cs["unit"], night=cs["night"], calset=cs["id"], mjd=mjd,
                      binning=cs["binning"], gain=cs["gain"], camera=cs["camera"], exptime=None, filter=filt,
                      qa={"verdict": "good", "reasons": []}, inputs=kept, rejected=rejected, support=support)
        log.event(_log, "master made", master=output, ncombine=len(kept), pairs=len(pairs), seconds=timer.seconds)
        return {"kind": library.FRINGE, "output": output, "ncombine": len(kept), "rejected": rejected,
                "seconds": timer.seconds}


def _fringe_header(cs: dict, filt: str, mjd: float, kept: list[str], npairs: int) -> fits.Header:
    header = fits.Header()
    header["IMAGETYP"] = "FRINGE"
    header["OBSTYPE"] = ("master fringe", "gppy-stage master frame")
    header["FILTER"] = filt
    header["MJD"] = (mjd, "mean MJD of the inputs")
    header["DATE-OBS"] = (Time(mjd, format="mjd").isot, "mean time of the inputs")
    header["BUNIT"] = ("sky", "fringe as a fraction of the sky, median 0")
    header["XBINNING"] = header["YBINNING"] = cs["binning"]
    header["NCOMBINE"] = (len(kept), "science frames combined")
    header["NPAIRS"] = (npairs, "bright/dark pairs the scale is measured on")
    stamp_provenance(header)
    header["CALSET"] = cs["id"]
    for i, key in enumerate(kept):
        header[f"INPUT{i + 1:03d}"] = storage.basename(key)
    return header


def _fringe_bands(ctx: Night, cs: dict) -> list[tuple[str, list[dict], dict]]:
    """The bands of tonight's science frames (of this set's binning, gain and camera) that the
    site defringes, with those frames, when there are enough of them for a master."""
    by_band: dict[str, list[dict]] = {}
    for f in ctx.plan()["frames"]:
        if (f["binning"], f["gain"], f["camera"]) == (cs["binning"], cs["gain"], cs["camera"]):
            by_band.setdefault(f["filter"], []).append(f)
    out = []
    for filt, frames in sorted(by_band.items(), key=lambda kv: str(kv[0])):
        cfg = defringe_settings(cs["unit"], filt)
        if cfg is None:
            continue
        if len(frames) < int(cfg["min_frames"]):
            log.event(_log, "too few frames for a master fringe tonight: the library's is used", filter=filt,
                      frames=len(frames), need=cfg["min_frames"])
            continue
        out.append((filt, frames, cfg))
    return out


class _TooFewInputs(BadInputError):
    """Too few inputs of a master passed per-frame QA; carries the rejected ones."""

    def __init__(self, message: str, rejected: list[dict]):
        super().__init__(message)
        self.rejected = rejected


def _exptime(frame: RawFrame) -> float:
    return float(_observation(frame).get("EXPTIME", 0.0))


def run(ctx: Night, calset: str) -> dict:
    """Make every master of one calibration set: bias first (darks and flats use it), then darks, flats."""
    cs = ctx.item("calset", calset)
    maker = _Masters(ctx, cs)
    results, failed = [], []
    jobs = ([("zero", cs["zero"])] if cs["zero"] else []) + [("dark", d) for d in cs["darks"]] + \
        [("flat", f) for f in cs["flats"]]
    for kind, entry in jobs:
        try:
            results.append(maker.build(kind, entry))
        except BadInputError as exc:
            # One bad set of flats must not cost the night its bias and darks.
            # the master's kind, not the error's ("bad_input"), which as_record would put in its place
            failed.append({**exc.as_record(), "kind": kind, "output": entry["output"],
                           "rejected": getattr(exc, "rejected", [])})
            log.event(_log, "master not made", master=entry["output"], reason=exc.reason)
    # after the flats: the science frames of a fringing band are flat-fielded before they combine
    for filt, frames, cfg in _fringe_bands(ctx, cs):
        try:
            results.append(maker.fringe(filt, frames, cfg))
        except BadInputError as exc:
            failed.append({**exc.as_record(), "kind": library.FRINGE, "output": filt, "rejected": []})
            log.event(_log, "master not made", master=f"fringe {filt}", reason=exc.reason)
    if failed and not results:
        raise BadInputError(f"no master of calibration set {calset} could be made: {failed[0]['reason']}")
    return {"calset": calset, "masters": results, "failed": failed}
