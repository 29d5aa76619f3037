"""Memory at full size (9576x6388): every stage of a full-size night (masters of 9 bias, 9 dark and
5 flat frames among them) under 70 % of its pod's request (graph.py), run as Argo runs it by the
bench-full harness; a stack's peak independent of its number of frames."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

# ----------------------------------------------------------------------------- every stage at full size

BENCH_FULL = Path(__file__).resolve().parents[1] / "bench" / "bench_full.py"
SHARE_OF_REQUEST = 70.0  # % of the pod's memory request a stage's peak may use (issue 8)


def _bench_full():
    spec = importlib.util.spec_from_file_location("bench_full", BENCH_FULL)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.fixture(scope="module")
def full_night(tmp_path_factory):
    """A full-size night of one science frame, every stage run as Argo runs it (one process per
    item) by the bench harness; (work root, its figures). GPPY_FULLNIGHT1 names a folder where the
    simulated night is kept between runs (it is only read)."""
    import os

    bench = _bench_full()
    base = tmp_path_factory.mktemp("fullsize")
    night = Path(os.environ.get("GPPY_FULLNIGHT1") or base / "night")
    work, out = base / "work", base / "bench.json"
    rc = bench.main(["--night-dir", str(night), "--n-science", "1", "--work", str(work), "--no-yardsticks",
                     "--json", str(out)])
    figures = json.loads(out.read_text())
    assert rc == 0, [(r["stage"], r["failed"]) for r in figures["stages"]]
    return work, figures


@pytest.mark.slow
def test_every_stage_peaks_under_70_percent_of_its_pod_request(full_night):
    _, figures = full_night
    over = [(r["stage"], r["peak_gib"], r["request"], r["peak_pct_of_request"]) for r in figures["stages"]
            if r["peak_pct_of_request"] > SHARE_OF_REQUEST]
    for r in figures["stages"]:
        print(f"{r['stage']:<11} {r['max_s']:7.1f} s  peak {r['peak_gib']:5.2f} GiB  request {r['request']:>6}  "
              f"{r['peak_pct_of_request']:5.1f} %")
    assert {r["stage"] for r in figures["stages"]} >= {"masters", "reduce", "astrometry", "photometry", "stack",
                                                       "subtract", "detect"}
    assert not over, over


def _stack_root(work: Path, dest: Path, n: int) -> tuple[Path, str, str]:
    """A root whose plan has one stack of ``n`` copies of the night's calib frame, each
    exposure 200 s after the one before (DATE-OBS); (root, night, stack id)."""
    from datetime import datetime, timedelta

    from astropy.io import fits

    night = next(p.name for p in (work / "obsdata" / "7DT01").iterdir())
    plan = json.loads((work / "runs" / "7DT01" / night / "plan.json").read_text())
    frame, stack = plan["frames"][0], dict(plan["stacks"][0])
    src = work / frame["output"]
    t0 = datetime.fromisoformat(str(fits.getheader(src)["DATE-OBS"]))
    frames = []
    for k in range(n):
        out = frame["output"].replace(".fits", f"_{k:02d}.fits")
        (dest / out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / out)
        with fits.open(dest / out, mode="update", memmap=True) as hdul:
            hdul[0].header["DATE-OBS"] = (t0 + timedelta(seconds=200 * k)).isoformat(timespec="milliseconds")
        frames.append(frame | {"id": f"{frame['id']}_{k:02d}", "output": out})
    stack |= {"frames": [f["id"] for f in frames], "output": stack["output"].replace(".fits", f"_{n}.fits")}
    plan |= {"frames": frames, "stacks": [stack]}
    (dest / "runs" / "7DT01" / night).mkdir(parents=True)
    (dest / "runs" / "7DT01" / night / "plan.json").write_text(json.dumps(plan))
    (dest / "ref_cat").symlink_to((work / "ref_cat").resolve())
    return dest, night, stack["id"]


@pytest.mark.slow
def test_full_size_stack_memory_does_not_grow_with_its_frames(full_night, tmp_path):
    """A stack of 6 full-size frames (copies of the night's calib frame) peaks as the night's own
    stack of one does: the frames go to SWarp one at a time and SWarp co-adds within its
    MEM_MAX/COMBINE_BUFSIZE."""
    from astropy.io import fits

    from gppy_stage import graph

    work, figures = full_night
    bench = _bench_full()
    request = bench.request_bytes(graph.stage("stack").memory)
    one = next(r for r in figures["stages"] if r["stage"] == "stack")
    assert one["runs"] == 1 and figures["frames"] == 1, one
    peak_one = one["peak_gib"] * 2**30
    n = 6
    root, night, sid = _stack_root(work, tmp_path / f"n{n}", n)
    cmd = ["gppy", "stage", "stack", "--root", str(root), "--obs", "7DT01", "--night", night, "--stack", sid]
    with bench.fullsize_lock():
        got = bench.measure(cmd, log=tmp_path / f"stack{n}.log")
    assert got["rc"] == 0, (tmp_path / f"stack{n}.log").read_text()[-3000:]
    plan = json.loads((root / "runs" / "7DT01" / night / "plan.json").read_text())
    assert fits.getheader(root / plan["stacks"][0]["output"])["NCOMBINE"] == n
    print(f"stack of {n} full-size frames: {got['wall_s']:.1f} s, peak {got['peak_bytes'] / 2**30:.2f} GiB; "
          f"of 1: {one['max_s']:.1f} s, peak {one['peak_gib']:.2f} GiB (request {graph.stage('stack').memory})")
    shutil.rmtree(root / "processed")  # 550 MB a frame: not kept longer than needed
    assert got["peak_bytes"] < 1.1 * peak_one + 200 * 2**20, (got["peak_bytes"], peak_one)
    assert got["peak_bytes"] < SHARE_OF_REQUEST / 100 * request, got
