"""Comparing the products of two runs of the same night (crash and fault tests).

Pixels, masks, catalogues and candidate lists must be identical; headers and sidecars equal but
for the values that record when and how long (dates, durations, timestamps of provenance).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from astropy.io import fits

from gppy_stage.sim.night import SIZES

PRODUCT_TREES = ("master_frame", "processed")
# what records when or how long, not what: the only values allowed to differ between runs
VOLATILE = {"DATE", "made", "started", "finished", "seconds", "timing", "elapsed_s", "wall_s"}
SIZE = "tiny" if "tiny" in SIZES else "small"  # the smallest simulated night there is


def product_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for tree in PRODUCT_TREES for p in (root / tree).rglob("*")
                  if p.is_file())


def _drop_volatile(value):
    if isinstance(value, dict):
        return {k: _drop_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_drop_volatile(v) for v in value]
    return value


def _header(h: fits.Header) -> dict:
    return {k: v for k, v in h.items() if k not in VOLATILE and k not in ("COMMENT", "HISTORY", "")}


def _header_text(text: str) -> list[str]:
    return [line for line in text.splitlines() if line[:8].strip() not in VOLATILE]


def assert_opens(path: Path) -> None:
    """A product under its final name is whole: a FITS file reads to its last pixel, JSON parses."""
    if path.suffix == ".fits":
        with fits.open(path) as hdul:
            for hdu in hdul:
                if hdu.data is not None:
                    np.asarray(hdu.data).sum()
    elif path.suffix == ".json":
        json.loads(path.read_text())


def differences(a: Path, b: Path) -> list[str]:
    """What differs between the products of two roots (empty when they are the same)."""
    out = []
    fa, fb = product_files(a), product_files(b)
    if fa != fb:
        out.append(f"files only in {a}: {sorted(set(fa) - set(fb))}; only in {b}: {sorted(set(fb) - set(fa))}")
    for rel in sorted(set(fa) & set(fb)):
        pa, pb = a / rel, b / rel
        if pa.read_bytes() == pb.read_bytes():
            continue
        if rel.endswith(".fits"):
            with fits.open(pa) as ha, fits.open(pb) as hb:
                if len(ha) != len(hb):
                    out.append(f"{rel}: {len(ha)} vs {len(hb)} HDUs")
                    continue
                for i, (x, y) in enumerate(zip(ha, hb)):
                    if (x.data is None) != (y.data is None) or (
                            x.data is not None and not np.array_equal(np.asarray(x.data), np.asarray(y.data),
                                                                      equal_nan=x.data.dtype.kind == "f")):
                        out.append(f"{rel}[{i}]: pixels differ")
                    hx, hy = _header(x.header), _header(y.header)
                    if hx != hy:
                        keys = sorted(k for k in set(hx) | set(hy) if hx.get(k) != hy.get(k))
                        out.append(f"{rel}[{i}]: header keys differ: {keys}")
        elif rel.endswith(".json"):
            if _drop_volatile(json.loads(pa.read_text())) != _drop_volatile(json.loads(pb.read_text())):
                out.append(f"{rel}: sidecar differs")
        elif rel.endswith(".header.txt"):
            if _header_text(pa.read_text()) != _header_text(pb.read_text()):
                out.append(f"{rel}: header snapshot differs")
        else:
            out.append(f"{rel}: bytes differ")
    return out


def leftovers(root: Path) -> list[str]:
    """Temporary files of writers (killed ones included) left in the product trees."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".gppy-tmp-*"))
