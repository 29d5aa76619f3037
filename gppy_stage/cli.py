"""The ``gppy`` command line. Thin: every command calls a stage, the runner or the simulator."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__, errors, graph, log

app = typer.Typer(help="gppy-stage: the 7DT / IMSNG imaging pipeline, locally or as Argo batch jobs.",
                  no_args_is_help=True, add_completion=False)
night_app = typer.Typer(help="Whole nights: plan and run every stage.", no_args_is_help=True)
stage_app = typer.Typer(help="One stage on one item, exactly as the Argo workflow calls it.", no_args_is_help=True)
sim_app = typer.Typer(help="Simulated 7DT data with known truth.", no_args_is_help=True)
library_app = typer.Typer(help="The master library (master_frame/<unit>/...).", no_args_is_help=True)
app.add_typer(night_app, name="night")
app.add_typer(stage_app, name="stage")
app.add_typer(sim_app, name="sim")
app.add_typer(library_app, name="library")

ROOT_HELP = "Storage root: a folder or s3://bucket/prefix, laid out as obsdata/<unit>/<night>/..."
OBS_HELP = "Unit or observatory, e.g. 7DT01 (a row of config/instruments.csv)."
NIGHT_HELP = "Night folder, e.g. 2025-01-01_gain2750; default: the unit's latest complete night."


def _version(value: bool):
    if value:
        typer.echo(f"gppy-stage {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    log.setup()


def _fail(exc: BaseException) -> None:
    """Print a typed error as one line and exit with its documented code."""
    code = errors.exit_code_for(exc)
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code)


def _night_or_latest(root: str, obs: str, night: Optional[str], planning: bool = False) -> str:
    from .stages.plan import check_root, latest_night

    if planning:  # a wrong root is said before anything is written under it
        from .config import instrument

        instrument(obs)
        check_root(root, obs)
    return night or latest_night(root, obs)


# --- nights -----------------------------------------------------------------------------


@night_app.command("run")
def night_run(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    obs: str = typer.Option(..., "--obs", help=OBS_HELP),
    night: Optional[str] = typer.Option(None, "--night", help=NIGHT_HELP),
    force: bool = typer.Option(False, "--force", help="Redo work whose outputs already exist."),
    workers: int = typer.Option(0, "--workers", help="Worker processes (0: one per core, as memory allows at 6 GB each)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the night report JSON here."),
):
    """Plan a night and run every stage on it; print a summary and write the night report."""
    from .runner import run_night, summary_text

    try:
        night = _night_or_latest(root, obs, night, planning=True)
        result = run_night(root, obs, night, force=force, workers=workers or None)
    except errors.GppyError as exc:
        _fail(exc)
    if report:
        report.write_text(json.dumps(result, indent=1, default=str))
    typer.echo(summary_text(result))
    raise typer.Exit(result["exit_code"])  # a lost frame or stack is not a success (README: exit codes)


@app.command("plan")
def plan_cmd(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    obs: str = typer.Option(..., "--obs", help=OBS_HELP),
    night: Optional[str] = typer.Option(None, "--night", help=NIGHT_HELP),
):
    """Plan a night (classify frames, group calibration sets and stacks) and print the plan's summary."""
    from .runner import invoke

    try:
        night = _night_or_latest(root, obs, night, planning=True)
    except errors.GppyError as exc:
        _fail(exc)
    record = invoke("plan", root, obs, night).to_dict()
    typer.echo(json.dumps(record["result"] or record["error"], indent=1))
    raise typer.Exit(record["exit_code"])


# --- stages (built from the graph, so the workflow and the CLI cannot disagree) ----------


def _stage_command(stage: graph.Stage):
    def command(**kwargs):
        from .runner import invoke

        root, obs, night, force = kwargs.pop("root"), kwargs.pop("obs"), kwargs.pop("night"), kwargs.pop("force")
        item = kwargs.pop(stage.fanout, None) if stage.item_arg else None
        if stage.exit_handler and not night:
            # the plan failed before choosing a night: report that, rather than guess another night
            night = "unplanned"
        try:
            night = _night_or_latest(root, obs, night, planning=stage.name == "plan")
        except errors.GppyError as exc:
            _fail(exc)
        extra = {k: v for k, v in kwargs.items() if v is not None}
        record = invoke(stage.name, root, obs, night, item, force, **extra)
        typer.echo(record.log_line())
        raise typer.Exit(record.exit_code)

    P = inspect.Parameter
    params = [
        P("root", P.KEYWORD_ONLY, annotation=str, default=typer.Option(..., "--root", help=ROOT_HELP)),
        P("obs", P.KEYWORD_ONLY, annotation=str, default=typer.Option(..., "--obs", help=OBS_HELP)),
        P("night", P.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(None, "--night", help=NIGHT_HELP)),
    ]
    if stage.item_arg:
        params.append(P(stage.fanout, P.KEYWORD_ONLY, annotation=str,
                        default=typer.Option(..., stage.item_arg, help=f"The {stage.fanout} id (from plan.json).")))
    if stage.name == "plan":
        params.append(P("outputs_dir", P.KEYWORD_ONLY, annotation=Optional[str],
                        default=typer.Option(None, "--outputs-dir",
                                             help="Write the fan-out lists (calsets.json, frames.json, stacks.json, night) here, for Argo.")))
    for flag in stage.extra_args:
        params.append(P(flag.lstrip("-").replace("-", "_"), P.KEYWORD_ONLY, annotation=Optional[str],
                        default=typer.Option(None, flag, help=graph.EXTRA_ARGS[flag])))
    params.append(P("force", P.KEYWORD_ONLY, annotation=bool,
                    default=typer.Option(False, "--force", help="Redo the work even if its outputs exist.")))
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = stage.help + ("" if not stage.gpu else " Runs on the GPU when GPPY_DEVICE=gpu|auto finds one.")
    command.__name__ = stage.name
    return command


for _stage in graph.STAGES:
    stage_app.command(_stage.name, help=_stage.help)(_stage_command(_stage))


# --- single frames, the simulator, the library ---------------------------------------------


@app.command("reduce-file")
def reduce_file_cmd(
    path: str = typer.Argument(..., help="A raw frame (path or URL) of any telescope."),
    out: str = typer.Option(..., "--out", help="Where to write the reduced frame."),
    obs: Optional[str] = typer.Option(None, "--obs", help=OBS_HELP + " Gives gain and read noise when the header lacks them."),
    cosmic_rays: bool = typer.Option(True, "--cosmic-rays/--no-cosmic-rays", help="Remove cosmic rays (LIGHT frames)."),
):
    """Reduce one frame on its own: header normalisation, overscan, masks, variance, cosmic rays."""
    from .stages.reduce import reduce_file

    try:
        result = reduce_file(path, out, obs, cosmic_rays)
    except errors.GppyError as exc:
        _fail(exc)
    typer.echo(json.dumps(result, default=str))


@sim_app.command("night")
def sim_night(
    out: Path = typer.Option(..., "--out", help="Folder to write (a storage root: obsdata/, ref_cat/, truth/...)."),
    unit: str = typer.Option("7DT01", "--unit", help="Unit to simulate."),
    night: str = typer.Option("2025-01-01", "--night", help="Night date (YYYY-MM-DD)."),
    filters: Optional[str] = typer.Option(None, "--filters", help="Comma-separated filters [7DT: m425,m475]."),
    size: str = typer.Option("small", "--size", help="small (1536x1024, seconds; with --obs 1024 a side), tiny "
                             "(half that) or full (the registry's size: 9576x6388 for 7DT)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same night."),
    calib: str = typer.Option("bias,dark,flat", "--calib", help="Calibration frames the night has."),
    n_science: int = typer.Option(3, "--n-science", help="Science frames per filter."),
    transient_change: float = typer.Option(0.0, "--transient-change", help="Magnitudes the transient changes by from "
                                           "the first science frame to the last, linearly (negative: brightens)."),
    movers: Optional[str] = typer.Option(None, "--movers", help="Solar-system movers, RATE:PA[:MAG|:snrN] each "
                                         "(arcsec/h, deg E of N), comma-separated, e.g. 5:40,300:250:snr10; "
                                         "truth in truth/<unit>/<night>/movers.csv."),
    filter_gap_min: float = typer.Option(0.5, "--filter-gap-min", help="Minutes between one filter's frames and the "
                                         "next's: an hour or more lets a slow mover move between stacks."),
    obs: Optional[str] = typer.Option(None, "--obs", help="An IMSNG/GECKO site instead of a 7DT unit (LOAO, KCT, "
                                      "RASA36): its detector, MaxIm headers, folder and file names, its filters "
                                      "unless --filters is given, and a PS1 or APASS reference catalogue."),
):
    """Simulate a raw 7DT night in the exact TCSpy layout (or, with --obs, an IMSNG/GECKO site's
    night as MaxIm DL writes it), with truth and a reference catalogue."""
    from tqdm import tqdm

    from .sim import simulate_night
    from .sim.lightcurve import LightCurve
    from .sim.imsng import simulate_site_night

    with tqdm(desc="simulating", unit="frame", file=sys.stderr) as bar:
        def progress(done, total, name):
            bar.total = total
            bar.update(done - bar.n)

        try:
            if obs is not None:
                given = {"filters": tuple(f for f in filters.split(",") if f)} if filters else {}
                summary = simulate_site_night(out, obs=obs, night=night, size=size, seed=seed, n_science=n_science,
                                              progress=progress, **given)
            else:
                filters = filters or "m425,m475"
                summary = simulate_night(out, unit=unit, night=night, filters=tuple(f for f in filters.split(",") if f),
                                         size=size, seed=seed, calib=tuple(c for c in calib.split(",") if c),
                                         n_science=n_science, progress=progress,
                                         transient_lc=LightCurve(transient_change) if transient_change else None,
                                         movers=movers,
                                         filter_gap_s=filter_gap_min * 60.0)
        except errors.GppyError as exc:
            _fail(exc)
    summary.pop("files", None)
    typer.echo(json.dumps(summary, indent=1, default=str))


@sim_app.command("check")
def sim_check(
    root: Path = typer.Option(..., "--root", help="The simulated night's folder, after `gppy night run`."),
    obs: str = typer.Option("7DT01", "--obs", help=OBS_HELP),
    night: str = typer.Option("2025-01-01_gain2750", "--night", help="Night folder."),
):
    """Say whether the simulated transient was found, where and how bright (against the truth)."""
    from .sim.check import check_night

    try:
        transient, rows = check_night(root, obs, night)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc.filename}: not found (simulate with `gppy sim night` and run the night first)", err=True)
        raise typer.Exit(errors.CONFIG)
    typer.echo(f"simulated transient at RA {transient['ra']:.6f} Dec {transient['dec']:.6f}, "
               f"{transient['host_offset_arcsec']:.1f}\" from its host galaxy:")
    for r in rows:
        if r["found"]:
            c = r["candidate"]
            typer.echo(f"  {r['filter']}: FOUND as candidate #{c['id']} of {c['stack']}, {r['sep_arcsec']:.2f}\" away, "
                       f"mag {c['mag']:.2f} (true {r['true_mag']:.2f}, {r['dmag']:+.2f}), S/N {c['snr']:.0f}"
                       + (f", stamp {root / c['stamp']}" if c.get("stamp") else ""))
        else:
            typer.echo(f"  {r['filter']}: not found (true mag {r['true_mag']:.2f})")
    if not all(r["found"] for r in rows):
        raise typer.Exit(1)


@app.command("train-realbogus")
def train_realbogus(
    seed: int = typer.Option(1, "--seed", help="Seed of the simulated training examples (seed + 1 validates)."),
    out: Path = typer.Option(Path("gppy_stage/models/realbogus.joblib"), "--out",
                             help="Model file to write; its card goes beside it as .json."),
    n_real: int = typer.Option(6000, "--n-real", help="Real examples (point sources on sky and galaxies)."),
    n_bogus: int = typer.Option(6000, "--n-bogus", help="Bogus examples, shared equally among their kinds."),
):
    """Train the real/bogus classifier of the detect stage on simulated labelled stamps."""
    from .sim.bogus import train

    command = f"gppy train-realbogus --seed {seed} --out {out} --n-real {n_real} --n-bogus {n_bogus}"
    card = train(seed, n_real, n_bogus, out, command=command)
    typer.echo(json.dumps(card, indent=1))


@library_app.command("list")
def library_list(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    obs: str = typer.Option(..., "--obs", help=OBS_HELP),
):
    """List the masters of a unit with their QA verdicts (the index the planner queries)."""
    from . import library

    try:
        index = {kind: library.index(root, obs, kind) for kind in library.KINDS}
    except errors.GppyError as exc:
        _fail(exc)
    for kind in library.KINDS:
        for m in sorted(index[kind], key=lambda m: m.mjd):
            extra = f"{m.exptime:g}s" if kind == "dark" and m.exptime is not None else (m.filter or "")
            typer.echo(f"{kind:<5} {m.mjd:12.5f} {extra:<8} {m.verdict:<5} {m.key}")


def _register_optional():
    """Commands of parts that may not be installed everywhere (the cluster side needs hera/kubernetes)."""
    try:
        from .cluster.cli import register
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("hera", "kubernetes"):
            raise  # a missing module of our own is a bug, not an optional part
        return  # without the [cluster] extra there is no watch/backlog: the rest works
    register(app)


_register_optional()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
