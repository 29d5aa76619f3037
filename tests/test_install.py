"""`pip install .` is the whole runtime: a fresh venv (no system site-packages, no test extras) runs
a simulated night with references end to end; `pip install .[cluster]` adds the cluster commands.

The venv is installed from wheels only (``--no-index``), downloaded once into a cache at the
versions this environment has: the install is then quick, it cannot pick up a package from
anywhere else, and a runtime import that pyproject does not declare fails the night.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from gppy_stage import graph

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# what the wheel is built from (the image's Containerfile copies the same)
SOURCE = ("pyproject.toml", "README.md", "gppy_stage", "config")
NIGHT = "2025-01-01_gain2750"
WHEELS = Path(os.environ.get("GPPY_TEST_WHEELS")
              or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gppy-stage" / "wheels")


def _run(cmd: list, *, env: dict | None = None, cwd: Path | None = None, timeout: float = 300,
         check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _source_copy(dst: Path) -> Path:
    """The checkout's package sources in ``dst`` (a build there leaves the checkout untouched)."""
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    dst.mkdir(parents=True)
    for name in SOURCE:
        src = REPO / name
        if src.is_dir():
            # the wheel's config is a link to ../config: kept as a link, it resolves in the copy too
            shutil.copytree(src, dst / name, symlinks=True, ignore=junk)
        else:
            shutil.copy2(src, dst / name)
    return dst


def _pins(path: Path) -> Path:
    """Constraints: every distribution at the version installed here, except gppy-stage itself and
    the packaging tools (the build backend pyproject asks for may be newer than this env's)."""
    seen: dict[str, str] = {}
    for d in metadata.distributions():
        name = (d.metadata["Name"] or "").lower().replace("_", "-")
        if name and name not in ("gppy-stage", "pip", "setuptools", "wheel") and name not in seen:
            seen[name] = d.version
    path.write_text("".join(f"{n}=={v}\n" for n, v in sorted(seen.items())))
    return path


def _clean_env(venv: Path) -> dict:
    """The environment a user's shell has after installing: the venv's bin first, nothing pointing
    at the checkout (PYTHONPATH would hide a package the wheel lacks, GPPY_CONFIG a missing config)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "GPPY_CONFIG", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["MPLBACKEND"] = "Agg"
    return env


def _pip_install(venv: Path, spec: str, tmp: Path, check: bool = True) -> subprocess.CompletedProcess:
    # this interpreter's pip, aimed at the venv: a venv made --without-pip needs no ensurepip
    return _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-compile",
                 "--no-index", "--find-links", WHEELS, spec], cwd=tmp, timeout=600, check=check)


def _download_wheels(src: Path, tmp: Path) -> None:
    """Wheels of everything the installs below need, at this environment's versions, into WHEELS
    (setuptools: the build backend pyproject names)."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "-d", WHEELS, "-c", _pins(tmp / "pins.txt"),
          "setuptools>=68", f"{src}[cluster]"], cwd=tmp, timeout=900)


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory):
    """A venv holding `pip install .` of the checkout and nothing else: (venv, source copy)."""
    if shutil.which("source-extractor") is None:
        pytest.skip("source-extractor is not installed (Debian package source-extractor)")
    tmp = tmp_path_factory.mktemp("install")
    src = _source_copy(tmp / "src")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    # from the cache alone when it has everything; a first run, or a new dependency, downloads
    if _pip_install(venv, str(src), tmp, check=False).returncode != 0:
        _download_wheels(src, tmp)
        _pip_install(venv, str(src), tmp)
    return venv, src


def test_plain_install_runs_a_night_with_references(plain_venv, tmp_path):
    venv, _ = plain_venv
    env = _clean_env(venv)
    gppy = venv / "bin" / "gppy"
    where = _run([venv / "bin" / "python", "-c",
                  "import gppy_stage, gppy_stage.config as c; print(gppy_stage.__file__); print(c.config_dir())"],
                 env=env, cwd=tmp_path).stdout.split()
    # the venv's own copy ran, with the settings the wheel carries: not the checkout's
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in where), where

    root = tmp_path / "night"
    _run([gppy, "sim", "night", "--out", root, "--filters", "m425", "--seed", "3"], env=env, cwd=tmp_path)
    assert list((root / "ref_frame" / "m425").glob("ref_*.fits")), "the simulated night has no reference frame"
    run = _run([gppy, "night", "run", "--root", root, "--obs", "7DT01", "--night", NIGHT, "--workers", "2"],
               env=env, cwd=tmp_path, timeout=600, check=False)
    report_path = root / "runs" / "7DT01" / NIGHT / "night_report.json"
    assert report_path.is_file(), f"no night report\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    # a missing runtime package shows as a failed stage (exit 70), so name the failures first
    failed = [f"{f['stage']} {f.get('item') or f.get('file')}: {f['reason']}" for f in report["failures"]]
    assert failed == [], "\n".join(failed)
    assert run.returncode == 0, run.stderr[-3000:]
    statuses = {}
    for rec in report["records"]:
        statuses.setdefault(rec["stage"], set()).add(rec["status"])
    assert statuses == {s.name: {"done"} for s in graph.STAGES}

    cands = list(root.glob("processed/*/7DT01/m425/*com.cand.ecsv"))
    assert len(cands) == 1 and len(cands[0].read_text().strip().splitlines()) > 1, cands
    # and the simulator's transient is among them (exit 1 when it is not)
    _run([gppy, "sim", "check", "--root", root, "--obs", "7DT01", "--night", NIGHT], env=env, cwd=tmp_path)

    # without the [cluster] extra the watcher cannot reach Kubernetes, and says which extra it needs
    absent = _run([gppy, "watch", "--once", "--root", root, "--units", "7DT01"], env=env, cwd=tmp_path,
                  check=False)
    assert absent.returncode == 78 and "gppy-stage[cluster]" in absent.stderr, absent.stderr[-2000:]


def test_cluster_extra_gives_the_watcher_and_renders_the_workflow(plain_venv, tmp_path):
    from gppy_stage.cluster import workflow

    venv, src = plain_venv
    if _pip_install(venv, f"{src}[cluster]", tmp_path, check=False).returncode != 0:
        _download_wheels(src, tmp_path)
        _pip_install(venv, f"{src}[cluster]", tmp_path)
    env = _clean_env(venv)
    out = _run([venv / "bin" / "gppy", "watch", "--help"], env=env, cwd=tmp_path).stdout
    assert "--units" in out and "--quiet-minutes" in out
    _run([venv / "bin" / "python", "-m", "gppy_stage.cluster.workflow", "render", tmp_path / "wf"],
         env=env, cwd=tmp_path)
    # the installed package renders exactly what the checkout renders (same graph, same version)
    fresh = {p.name: p.read_text() for p in (tmp_path / "wf").iterdir()}
    assert fresh == workflow.rendered()
