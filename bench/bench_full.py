"""Benchmark: a full-size (9576x6388) night run stage by stage as Argo runs it.

Each item of each stage is its own ``gppy stage <name> ... --<fanout> <id>`` process, as in a pod.
Per stage it prints the wall seconds, the peak memory (the sum of the RSS of the stage's process
tree, sampled every 0.1 s, as a pod's cgroup counts it; never below the largest single process's
``ru_maxrss``), the memory the pod requests in ``gppy_stage/graph.py`` and the peak as a share of
it, and the ratio to the bare external programs on the same inputs:

- SExtractor, SCAMP, MissFITS, SWarp, solve-field, HOTPANTS: the stages call them through
  shims put first on PATH that time each call with GNU time, so the tool's own seconds on exactly
  the stage's inputs are known (``tools s``: their sum per item; ``x tools`` = stage / tools);
- astroscrappy: run alone, with the reduce settings, on each reduced frame;
- HOTPANTS (when on PATH or in ../shared/tools/hotpants/): run alone on each stack and its
  reference resampled onto the stack's grid, as a yardstick for the subtract stage.

The night is simulated once (``gppy sim night --size full``) at ``--night-dir`` (default
/tmp/fullnight, finished when ``.complete`` is there) and only read; the stages write into a
fresh work root (``--work``) whose obsdata/ and ref_* folders are links to it. Every full-size
step holds /tmp/gppy-fullsize.lock so heavy runs on a shared machine happen one at a time.

    python bench/bench_full.py [--night-dir D] [--work W] [--n-science 2] [--stages a,b] [--keep] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gppy_stage import graph  # noqa: E402

LOCK = "/tmp/gppy-fullsize.lock"
UNIT, DATE, FILTER, SEED = "7DT01", "2025-01-01", "m625", 7
# programs the stages run, by the name they are looked up with (Debian's names and upstream's)
TOOLS = ("source-extractor", "sex", "scamp", "swarp", "SWarp", "missfits", "solve-field", "hotpants")
HOTPANTS_SHARED = REPO.parent / "shared" / "tools" / "hotpants" / "hotpants"
PAGE = os.sysconf("SC_PAGE_SIZE")
GIB = 1024 ** 3


# ----------------------------------------------------------------------------- the machine

def machine() -> dict:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    info = {"cores": os.cpu_count(), "cpu": model, "ram_gib": round(ram / GIB, 1),
            "device": os.environ.get("GPPY_DEVICE", "cpu"), "python": platform.python_version()}
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=30).stdout.strip()
    return info


# ----------------------------------------------------------------------------- measuring one process

def _tree_rss(root_pid: int) -> int:
    """Bytes resident in ``root_pid`` and all its descendants (what a pod's cgroup is charged)."""
    parent, rss = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            parent[int(d.name)] = int(fields[1])
            rss[int(d.name)] = int((d / "statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root_pid]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total


def measure(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run ``cmd``; its exit code, wall seconds and peak memory (bytes; see the module docstring)."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    # A child spawned from this process inherits its high-water mark (vfork shares our memory
    # until exec), so its own ru_maxrss never reads below ours: GNU time, small itself, spawns the
    # command and reports the command's true peak.
    gnu_time = Path("/usr/bin/time")
    maxrss_file = Path(tempfile.mkstemp(prefix="gppy-bench-maxrss-")[1])
    if gnu_time.is_file():  # peak KiB, then user and system CPU seconds (the steadier figure on a shared machine)
        cmd = [str(gnu_time), "-o", str(maxrss_file), "-f", "%M %U %S", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    peak = 0
    while True:
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    text = maxrss_file.read_text().split()  # "Command exited with non-zero status N" may come first
    maxrss_file.unlink()
    maxrss, cpu = 0, None
    if len(text) >= 3 and text[-3].isdigit():
        maxrss, cpu = int(text[-3]) * 1024, round(float(text[-2]) + float(text[-1]), 2)
    return {"rc": proc.returncode, "wall_s": round(wall, 2), "cpu_s": cpu, "peak_bytes": max(peak, maxrss),
            "maxrss_bytes": maxrss}


# ----------------------------------------------------------------------------- tool shims

def make_shims(folder: Path) -> dict[str, str]:
    """Shell shims for the external programs found: each call's wall seconds and peak RSS are
    appended to $GPPY_BENCH_TOOLLOG by GNU time (version queries pass through untimed)."""
    folder.mkdir(parents=True, exist_ok=True)
    found = {}
    for name in TOOLS:
        real = shutil.which(name) or (str(HOTPANTS_SHARED) if name == "hotpants" and HOTPANTS_SHARED.is_file()
                                       else None)
        if not real:
            continue
        found[name] = real
        shim = folder / name
        shim.write_text(
            "#!/bin/sh\n"
            f'case "$1" in -v|--version|-d|-dd) exec "{real}" "$@";; esac\n'
            f'[ -n "$GPPY_BENCH_TOOLLOG" ] || exec "{real}" "$@"\n'
            f'exec /usr/bin/time -a -o "$GPPY_BENCH_TOOLLOG" -f "{name} %e %M" "{real}" "$@"\n')
        shim.chmod(0o755)
    return found


def read_tool_log(path: Path) -> list[dict]:
    calls = []
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split()
            # GNU time writes "Command exited with non-zero status N" before the figures
            if len(parts) == 3 and parts[0] in TOOLS:
                calls.append({"tool": parts[0], "wall_s": float(parts[1]), "peak_bytes": int(parts[2]) * 1024})
    return calls


# ----------------------------------------------------------------------------- the night

@contextlib.contextmanager
def fullsize_lock(path: str = LOCK):
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_night(night_dir: Path, n_science: int, lock: str, size: str = "full") -> None:
    """The simulated night, made once (``.complete`` marks it whole)."""
    if (night_dir / ".complete").is_file():
        return
    with fullsize_lock(lock):
        if (night_dir / ".complete").is_file():  # another run made it while we waited
            return
        shutil.rmtree(night_dir, ignore_errors=True)
        print(f"simulating a full-size night at {night_dir} (once) ...", flush=True)
        subprocess.run(["gppy", "sim", "night", "--out", str(night_dir), "--unit", UNIT, "--night", DATE,
                        "--size", size, "--filters", FILTER, "--n-science", str(n_science), "--seed", str(SEED)],
                       check=True, stdout=subprocess.DEVNULL)
        (night_dir / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")


def work_root(night_dir: Path, work: Path, keep: bool) -> Path:
    """A root whose raw data and references are links to the night (read only), outputs its own."""
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for src in night_dir.iterdir():
        if src.name.startswith(".") or not src.is_dir():
            continue
        if src.name in ("obsdata", "truth") or src.name.startswith("ref_"):
            link = work / src.name
            if not link.exists():
                link.symlink_to(src.resolve())
    return work


def night_name(root: Path) -> str:
    nights = sorted(p.name for p in (root / "obsdata" / UNIT).iterdir() if p.is_dir())
    if not nights:
        raise SystemExit(f"no night under {root / 'obsdata' / UNIT}")
    return nights[-1]


def items(root: Path, night: str, stage: graph.Stage) -> list[str | None]:
    if stage.fanout == "night":
        return [None]
    plan = json.loads((root / "runs" / UNIT / night / "plan.json").read_text())
    return [entry["id"] for entry in plan[graph.PLAN_LISTS[stage.fanout]]]


# ----------------------------------------------------------------------------- yardsticks

ASTROSCRAPPY = r"""
import sys, numpy as np, yaml, astroscrappy
from astropy.io import fits
raw, zero, calib, conf = sys.argv[1:5]
cfg = yaml.safe_load(open(conf))["reduce"]["cosmic_rays"]
hd = fits.getheader(calib)
with fits.open(raw) as r, fits.open(zero) as z:  # raw is uint16 with BZERO: no memory map
    data = np.asarray(r[0].data, np.float32) - np.asarray(z[0].data, np.float32)
astroscrappy.detect_cosmics(data, gain=float(hd.get("EGAIN", 1.0)), readnoise=float(hd.get("RDNOISE", 3.0)),
    satlevel=float(hd.get("SATURATE", 65535.0)), sigclip=cfg["sigclip"], sigfrac=cfg["sigfrac"], objlim=cfg["objlim"],
    niter=cfg["niter"], sepmed=True, cleantype="meanmask", fsmode="median", verbose=False)
"""

HOTPANTS_INPUTS = r"""
import sys, glob, numpy as np
from astropy.io import fits
from gppy_stage.tools import swarp as sw
stack, ref_glob, out = sys.argv[1:4]
ref_path = sorted(glob.glob(ref_glob))[0]
with fits.open(stack) as h:
    header, shape = h[0].header, h[0].data.shape
    fits.PrimaryHDU(np.asarray(h[0].data, np.float32), header).writeto(out + "/new.fits", overwrite=True)
with fits.open(ref_path) as h:
    res = sw.resample(sw.SwarpInput(np.asarray(h[0].data, np.float32), h[0].header), header, shape)
fits.PrimaryHDU(np.where(res.weight > 0, res.image, 0.0).astype(np.float32), header).writeto(out + "/ref.fits",
                                                                                             overwrite=True)
print(float(header.get("SEEING", 0) or 0) / float(header.get("PIXSCALE", 0.505) or 0.505))
"""


def astroscrappy_alone(root: Path, frame: dict, logdir: Path) -> dict:
    """astroscrappy with the reduce settings on the raw frame less its master bias (the calib
    frame has had its cosmic rays removed already, which would flatter the yardstick)."""
    cmd = [sys.executable, "-c", ASTROSCRAPPY, str(root / frame["raw"]), str(root / frame["masters"]["zero"]),
           str(root / frame["output"]), str(REPO / "config" / "pipeline.yaml")]
    return measure(cmd, log=logdir / "astroscrappy.log")


def hotpants_alone(binary: str, stack_path: Path, root: Path, logdir: Path) -> dict | None:
    """HOTPANTS on a stack and its reference resampled onto the stack's grid (the resampling, done
    by SWarp beforehand, is not counted): its own seconds and peak."""
    with tempfile.TemporaryDirectory(prefix="bench-hotpants-") as tmp:
        proc = subprocess.run([sys.executable, "-c", HOTPANTS_INPUTS, str(stack_path),
                               str(root / "ref_frame" / FILTER / "*.fits"), tmp], capture_output=True, text=True,
                              cwd=REPO)
        if proc.returncode != 0:
            print(f"  (HOTPANTS inputs could not be made: {proc.stderr.strip()[-300:]})")
            return None
        fwhm = float(proc.stdout.strip().splitlines()[-1] or 0) or 4.0
        r, rss = max(3, round(1.5 * fwhm)), max(6, round(3.0 * fwhm))
        cmd = [binary, "-inim", f"{tmp}/new.fits", "-tmplim", f"{tmp}/ref.fits", "-outim", f"{tmp}/diff.fits",
               "-r", str(r), "-rss", str(rss), "-n", "i", "-c", "t", "-tu", "65000", "-iu", "65000",
               "-tl", "-1e4", "-il", "-1e4", "-nrx", "2", "-nry", "2"]
        return measure(cmd, log=logdir / "hotpants.log")


# ----------------------------------------------------------------------------- the run

def gib(n: float) -> float:
    return round(n / GIB, 2)


def request_bytes(text: str) -> int:
    units = {"Ki": 1024, "Mi": 1024 ** 2, "Gi": GIB, "Ti": 1024 ** 4}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(text)


def run_stage(stage: graph.Stage, root: Path, night: str, logdir: Path, env: dict, force: bool, lock) -> list[dict]:
    runs = []
    for item in items(root, night, stage):
        cmd = ["gppy", "stage", stage.name, "--root", str(root), "--obs", UNIT, "--night", night]
        if item is not None:
            cmd += [stage.item_arg, item]
        if "--status" in stage.extra_args:
            cmd += ["--status", "Succeeded"]
        if force and stage.name not in ("plan", "notify", "curate"):
            cmd += ["--force"]
        label = f"{stage.name}_{item or 'night'}"
        toollog = logdir / f"{label}.tools"
        toollog.unlink(missing_ok=True)
        with lock():
            got = measure(cmd, env=env | {"GPPY_BENCH_TOOLLOG": str(toollog)}, log=logdir / f"{label}.log")
        got |= {"item": item, "tools": read_tool_log(toollog)}
        runs.append(got)
        print(f"  {stage.name:<11} {str(item or ''):<48} rc {got['rc']:>3}  {got['wall_s']:8.1f} s  "
              f"{gib(got['peak_bytes']):6.2f} GiB  (tools {sum(t['wall_s'] for t in got['tools']):.1f} s)", flush=True)
        if got["rc"] != 0:
            print(f"    failed: see {logdir / f'{label}.log'}")
    return runs


def summarize(stage: graph.Stage, runs: list[dict], yard: dict[str, list[dict]]) -> dict:
    request = request_bytes(stage.memory)
    peak = max(r["peak_bytes"] for r in runs)
    tools = [sum(t["wall_s"] for t in r["tools"]) for r in runs]
    row = {"stage": stage.name, "runs": len(runs), "failed": sum(r["rc"] != 0 for r in runs),
           "total_s": round(sum(r["wall_s"] for r in runs), 1), "max_s": round(max(r["wall_s"] for r in runs), 1),
           "peak_gib": gib(peak), "request": stage.memory, "cpu": stage.cpu,
           "peak_pct_of_request": round(100 * peak / request, 1),
           "tool_s_max": round(max(tools), 1) if any(tools) else None,
           "tools": sorted({t["tool"] for r in runs for t in r["tools"]}),
           "tool_peak_gib": gib(max((t["peak_bytes"] for r in runs for t in r["tools"]), default=0)),
           "items": [{k: v for k, v in r.items() if k != "tools"} | {"tool_s": round(s, 2)}
                     for r, s in zip(runs, tools)]}
    if any(tools):
        row["x_tools"] = round(sum(r["wall_s"] for r in runs) / sum(tools), 2)
    cpus = [r["cpu_s"] for r in runs if r.get("cpu_s") is not None]
    if cpus:
        row["max_cpu_s"] = round(max(cpus), 1)
    for name, base in yard.items():
        if base:
            row[f"x_{name}"] = round(row["max_s"] / max(b["wall_s"] for b in base), 2)
            row[f"{name}_s"] = round(max(b["wall_s"] for b in base), 1)
            row[f"{name}_peak_gib"] = gib(max(b["peak_bytes"] for b in base))
            base_cpu = [b["cpu_s"] for b in base if b.get("cpu_s")]
            if cpus and base_cpu:  # CPU seconds: what another job's load on the same cores does not inflate
                row[f"{name}_cpu_s"] = round(max(base_cpu), 1)
                row[f"{name}_x_cpu"] = round(max(cpus) / max(base_cpu), 2)
    return row


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"\nnight: {result['size']} px, {result['frames']} science frame(s) in {FILTER}, "
          f"{result['raw_frames']} raw frames; machine: {m['cores']} cores {m['cpu']}, {m['ram_gib']} GiB RAM, "
          f"device {m['device']}")
    head = (f"{'stage':<11} {'runs':>4} {'max s':>8} {'cpu s':>8} {'total s':>8} {'peak GiB':>9} {'request':>8} "
            f"{'% req':>6} {'tools s':>8} {'x tools':>8}  yardstick")
    print(head)
    print("-" * len(head))
    for row in result["stages"]:
        yard = "; ".join(_yardstick(row, k[2:], ": x") for k in row if k.startswith("x_") and k != "x_tools")
        tools = f"{row['tool_s_max']:8.1f}" if row.get("tool_s_max") else f"{'-':>8}"
        xt = f"{row['x_tools']:8.2f}" if row.get("x_tools") else f"{'-':>8}"
        fail = f"  FAILED {row['failed']}" if row["failed"] else ""
        cpu = f"{row['max_cpu_s']:8.1f}" if row.get("max_cpu_s") is not None else f"{'-':>8}"
        print(f"{row['stage']:<11} {row['runs']:>4} {row['max_s']:8.1f} {cpu} {row['total_s']:8.1f} {row['peak_gib']:9.2f} "
              f"{row['request']:>8} {row['peak_pct_of_request']:6.1f} {tools} {xt}  {yard}{fail}")
    print("(max s: the slowest item; cpu s: its user + system CPU seconds; peak: process tree RSS; tools s: the "
          "external programs' own time in the slowest item's stage; x tools: stage total / tools total)")


def markdown(result: dict) -> str:
    """The figures as the README's table."""
    m = result["machine"]
    lines = [f"{result['size']} px, {result['frames']} science frame(s), {m['cores']} cores ({m['cpu']}), "
             f"{m['ram_gib']} GiB RAM, device {m['device']}, {result['when']}", "",
             "| stage (one item) | wall s | CPU s | peak RSS GiB | pod request | peak / request | external tools s | x tools |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["stages"]:
        yard = "; ".join(_yardstick(r, k[2:], " (x", ")") for k in r if k.startswith("x_") and k != "x_tools")
        tools = f"{r['tool_s_max']} ({', '.join(r['tools'])})" if r.get("tool_s_max") else "-"
        xt = f"{r['x_tools']}" + (f"; {yard}" if yard else "") if r.get("x_tools") else (yard or "-")
        lines.append(f"| {r['stage']} | {r['max_s']} | {r.get('max_cpu_s', '-')} | {r['peak_gib']} | {r['request']} | "
                     f"{r['peak_pct_of_request']} % | {tools} | {xt} |")
    return "\n".join(lines)


def _yardstick(row: dict, name: str, sep: str, end: str = "") -> str:
    """``<tool> alone S s<sep>RATIO<end>``, with the CPU seconds' ratio where they were measured."""
    text = f"{name} alone {row[name + '_s']} s{sep}{row['x_' + name]}{end}"
    if f"{name}_x_cpu" in row:
        text += f", CPU {row['max_cpu_s']} s / {row[name + '_cpu_s']} s = x{row[name + '_x_cpu']}"
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--night-dir", default="/tmp/fullnight", type=Path)
    ap.add_argument("--work", default="/tmp/bench-full", type=Path, help="where the stages write (made afresh)")
    ap.add_argument("--n-science", type=int, default=2, help="science frames, when the night must be simulated")
    ap.add_argument("--stages", default="", help="only these stages (comma-separated); earlier products kept")
    ap.add_argument("--keep", action="store_true", help="keep the work root's products (with --stages)")
    ap.add_argument("--no-yardsticks", action="store_true", help="skip astroscrappy and HOTPANTS alone")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON as well")
    ap.add_argument("--size", default="full", choices=("full", "small"), help="small: to try the harness quickly")
    ap.add_argument("--lock", default=LOCK, help="the lock heavy runs share")
    ap.add_argument("--markdown", type=Path, help="print the table of figures saved by --json as Markdown, and stop")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    ensure_night(args.night_dir, args.n_science, args.lock, args.size)
    only = [s for s in args.stages.split(",") if s]
    root = work_root(args.night_dir, args.work, keep=args.keep or bool(only))
    night = night_name(root)
    logdir = root / "bench-logs"
    logdir.mkdir(exist_ok=True)
    shims = make_shims(root / "bench-shims")
    env = dict(os.environ) | {"PATH": f"{root / 'bench-shims'}{os.pathsep}{os.environ.get('PATH', '')}"}
    rows = []
    # the lock is taken per process measured, so others' heavy runs interleave rather than wait an hour
    locked = functools.partial(fullsize_lock, args.lock)
    for stage in graph.ordered():
        if only and stage.name not in only and stage.name != "plan":
            continue
        if stage.name == "plan" and only and (root / "runs" / UNIT / night / "plan.json").is_file() \
                and "plan" not in only:
            continue
        runs = run_stage(stage, root, night, logdir, env, force=bool(only), lock=locked)
        yard: dict[str, list[dict]] = {}
        if not args.no_yardsticks and stage.name == "reduce":
            yard["astroscrappy"] = []
            for f in _entries(root, night, "frames"):
                with locked():
                    got = astroscrappy_alone(root, f, logdir)
                if got["rc"] == 0:
                    yard["astroscrappy"].append(got)
                else:
                    print(f"  (astroscrappy alone failed: see {logdir / 'astroscrappy.log'})")
        if not args.no_yardsticks and stage.name == "subtract" and "hotpants" in shims:
            yard["hotpants"] = []
            for e in _entries(root, night, "stacks"):
                with locked():
                    got = hotpants_alone(shims["hotpants"], root / e["output"], root, logdir)
                if got and got["rc"] == 0:
                    yard["hotpants"].append(got)
        rows.append(summarize(stage, runs, yard))
    plan = json.loads((root / "runs" / UNIT / night / "plan.json").read_text())
    raw = sum(1 for p in (root / "obsdata" / UNIT / night).glob("*.fits"))
    result = {"machine": machine(), "size": _size(root, plan), "frames": len(plan["frames"]), "raw_frames": raw,
              "night": str(args.night_dir), "tools": shims, "stages": rows,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"figures written to {args.json}")
    return 1 if any(r["failed"] for r in rows) else 0


def _size(root: Path, plan: dict) -> str:
    from astropy.io import fits

    h = fits.getheader(root / plan["frames"][0]["raw"])
    return f"{h['NAXIS1']}x{h['NAXIS2']}"


def _entries(root: Path, night: str, kind: str) -> list[dict]:
    """The plan's frames or stacks whose product the stages made."""
    plan = json.loads((root / "runs" / UNIT / night / "plan.json").read_text())
    return [e for e in plan[kind] if (root / e["output"]).is_file()]


if __name__ == "__main__":
    sys.exit(main())
