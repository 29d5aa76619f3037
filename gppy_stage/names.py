"""File and folder names of the 7DT system (see docs/7DT.md, "Names and folders").

Raw frame:   <UNIT>_<YYYYMMDD>_<HHMMSS>_<OBJECT>_<FILTER>_<XBIN>x<YBIN>_<EXPTIME>s_<NNNN>.fits
Night:       <YYYY-MM-DD>_gain2750 | <YYYY-MM-DD>_ToO_gain2750 | <YYYY-MM-DD>_gain2750_ToO | ..._1x1
             (IMSNG/GECKO sites: <YYYY>_<MMDD> | <YYYYMMDD> | <YYYY-MM-DD>, per registry row)
Processed:   calib_<unit>_<field>_<YYYYMMDD>_<HHMMSS>_<filter>_<exptime>.fits
             (IMSNG/GECKO sites, as gpPy writes them: Calib-<OBS>-<OBJECT>-<YYYYMMDD>-<HHMMSS>-<filter>-<exptime>.fits,
             stacks ...-<total>com.fits, differences hd<stack>, convolved references hc<stack>)

Every product name is made here: the plan names frames and stacks, the stages name what they
derive from them (:func:`difference_keys`, :func:`phot_keys`, :func:`candidate_keys`,
:func:`weight_key`), and :func:`convention` says, from the registry's ``header_dialect``, whether
a site's products take 7DT's names or gpPy's.

OBJECT may itself contain ``_``, so raw names are split from both ends.

Header values (OBJECT, FILTER, unit, night) are data from a telescope, never paths: every builder
below passes them through :func:`safe_name`, so no header can make a name that leaves its folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from .errors import BadInputError, ConfigError

_RAW_HEAD = re.compile(r"^(?P<unit>[A-Za-z0-9]+?)_(?P<date>\d{8})_(?P<time>\d{6})_(?P<rest>.+)$")
_RAW_TAIL = re.compile(
    r"_(?P<filter>[^_]+)_(?P<xbin>\d+)x(?P<ybin>\d+)_(?P<exptime>\d+(?:\.\d+)?)s_(?P<seq>\d+)$"
)
_NIGHT = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})(?P<flags>(?:_(?:gain\d+|ToO|\d+x\d+|test|[A-Za-z0-9]+))*)$"
)
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fit.fz", ".fits.gz")
_UNSAFE = re.compile(r"[^A-Za-z0-9_+.-]+")
SAFE_MAX = 64


def safe_name(value) -> str:
    """A header value made fit for a file or folder name: ASCII letters, digits and ``_+.-`` only.

    Anything else (slashes, spaces, quotes, shell characters, non-ASCII) becomes ``_``; ``..`` and a
    leading ``.`` or ``-`` go too, so the result is never a parent folder, a hidden file or an
    option to a tool. Names already safe (``T10779``, ``m425``) are returned unchanged.
    """
    text = _UNSAFE.sub("_", str(value if value is not None else "").strip())
    text = re.sub(r"\.{2,}", "_", text).lstrip(".-")[:SAFE_MAX]
    return text or "UNKNOWN"


def strip_fits_suffix(name: str) -> str | None:
    """The stem of a FITS file name, or None when it is not a FITS name."""
    lower = name.lower()
    for suffix in FITS_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


@dataclass(frozen=True)
class RawName:
    unit: str
    date: str  # YYYYMMDD, UTC
    time: str  # HHMMSS, UTC
    object: str
    filter: str
    xbin: int
    ybin: int
    exptime: float
    seq: int

    @property
    def datetime(self) -> datetime:
        return datetime.strptime(self.date + self.time, "%Y%m%d%H%M%S")

    @property
    def imagetyp(self) -> str:
        """What the name implies: calibrations use OBJECT BIAS, DARK or FLAT."""
        return self.object.upper() if self.object.upper() in ("BIAS", "DARK", "FLAT") else "LIGHT"


def parse_raw_name(filename: str) -> RawName:
    """Parse a TCSpy raw frame name (a bare name or a path/URL)."""
    base = filename.rsplit("/", 1)[-1]
    stem = strip_fits_suffix(base)
    if stem is None:
        raise BadInputError("not a FITS file name", path=filename)
    head = _RAW_HEAD.match(stem)
    tail = _RAW_TAIL.search(stem)
    if not head or not tail or tail.start() <= len(head.group("unit")) + 16:
        raise BadInputError(
            "not a TCSpy raw name (<UNIT>_<YYYYMMDD>_<HHMMSS>_<OBJECT>_<FILTER>_<B>x<B>_<EXPTIME>s_<NNNN>)",
            path=filename,
        )
    obj = stem[head.start("rest") : tail.start()]
    return RawName(
        unit=head.group("unit"),
        date=head.group("date"),
        time=head.group("time"),
        object=obj,
        filter=tail.group("filter"),
        xbin=int(tail.group("xbin")),
        ybin=int(tail.group("ybin")),
        exptime=float(tail.group("exptime")),
        seq=int(tail.group("seq")),
    )


def raw_name(unit: str, when: datetime, obj: str, filt: str, binning: int, exptime: float, seq: int) -> str:
    """Build a TCSpy raw frame name (the simulator writes these)."""
    return (f"{safe_name(unit)}_{when:%Y%m%d_%H%M%S}_{safe_name(obj)}_{safe_name(filt)}_{binning}x{binning}_"
            f"{exptime:.1f}s_{seq:04d}.fits")


@dataclass(frozen=True)
class NightName:
    folder: str
    date: str  # YYYY-MM-DD: the UTC date of (DATE-OBS - 12 h)
    gain: int | None
    too: bool
    binning: str | None
    test: bool

    @property
    def day(self) -> date:
        return date.fromisoformat(self.date)


# How IMSNG/GECKO sites write a night folder (the registry's ``night_folder`` column): the date
# alone, as gpPy found them; a ``_test`` or ``_ToO`` tail is accepted as on 7DT.
_SITE_NIGHTS = {
    "YYYY_MMDD": re.compile(r"^(?P<y>\d{4})_(?P<m>\d{2})(?P<d>\d{2})(?P<flags>(?:_(?:ToO|test))*)$"),
    "YYYYMMDD": re.compile(r"^(?P<y>\d{4})(?P<m>\d{2})(?P<d>\d{2})(?P<flags>(?:_(?:ToO|test))*)$"),
    "YYYY-MM-DD": re.compile(r"^(?P<y>\d{4})-(?P<m>\d{2})-(?P<d>\d{2})(?P<flags>(?:_(?:ToO|test))*)$"),
}
NIGHT_PATTERNS = ("YYYY-MM-DD_gain", *_SITE_NIGHTS)


def parse_night(folder: str, pattern: str = "YYYY-MM-DD_gain") -> NightName:
    """Parse a night folder name written the site's way (``pattern``, one of NIGHT_PATTERNS):
    7DT's ``2025-01-01_gain2750``, ``..._ToO``, ``..._1x1``, ``..._test``; or ``2024_0229``,
    ``20240229``, ``2024-02-29`` (IMSNG/GECKO)."""
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    if pattern != "YYYY-MM-DD_gain":
        return _parse_site_night(name, folder, pattern)
    m = _NIGHT.match(name)
    if not m:
        raise BadInputError("not a night folder name (YYYY-MM-DD_gain2750[_ToO][_1x1])", path=folder)
    try:
        date.fromisoformat(m.group("date"))
    except ValueError:
        raise BadInputError("night folder has an impossible date", path=folder) from None
    flags = [f for f in m.group("flags").split("_") if f]
    gain = next((int(f[4:]) for f in flags if f.startswith("gain")), None)
    binning = next((f for f in flags if re.fullmatch(r"\d+x\d+", f)), None)
    return NightName(
        folder=name,
        date=m.group("date"),
        gain=gain,
        too="ToO" in flags,
        binning=binning,
        test=any(f.lower() == "test" for f in flags),
    )


def _parse_site_night(name: str, folder: str, pattern: str) -> NightName:
    regex = _SITE_NIGHTS.get(pattern)
    if regex is None:
        raise BadInputError(f"unknown night folder pattern {pattern!r} (known: {', '.join(NIGHT_PATTERNS)})",
                            path=folder)
    m = regex.match(name)
    if not m:
        raise BadInputError(f"not a night folder name ({pattern}[_ToO][_test])", path=folder)
    day = f"{m.group('y')}-{m.group('m')}-{m.group('d')}"
    try:
        date.fromisoformat(day)
    except ValueError:
        raise BadInputError("night folder has an impossible date", path=folder) from None
    flags = [f for f in m.group("flags").split("_") if f]
    return NightName(folder=name, date=day, gain=None, too="ToO" in flags, binning=None,
                     test="test" in flags)


def night_date_of(date_obs: datetime) -> str:
    """The night a frame belongs to: the UTC date of (DATE-OBS - 12 h)."""
    return (date_obs - timedelta(hours=12)).strftime("%Y-%m-%d")


def night_folder(date_obs: datetime, gain: int = 2750, too: bool = False) -> str:
    return f"{night_date_of(date_obs)}{'_ToO' if too else ''}_gain{gain}"


def _exptime_text(exptime: float) -> str:
    return f"{exptime:g}"


def convention(obs: str) -> str:
    """``gppy`` for an IMSNG/GECKO site (a registry row whose headers are not TCSpy's), else ``7dt``
    (the 7DT units, and a name that is no registry row: 7DT's names never change)."""
    from . import config  # the registry; imported here as config needs nothing of names

    try:
        return "7dt" if config.site(str(obs)).header_dialect == "tcspy" else "gppy"
    except (ConfigError, KeyError):
        return "7dt"


def _gppy_exptime(exptime: float) -> str:
    # gpPy writes str(int(EXPTIME)); a sub-second exposure keeps its digits rather than read 0
    return str(int(exptime)) if exptime >= 1 else f"{exptime:g}"


def calib_name(unit: str, field: str, date_obs: datetime, filt: str, exptime: float, copy: int = 0) -> str:
    """``calib_<unit>_<field>_<YYYYMMDD>_<HHMMSS>_<filter>_<exptime>.fits`` (gppy-gpu); at an
    IMSNG/GECKO site ``Calib-<OBS>-<OBJECT>-<YYYYMMDD>-<HHMMSS>-<filter>-<exptime>.fits``, as gpPy's
    ``calib.fnamechange`` writes it (SilverRon/gppy preprocess/calib.py; exposure in whole seconds;
    gpPy upper-cases OBJECT, here the field keeps the plan's spelling so name and folder agree).

    ``copy`` > 0 tells apart frames that would otherwise share the name (two different exposures
    started in the same second): ``..._<exptime>_<copy + 1>.fits``."""
    tail = f"_{copy + 1}" if copy else ""
    if convention(unit) == "gppy":
        return (f"Calib-{safe_name(unit)}-{safe_name(field)}-{date_obs:%Y%m%d-%H%M%S}-{safe_name(filt)}-"
                f"{_gppy_exptime(exptime)}{tail}.fits")
    return (f"calib_{safe_name(unit)}_{safe_name(field)}_{date_obs:%Y%m%d_%H%M%S}_{safe_name(filt)}_"
            f"{_exptime_text(exptime)}{tail}.fits")


def processed_dir(field: str, unit: str, filt: str) -> str:
    return f"processed/{safe_name(field)}/{safe_name(unit)}/{safe_name(filt)}"


def stack_id(field: str, filt: str, unit: str, block: int) -> str:
    """A stack's id in plan.json (also a file name: stage results are stored under it)."""
    return f"{safe_name(field)}_{safe_name(filt)}_{safe_name(unit)}_{block}"


def master_name(kind: str, unit: str, night_date: str, binning: int, gain: int | None,
                exptime: float | None = None, filt: str | None = None, too: bool = False) -> str:
    """Master frame key relative to the root, e.g. ``master_frame/7DT01/dark/dark_7DT01_20250101_100s_1x1_gain2750.fits``."""
    day = safe_name(night_date.replace("-", ""))
    unit = safe_name(unit)
    parts = [kind, unit, day]
    if kind == "dark":
        parts.append(f"{_exptime_text(exptime or 0.0)}s")
    if kind == "flat":
        parts.append(safe_name(filt) if filt else "nofilter")
    parts.append(f"{binning}x{binning}")
    if gain is not None:
        parts.append(f"gain{gain}")
    if too:  # a ToO folder of the same date must not overwrite the regular night's masters
        parts.append("ToO")
    return f"master_frame/{unit}/{kind}/{'_'.join(parts)}.fits"


def stack_name(unit: str, field: str, mid: datetime, filt: str, total_exptime: float) -> str:
    """``calib_<unit>_<field>_<YYYYMMDD>_<HHMMSS>_<filter>_<exptime>com.fits`` (mid-time, total
    exposure); at an IMSNG/GECKO site ``Calib-<OBS>-<OBJECT>-<YYYYMMDD>-<HHMMSS>-<filter>-<total>com.fits``
    (gpPy's ``C*com.fits``; its older ``..._gregister-com.fits`` variant is not written)."""
    return calib_name(unit, field, mid, filt, total_exptime)[: -len(".fits")] + "com.fits"


def stem(key: str) -> str:
    """``.../calib_..._300com.fits`` -> ``.../calib_..._300com`` (products of a stack share it)."""
    return key[: -len(".fits")] if key.endswith(".fits") else key


def weight_key(stack_key: str) -> str:
    """SWarp's weight map of a stack, beside it."""
    return stem(stack_key) + ".weight.fits"


def candidate_keys(stack_key: str) -> dict[str, str]:
    """The detect stage's products of a stack: the candidate table, its DS9 regions and the stamps folder."""
    s = stem(stack_key)
    return {"table": f"{s}.cand.ecsv", "regions": f"{s}.cand.reg", "stamps": f"{s}.stamps"}


def completeness_keys(stack_key: str) -> dict[str, str]:
    """The completeness stage's products of a stack: its record and its plot."""
    s = stem(stack_key)
    return {"table": f"{s}.completeness.json", "plot": f"{s}.completeness.png"}


def _split(key: str) -> tuple[str, str]:
    folder, _, name = key.rpartition("/")
    return (folder + "/" if folder else ""), (strip_fits_suffix(name) or name)


def phot_keys(product_key: str) -> tuple[str, str]:
    """(catalogue, zero-point plot) of a calib frame or stack: ``phot/<stem>.phot.cat`` and
    ``phot/<stem>.zp.png`` beside it (gpPy's ``*.phot.cat``, in a ``phot/`` folder)."""
    folder, stem = _split(product_key)
    return f"{folder}phot/{stem}.phot.cat", f"{folder}phot/{stem}.zp.png"


GPPY_DIFF, GPPY_CONV = "hd", "hc"


def difference_keys(stack_key: str) -> dict[str, str]:
    """The subtract stage's products of a stack: the difference, its noise and mask, and the
    reference as convolved onto the stack. 7DT: ``<stem>.diff.fits``, ``<stem>.diff.noise.fits``,
    ``<stem>.diff.mask.fits``, ``<stem>.ref.fits``; a stack named the gpPy way (``Calib-...``), as
    gpPy names them: ``hd<stem>.fits``, ``hd<stem>.noise.fits``, ``hd<stem>.mask.fits``, ``hc<stem>.fits``."""
    folder, stem = _split(stack_key)
    if stem.startswith("Calib-"):
        d, c = f"{folder}{GPPY_DIFF}{stem}", f"{folder}{GPPY_CONV}{stem}"
        return {"diff": f"{d}.fits", "noise": f"{d}.noise.fits", "mask": f"{d}.mask.fits", "ref": f"{c}.fits"}
    s = folder + stem
    return {"diff": f"{s}.diff.fits", "noise": f"{s}.diff.noise.fits", "mask": f"{s}.diff.mask.fits",
            "ref": f"{s}.ref.fits"}


def beside(folder: str, key: str) -> str:
    """Where a product found under ``folder`` would sit if it were named after its frame or stack
    (``phot/x.phot.cat`` -> ``x.phot.cat``; gpPy's ``hdx.noise.fits``, ``hcx.fits`` -> ``x.noise.fits``,
    ``x.fits``), so the stem it extends tells which frame or stack owns it."""
    if key.startswith("phot/"):
        key = key[len("phot/"):]
    for prefix in (GPPY_DIFF, GPPY_CONV):
        if key.startswith(prefix + "Calib-"):
            key = key[len(prefix):]
    return f"{folder}/{key}"
