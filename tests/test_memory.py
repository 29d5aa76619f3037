"""A full-size set of 9 frames of 9576x6388 combines under 4 GB peak RSS (chunked, memory-mapped)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_masters.py"


@pytest.mark.slow
def test_full_size_master_combine_stays_under_4_gb(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_masters", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    paths = [str(p) for p in bench.make_frames(tmp_path, 9, bench.SIZES["full"])]
    proc = subprocess.run([sys.executable, str(BENCH), "--child", "ours", *paths], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["peak_rss_mb"] < 4096, result
    assert abs(result["median"] - 512) < 1  # and it combined what it read
