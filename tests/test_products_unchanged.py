"""The safety net of refactoring: a fresh small night's products are, pixel for pixel and card for
card (provenance aside), the ones the committed manifest describes (tests/data/products_manifest.json).

A change meant to change products regenerates the manifest (``python -m tests.products --update``)
and commits it with the change, so that the diff of the manifest shows what changed.
"""

from __future__ import annotations

import shutil

import pytest
from astropy.io import fits
from products import UPDATE_HINT, load_manifest, make_manifest_night, manifest, manifest_differences


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    return make_manifest_night(tmp_path_factory.mktemp("manifest") / "root")


def test_products_match_the_manifest(night):
    problems = manifest_differences(load_manifest(), manifest(night))
    shown = "\n  ".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
    assert not problems, f"{len(problems)} difference(s) from the manifest:\n  {shown}\n{UPDATE_HINT}"


def test_a_changed_card_or_pixel_is_named(night, tmp_path):
    """The comparison can fail, and says where: one card and one pixel of a master changed in a copy."""
    root = tmp_path / "root"
    shutil.copytree(night / "master_frame", root / "master_frame")
    shutil.copytree(night / "processed", root / "processed")
    master = next((root / "master_frame").rglob("zero_*.fits"))
    with fits.open(master, mode="update") as hdul:
        hdul[0].header["NCOMBINE"] = 8
        hdul[0].header["PIPEVER"] = "9.9.9"  # provenance: not a difference
        hdul[0].data[0, 0] += 1.0
    problems = manifest_differences(manifest(night), manifest(root))
    rel = master.relative_to(root).as_posix()
    assert len(problems) == 2, problems
    assert problems[0] == f"{rel}: HDU 0 PRIMARY / cards / NCOMBINE: manifest 9, now 8"
    assert problems[1].startswith(f"{rel}: HDU 0 PRIMARY / pixels: manifest ")
    assert manifest_differences(manifest(night), manifest(night)) == []


def test_every_fits_product_names_the_pipeline_version(night):
    """Provenance is stamped by one helper (stages.base.stamp_provenance): no product lacks it."""
    from gppy_stage import __version__
    from products import product_files

    fits_products = [rel for rel in product_files(night) if rel.endswith(".fits")]
    assert any(rel.split("/")[-1].startswith("calib_") for rel in fits_products)
    unstamped = [rel for rel in fits_products if fits.getheader(night / rel).get("PIPEVER") != __version__]
    assert not unstamped, f"FITS products without PIPEVER {__version__}: {unstamped}"
