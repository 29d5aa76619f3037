"""The astrometry stage skips by the one rule of stages/base.py (issue 12 item 4).

Its product is another stage's file (the calib frame), so it keeps its own sidecar
(``calib_*.fits.astrometry.json``, role ``astrometry``) and is done only while the frame still
carries the same hash in ASTRHASH: a forced reduce rewrites the frame without it.
"""

import json
import sys
from pathlib import Path

from astropy.io import fits

sys.path.insert(0, str(Path(__file__).parent))
from astro_synth import sim_calib_frames  # noqa: E402
from test_photometry import _night  # noqa: E402

from gppy_stage import __version__  # noqa: E402
from gppy_stage.stages import astrometry as st_astro  # noqa: E402
from gppy_stage.stages.base import sidecar_url  # noqa: E402


def test_astrometry_redoes_exactly_when_the_sidecar_or_the_frames_hash_is_gone(tmp_path):
    sim, frames = sim_calib_frames(tmp_path / "sim", n_science=1)
    root, ctx = _night(tmp_path, frames, Path(sim["ref_cat"]).read_bytes())
    key = ctx.item("frame", "f0")["output"]
    sidecar = Path(sidecar_url(str(root / key), st_astro.ROLE))
    assert sidecar.name.endswith(".fits.astrometry.json")  # the name the manifest and older nights use
    first = st_astro.run(ctx, "f0")
    assert "skipped" not in first and first["method"] == "SCAMP"
    header = fits.getheader(root / key)
    assert header["PIPEVER"] == __version__
    assert json.loads(sidecar.read_text())["hash"] == header["ASTRHASH"]
    again = st_astro.run(ctx, "f0")
    assert again["skipped"] is True and again["nmatch"] == first["nmatch"]
    sidecar.unlink()  # a crash after the frame, before the sidecar: the work is redone
    assert "skipped" not in st_astro.run(ctx, "f0") and sidecar.is_file()
    with fits.open(root / key, mode="update") as hdul:  # the frame remade by a forced reduce
        del hdul[0].header["ASTRHASH"]
    assert "skipped" not in st_astro.run(ctx, "f0")
    assert st_astro.run(ctx, "f0")["skipped"] is True
