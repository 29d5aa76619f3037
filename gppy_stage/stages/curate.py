"""The curate stage (per night): the product manifest, header snapshots and the night report.

Products already sit in the processed layout (``processed/<field>/<unit>/<filter>/``: calib
frames, ``phot/*.phot.cat``, ``*com.fits`` and its weight, difference products, candidates and
stamps); curate lists what this night made there (``runs/<unit>/<night>/products.json``), writes a
text dump of each FITS product's primary header beside it (``<name>.header.txt``: readable
without a FITS reader, and diffable between runs) and the night's one report as JSON
(``night_report.json``) and Markdown (``report.md``): the products, their quality and the
candidates, and what each stage did, from the stages' result records (which Argo's pods write to
storage too, so a cluster night has the same report). The report links the moving candidates of
the night's stacks (the detect stage's ``moving`` rows, from every filter) into one row per
moving object (``report.link_movers``).
"""

from __future__ import annotations

import json

from .. import log, names, report, storage
from ..config import settings
from .base import Night, Timer, utcnow

_log = log.get("curate")


def night_products(ctx: Night) -> list[str]:
    """Keys of what this night's plan made under processed/, found in storage."""
    plan = ctx.plan()
    wanted_stems = {names.stem(f["output"]) for f in plan["frames"]} | {names.stem(s["output"]) for s in plan["stacks"]}
    folders = sorted({f["output"].rsplit("/", 1)[0] for f in plan["frames"]} |
                     {s["output"].rsplit("/", 1)[0] for s in plan["stacks"]})
    keys = []
    for folder in folders:
        for obj in storage.list_objects(ctx.url(folder)):
            key = f"{folder}/{obj.key}"
            # catalogues live in phot/ under the frame's name, gpPy's differences carry hd/hc
            # before it; everything else extends a stem
            as_if_beside = names.beside(folder, obj.key)
            owned = any(as_if_beside.startswith(s + ".") or as_if_beside.startswith(s + "/") for s in wanted_stems)
            if owned and not key.endswith((".json", ".header.txt")):
                keys.append(key)
    return sorted(set(keys))


def header_snapshot(url: str) -> str | None:
    h = report.read_header(url)
    return None if h is None else h.tostring(sep="\n", endcard=False, padding=False).rstrip() + "\n"


def run(ctx: Night) -> dict:
    timer = Timer()
    cfg = settings("curate")
    products = night_products(ctx)
    snapshots = 0
    if cfg.get("header_snapshots", True):
        for key in products:
            if key.endswith(".fits"):
                text = header_snapshot(ctx.url(key))
                if text is not None:
                    storage.put_bytes(ctx.url(key[: -len(".fits")] + ".header.txt"), text.encode())
                    snapshots += 1
    manifest = {"unit": ctx.unit, "night": ctx.night, "made": utcnow(), "products": products}
    storage.put_bytes(ctx.url(ctx.run_prefix, "products.json"), json.dumps(manifest, indent=1).encode())
    rep = report.build(report.collect(ctx.root, ctx.unit, ctx.night), top_candidates=int(cfg["top_candidates"]),
                       products=products)
    rep["made"] = utcnow()
    report.save(ctx.root, rep)
    log.event(_log, "curated", products=len(products), snapshots=snapshots, failures=rep["counts"]["failures"],
              moving=len(rep["moving"]), seconds=timer.seconds)
    return {"products": len(products), "header_snapshots": snapshots,
            "report": f"{ctx.run_prefix}/{report.REPORT_JSON}", "report_md": f"{ctx.run_prefix}/{report.REPORT_MD}",
            "counts": rep["counts"], "moving_objects": len(rep["moving"]), "seconds": timer.seconds}
