"""Comparing the products of two runs of the same night (crash and fault tests), and the products
of a night with the committed manifest of what they were (the refactoring safety net).

Pixels, masks, catalogues and candidate lists must be identical; headers and sidecars equal but
for the values that record when and how long (dates, durations, timestamps of provenance).

The manifest (``tests/data/products_manifest.json``) holds, per product of the manifest night,
a digest of each HDU's pixels, its header cards, each table column's digest and each sidecar's
content, all without provenance (versions, hashes of inputs and settings, dates). A change that
is meant to change products regenerates it: ``python -m tests.products --update``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
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


# ---- the manifest: what the products of one small night are, without their provenance ----

MANIFEST = Path(__file__).parent / "data" / "products_manifest.json"
# the crash tests' night: the smallest that goes through every stage, subtraction and detection included
MANIFEST_NIGHT = {"unit": "7DT01", "night": "2025-01-01", "filters": ["m425"], "size": SIZE, "seed": 3,
                  "n_science": 2}
UPDATE_HINT = ("if the change is meant to change products, regenerate the manifest with "
               "`python -m tests.products --update` (about 30 s) and commit tests/data/products_manifest.json "
               "with the change")
# provenance: who, when and with which versions and settings a product was made, not what it is
# (hashes of inputs and settings change with every new setting, versions with every release)
PROVENANCE = VOLATILE | {"PIPEVER", "ORIGIN", "AUTHOR", "SOFTDATE", "hash", "pipeline_version"}
_PROVENANCE_TAIL = re.compile(r"(HASH|VER|VERS|VERSN|CONF|CNF)$")
_COMMENTARY = ("COMMENT", "HISTORY", "")


def is_provenance(key: str) -> bool:
    return key in PROVENANCE or bool(_PROVENANCE_TAIL.search(key))


def _digest(array) -> str:
    array = np.ascontiguousarray(array)
    blob = f"{array.dtype.str}{array.shape}".encode() + array.tobytes()
    return hashlib.sha256(blob).hexdigest()[:20]


def _plain(value):
    """A header or meta value as JSON writes it (astropy's Undefined and numpy scalars included)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _cards(header: fits.Header) -> dict:
    return {c.keyword: _plain(c.value) for c in header.cards
            if c.keyword not in _COMMENTARY and not is_provenance(c.keyword)}


def _columns(table) -> dict:
    out = {}
    for name in table.colnames:
        col = table[name]
        out[name] = _digest(np.ma.getdata(col)) + ("" if not np.ma.is_masked(col) else "/" + _digest(np.ma.getmask(col)))
    return out


def _describe_fits(path: Path) -> dict:
    out = {}
    with fits.open(path) as hdul:
        for i, hdu in enumerate(hdul):
            entry = {"cards": _cards(hdu.header)}
            if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
                from astropy.table import Table

                entry["columns"] = _columns(Table(hdu.data))
            elif hdu.data is not None:
                entry["pixels"] = _digest(hdu.data)
            out[f"HDU {i} {hdu.name}"] = entry
    return out


def _describe_table(path: Path) -> dict:
    from astropy.table import Table

    table = Table.read(path, format="ascii.ecsv")
    return {"columns": _columns(table), "rows": len(table),
            "meta": {k: _plain(v) for k, v in table.meta.items() if not is_provenance(k)}}


def _drop_provenance(value):
    if isinstance(value, dict):
        return {k: _drop_provenance(v) for k, v in value.items() if not is_provenance(k)}
    if isinstance(value, list):
        return [_drop_provenance(v) for v in value]
    return value


def describe(path: Path) -> dict:
    """One product as the manifest holds it."""
    name = path.name
    if name.endswith(".fits"):
        return {"fits": _describe_fits(path)}
    if name.endswith((".ecsv", ".phot.cat")):
        return {"table": _describe_table(path)}
    if name.endswith(".json"):
        return {"json": _drop_provenance(json.loads(path.read_text()))}
    if name.endswith(".header.txt"):
        return {"cards": _cards(fits.Header.fromstring(path.read_text(), sep="\n"))}
    if name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as image:  # the pixels: PNG metadata names the plotting library's version
            return {"pixels": _digest(np.asarray(image))}
    return {"bytes": hashlib.sha256(path.read_bytes()).hexdigest()[:20]}


def manifest(root: Path) -> dict:
    return {rel: describe(root / rel) for rel in product_files(root)}


def _diff(a, b, path: tuple) -> list[tuple[tuple, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            out += _diff(a.get(key, "<absent>"), b.get(key, "<absent>"), path + (key,))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, path + (f"[{i}]",))]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b))
    return [] if same else [(path, a, b)]


def manifest_differences(expected: dict, actual: dict) -> list[str]:
    """Each way the products (``actual``) differ from the manifest (``expected``), one line each,
    naming the product and the HDU, card, column or key; empty when they are the same."""
    out = []
    missing, new = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if missing:
        out.append(f"products in the manifest but not made: {missing}")
    if new:
        out.append(f"products made but not in the manifest: {new}")
    for rel in sorted(set(expected) & set(actual)):
        for where, was, now in _diff(expected[rel], actual[rel], ()):
            out.append(f"{rel}: {' / '.join(where[1:]) or where[0]}: manifest {was!r}, now {now!r}")
    return out


def make_manifest_night(root: Path) -> Path:
    """The manifest's night, simulated and run through every stage under ``root``."""
    from gppy_stage.runner import run_night
    from gppy_stage.sim import simulate_night

    n = MANIFEST_NIGHT
    simulate_night(root, unit=n["unit"], night=n["night"], filters=tuple(n["filters"]), size=n["size"],
                   seed=n["seed"], n_science=n["n_science"])
    report = run_night(str(root), n["unit"], f"{n['night']}_gain2750", workers=1, progress=False)
    if report["failures"]:
        raise RuntimeError(f"the manifest night did not run cleanly: {report['failures']}")
    return root


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text())["products"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.products",
                                     description="Compare a fresh manifest night's products with " + str(MANIFEST))
    parser.add_argument("--update", action="store_true", help="rewrite the manifest from a fresh night")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gppy-manifest-") as tmp:
        products = manifest(make_manifest_night(Path(tmp) / "root"))
    if args.update:
        MANIFEST.write_text(json.dumps({"night": MANIFEST_NIGHT, "products": products}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {MANIFEST} ({len(products)} products)")
        return 0
    problems = manifest_differences(load_manifest(), products)
    print("\n".join(problems) or f"{len(products)} products match {MANIFEST}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
