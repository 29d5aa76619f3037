"""Raw headers: normalisation onto the 7DT vocabulary, and what the planner needs of a frame.

Every telescope of the network spells IMAGETYP and FILTER its own way (config/header_rules.yaml
maps them). The header wins over the file name when they disagree; the disagreement is logged.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import astropy.units as u
from astropy.coordinates import Angle, SkyCoord
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.time import Time

from . import config, log
from .errors import BadInputError
from .names import parse_raw_name

_log = log.get("headers")

BLOCK = 2880  # FITS files are whole multiples of this many bytes
MAX_EXPTIME_S = 43200.0  # no exposure is longer than a night: a larger EXPTIME is a broken header


def _norm(value) -> str:
    return str(value).strip().lower()


def _first(header: fits.Header, keys, skip=()) -> object | None:
    for key in keys:
        if key in header and header[key] is not None and _norm(header[key]) not in skip:
            return header[key]
    return None


def normalise_imagetyp(value) -> str | None:
    if value is None:
        return None
    v = _norm(value)
    for canonical, aliases in config.header_rules()["imagetyp"].items():
        if v == canonical.lower() or v in (_norm(a) for a in aliases):
            return canonical
    return None


def normalise_filter(value) -> str | None:
    if value is None:
        return None
    rules = config.header_rules()
    raw = str(value).strip()
    v = _norm(raw)
    for canonical, aliases in rules.get("filters", {}).items():
        if v in (_norm(a) for a in aliases):
            return canonical
    for canonical, prefixes in rules.get("filter_prefixes", {}).items():
        if any(v.startswith(_norm(p)) for p in prefixes):
            return canonical
    return raw


def _site_rules(site: str | None) -> dict:
    if not site:
        return {}
    sites = config.header_rules().get("sites") or {}
    return next((v or {} for k, v in sites.items() if str(k).upper() == site.upper()), {})


def _apply_site_fixes(header: fits.Header, site: str | None) -> fits.Header:
    """gpPy's ``changehdr.dat``: keys a site writes wrong, set right (``sites.<OBS>.set``), and its
    filter wheel's digits named (``sites.<OBS>.filter_wheel``). The value written is kept as
    ``<KEY>ORI`` where one is rewritten."""
    rules = _site_rules(site)
    out = header.copy()
    for key, value in (rules.get("set") or {}).items():
        key = str(key).upper()
        if key in out and str(out[key]).strip() != str(value):
            out[f"{key[:5]}ORI"] = (str(out[key]), f"{key} as the telescope wrote it")
        out[key] = value
    wheel = {str(k).strip(): str(v) for k, v in (rules.get("filter_wheel") or {}).items()}
    if wheel and "FILTER" in out and str(out["FILTER"]).strip() in wheel:
        out["FILTORI"] = (str(out["FILTER"]), "FILTER as the telescope wrote it")
        out["FILTER"] = wheel[str(out["FILTER"]).strip()]
    return out


def normalise(header: fits.Header, source: str = "", site: str | None = None) -> fits.Header:
    """A copy of ``header`` with IMAGETYP, FILTER, EXPTIME, DATE-OBS... in the 7DT vocabulary.

    ``site`` (an observatory of the registry) applies that site's rules of header_rules.yaml first.
    Keys are only added or rewritten, never dropped, so nothing the telescope wrote is lost.
    """
    rules = config.header_rules()
    header = _apply_site_fixes(header, site)
    out = header.copy()
    aliases = rules["key_aliases"]
    empty = {_norm(x) for x in rules.get("filter_empty", [])}
    for key, candidates in aliases.items():
        value = _first(header, candidates, skip=empty if key == "FILTER" else ())
        if key == "EGAIN" and "EGAIN" not in header and not plausible_gain(value):
            continue  # 7DT's GAIN is the camera setting (2750), not e-/ADU: the registry's gain serves
        if value is None:
            continue
        if key == "IMAGETYP":
            canonical = normalise_imagetyp(value)
            if canonical is None:
                raise BadInputError(f"unknown IMAGETYP {value!r}: add it to config/header_rules.yaml", path=source)
            if _norm(value) != canonical.lower():
                out["IMAGEORI"] = (str(value), "IMAGETYP as the telescope wrote it")
            value = canonical
        elif key == "FILTER":
            canonical = normalise_filter(value)
            if canonical != str(value).strip():
                out["FILTORI"] = (str(value), "FILTER as the telescope wrote it")
            value = canonical
        if key not in header or header[key] != value:
            out[key] = value
    return out


def plausible_gain(value) -> bool:
    """A GAIN that can be e-/ADU (other telescopes write it so), not a camera's gain setting."""
    try:
        return 0.0 < float(value) < 50.0
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class FrameInfo:
    """What the planner knows of one raw frame, from its header (and its name, for checks)."""

    url: str
    name: str
    imagetyp: str
    filter: str | None
    exptime: float
    date_obs: str  # ISO UTC
    mjd: float
    unit: str
    object: str
    binning: int
    gain: int | None
    camera: str
    shape: tuple[int, int]  # (rows, columns)
    size: int
    egain: float | None = None  # e-/ADU: the header's where plausible, else the registry's
    rdnoise: float | None = None  # e-: likewise

    @property
    def when(self) -> datetime:
        return datetime.fromisoformat(self.date_obs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _parse_date(value, source: str) -> datetime:
    try:
        t = Time(str(value).strip(), format="isot", scale="utc")
    except ValueError:
        try:
            t = Time(str(value).strip(), scale="utc")
        except ValueError:
            raise BadInputError(f"DATE-OBS {value!r} is not an ISO date", path=source) from None
    return t.to_datetime(timezone.utc).replace(tzinfo=None)


def classify_untyped(h: fits.Header, source: str) -> str:
    """IMAGETYP of a frame whose software wrote none (some MaxIm, SBIG and Andor setups):

    1. an OBJECT that names a calibration (``bias``, ``zero``, ``dark``, ``flat``, ``skyflat``...,
       as header_rules.yaml's ``imagetyp`` lists them, or starting with one: ``flat_R``) is that;
    2. else an exposure of 0 s is a BIAS;
    3. else a frame with an OBJECT is a LIGHT;
    4. else it cannot be told (a dark and an unnamed light look alike): BadInputError.
    """
    obj = str(h.get("OBJECT", "") or "").strip()
    words = obj.lower().replace("-", "_").replace(" ", "_").split("_")
    for candidate in (obj, words[0] if words else ""):
        kind = normalise_imagetyp(candidate) if candidate else None
        if kind in ("BIAS", "DARK", "FLAT"):
            return kind
    try:
        if float(h.get("EXPTIME", -1)) == 0:
            return "BIAS"
    except (TypeError, ValueError):
        pass
    if obj:
        return "LIGHT"
    raise BadInputError("header has no IMAGETYP and no OBJECT to tell the frame's type from", path=source)


def _header_or_registry(h: fits.Header, key: str, default: float | None) -> float | None:
    value = h.get(key)
    return float(value) if plausible_gain(value) or (key == "RDNOISE" and _positive(value)) else default


def _positive(value) -> bool:
    try:
        return 0.0 < float(value) < 1000.0
    except (TypeError, ValueError):
        return False


def frame_info(header: fits.Header, url: str, size: int, expected_shape: tuple[int, int] | None = None,
               site: config.Site | None = None) -> FrameInfo:
    """Check a raw header and describe the frame. Bad frames raise BadInputError with the reason.

    ``site`` is the registry row of the observatory whose night folder holds the frame. At a site
    that is not TCSpy's (``header_dialect`` other than ``tcspy``: MaxIm DL, SBIG, Andor, FLI,
    KMTNet) the folder says which site took the frame (TELESCOP there is free text), a missing
    IMAGETYP is told from OBJECT and exposure (:func:`classify_untyped`), and GAIN is e-/ADU.
    """
    name = url.rstrip("/").rsplit("/", 1)[-1]
    foreign = site is not None and site.header_dialect != "tcspy"
    h = normalise(header, url, site=site.obs if site is not None else None)
    if foreign and "IMAGETYP" not in h:
        h["IMAGETYP"] = (classify_untyped(h, url), "told from OBJECT/EXPTIME (no IMAGETYP)")
    for key in ("IMAGETYP", "DATE-OBS"):
        if key not in h:
            raise BadInputError(f"header has no {key}", path=url)
    exptime = _checked_exptime(h, url)
    when = _parse_date(h["DATE-OBS"], url)
    shape, binning = _checked_shape(h, url, expected_shape)
    _check_not_truncated(h, shape, size, url)
    imagetyp = h["IMAGETYP"]
    filt = h.get("FILTER")
    unit, obj = _unit_and_object(h, name, imagetyp, filt, exptime)
    mjd = float(h["MJD"]) if "MJD" in h else Time(when).mjd
    gain = h.get("GAIN")
    egain = rdnoise = None
    if foreign:
        unit, gain = site.obs, None  # the site's GAIN is e-/ADU, not a camera setting to group by
        egain = _header_or_registry(h, "EGAIN", site.instrument.gain)
        rdnoise = _header_or_registry(h, "RDNOISE", site.instrument.rdnoise)
    return FrameInfo(
        url=url,
        name=name,
        imagetyp=imagetyp,
        filter=None if filt is None else str(filt),
        exptime=exptime,
        date_obs=when.isoformat(timespec="milliseconds"),
        mjd=mjd,
        unit=unit,
        object=obj,
        binning=binning,
        gain=int(gain) if isinstance(gain, (int, float)) and float(gain).is_integer() else None,
        camera=str(h.get("INSTRUME", "")).strip(),
        shape=shape,
        size=size,
        egain=egain,
        rdnoise=rdnoise,
    )


def _checked_exptime(h: fits.Header, url: str) -> float:
    if "EXPTIME" not in h:
        raise BadInputError("header has no EXPTIME (nor EXPOSURE)", path=url)
    try:
        exptime = float(h["EXPTIME"])
    except (TypeError, ValueError):
        raise BadInputError(f"EXPTIME {h['EXPTIME']!r} is not a number", path=url) from None
    if not math.isfinite(exptime) or exptime < 0 or exptime > MAX_EXPTIME_S:
        raise BadInputError(f"EXPTIME {exptime} is not a valid exposure (0 to {MAX_EXPTIME_S:g} s)", path=url)
    if exptime == 0 and h["IMAGETYP"] in ("LIGHT", "DARK", "FLAT"):
        # the dark would be scaled by 0 and the stack would record exposure it does not hold
        raise BadInputError(f"a {h['IMAGETYP']} frame with EXPTIME 0 has no exposure", path=url)
    return exptime


def _checked_shape(h: fits.Header, url: str,
                   expected_shape: tuple[int, int] | None) -> tuple[tuple[int, int], int]:
    """The image's (rows, columns) and binning, checked against the detector's unbinned shape."""
    naxis = int(h.get("NAXIS", 0))
    if naxis != 2:
        raise BadInputError(f"expected a 2-D image in the primary HDU, found NAXIS={naxis}", path=url)
    shape = (int(h["NAXIS2"]), int(h["NAXIS1"]))
    binning = int(h.get("XBINNING", 1) or 1)
    if expected_shape is not None:
        want = (expected_shape[0] // binning, expected_shape[1] // binning)
        if shape != want:
            raise BadInputError(f"image is {shape[1]}x{shape[0]} but the detector is {want[1]}x{want[0]} at {binning}x{binning}", path=url)
    return shape, binning


def _check_not_truncated(h: fits.Header, shape: tuple[int, int], size: int, url: str) -> None:
    # A truncated upload is the commonest bad frame: FITS files are whole 2880-byte blocks and
    # at least as long as their data. Checking sizes costs nothing and needs no download.
    data_bytes = abs(int(h.get("BITPIX", 16))) // 8 * shape[0] * shape[1]
    if size and (size % BLOCK or size < data_bytes + BLOCK):
        raise BadInputError(f"file is truncated ({size} bytes; the header promises {data_bytes} bytes of data)", path=url)


def _unit_and_object(h: fits.Header, name: str, imagetyp: str, filt, exptime: float) -> tuple[str, str]:
    """TELESCOP and OBJECT, filled from the file name where the header leaves them empty.

    Where name and header disagree the header wins and the disagreement is logged.
    """
    unit = str(h.get("TELESCOP", "")).strip()
    obj = str(h.get("OBJECT", "")).strip()
    try:
        from_name = parse_raw_name(name)
    except BadInputError:
        return unit, obj
    checks = {
        "unit": (from_name.unit, unit),
        "object": (from_name.object, obj if imagetyp == "LIGHT" else imagetyp),
        "filter": (from_name.filter, filt),
        "exptime": (from_name.exptime, round(exptime, 1)),
        "imagetyp": (from_name.imagetyp, imagetyp),
    }
    for what, (by_name, by_header) in checks.items():
        if by_header not in (None, "") and str(by_name) != str(by_header):
            if what == "filter" and imagetyp in ("BIAS", "DARK"):
                continue  # TCSpy names biases and darks with whatever filter is in the beam
            log.event(_log, "file name and header disagree; the header wins", file=name, key=what,
                      name_value=by_name, header_value=by_header)
    return unit or from_name.unit, obj or from_name.object


# Where each dialect writes the pointing, in order: MaxIm's and TCSpy's target (sexagesimal text),
# then the mount's (degrees, or text at some MaxIm sites)
POINTING_KEYS = (("OBJCTRA", "OBJCTDEC"), ("RA", "DEC"))


def pointing(header: fits.Header) -> SkyCoord | None:
    """The frame's pointing (ICRS) from OBJCTRA/OBJCTDEC or RA/DEC, or None where neither pair
    is there or readable. Text is sexagesimal (``hh mm ss.s``/``hh:mm:ss.s`` and ``+dd mm ss``),
    right ascension in hours; a number is degrees."""
    for ra_key, dec_key in POINTING_KEYS:
        c = _coordinate(header.get(ra_key), header.get(dec_key))
        if c is not None:
            return c
    return None


def _coordinate(ra, dec) -> SkyCoord | None:
    if ra in (None, "") or dec in (None, "") or isinstance(ra, bool) or isinstance(dec, bool):
        return None
    try:
        if isinstance(ra, str) and len(ra.replace(":", " ").split()) > 1:
            a = Angle(":".join(ra.replace(":", " ").split()), unit=u.hourangle)
            d = Angle(":".join(str(dec).replace(":", " ").split()), unit=u.deg)
        else:
            a, d = Angle(float(ra), unit=u.deg), Angle(float(dec), unit=u.deg)
    except (ValueError, TypeError):
        return None
    if not (0.0 <= a.deg < 360.0 and -90.0 <= d.deg <= 90.0):
        return None
    return SkyCoord(a, d, frame="icrs")


def header_from_bytes(blob: bytes, source: str) -> tuple[fits.Header, list[str]]:
    """A header from the bytes of a FITS header or a TCSpy ``.head`` sidecar (one card per line),
    and what had to be repaired in it.

    A byte outside ASCII (a degree sign in a comment, say) breaks no key the pipeline reads: it
    becomes ``?``, as astropy does when it opens the file, and the frame is kept with a warning.
    """
    notes = []
    text = blob.decode("ascii", "replace")
    if "\ufffd" in text:
        text = text.replace("\ufffd", "?")
        notes.append(f"{_basename(source)}: non-ASCII bytes in the header were replaced by '?'")
        log.event(_log, "non-ASCII bytes in a header replaced by '?'", level=30, file=source)
    sep = "\n" if "\n" in text else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VerifyWarning)
            header = fits.Header.fromstring(text, sep=sep)
    except (ValueError, IndexError) as exc:
        raise BadInputError(f"unreadable FITS header ({exc})", path=source) from None
    return header, notes


def _basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]
