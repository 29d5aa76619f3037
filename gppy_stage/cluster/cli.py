"""``gppy watch`` and ``gppy backlog``: the cluster's commands, added to the main app by
``register(app)`` (called from ``gppy_stage/cli.py``)."""

from __future__ import annotations

from datetime import date

import typer

from .. import log
from ..errors import ConfigError, GppyError
from . import submission


def _units(text: str) -> list[str]:
    return [u.strip() for u in text.replace(" ", ",").split(",") if u.strip()]


def _day(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{option} wants a date YYYY-MM-DD, got {text!r}") from None


def _fail(exc: GppyError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(exc.exit_code)


def watch(
    root: str = typer.Option(..., "--root", envvar="GPPY_ROOT",
                             help="Storage root holding obsdata/ (s3://bucket or a folder)."),
    units: str = typer.Option("", "--units", envvar="GPPY_UNITS",
                              help="Units to watch, comma separated (7DT01,7DT02,...)."),
    namespace: str = typer.Option(submission.NAMESPACE, "--namespace", envvar="GPPY_NAMESPACE",
                                  help="Kubernetes namespace the night workflows go to."),
    quiet_minutes: float = typer.Option(30.0, "--quiet-minutes", envvar="GPPY_QUIET_MINUTES",
                                        help="A night is ready once its newest file is at least this old "
                                             "(and its size did not change since the last poll)."),
    poll_gap_minutes: float = typer.Option(2.5, "--poll-gap-minutes", envvar="GPPY_POLL_GAP_MINUTES",
                                           help="A night's size must be unchanged since a poll at least this "
                                                "long ago (half the CronJob's 5-minute period): a second watcher "
                                                "running at the same moment is not a later poll."),
    lookback_days: int = typer.Option(7, "--lookback-days", envvar="GPPY_LOOKBACK_DAYS",
                                      help="Only nights this recent are watched; older ones are for `gppy backlog`."),
    once: bool = typer.Option(False, "--once", help="Poll once and exit (the CronJob); without it, poll forever."),
    interval: float = typer.Option(300.0, "--interval", help="Seconds between polls when not --once."),
    include_test: bool = typer.Option(False, "--include-test",
                                      help="Also submit *_test night folders (skipped by default)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be submitted; submit and write nothing."),
    kubeconfig: str = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG",
                                   help="kubeconfig to use outside a cluster (inside one, the pod's service account)."),
    resubmit: tuple[str, str] = typer.Option(None, "--resubmit", metavar="OBS NIGHT",
                                             help="Submit one night again (after late files: the watcher names "
                                                  "them in Slack and the night report), then exit."),
) -> None:
    """Submit each night's workflow once its raw folder has stopped growing."""
    from . import watcher

    log.setup()
    try:
        api = None if dry_run else watcher.kube_api(kubeconfig)
        if resubmit and resubmit[0]:
            d = watcher.resubmit(root, resubmit[0], resubmit[1], api, namespace=namespace, dry_run=dry_run)
            typer.echo(f"{d.action}\t{d.unit}\t{d.night}\t{d.workflow}")
            return
        watcher.watch(root, _units(units), api, interval_s=interval, once=once, namespace=namespace,
                      quiet_s=quiet_minutes * 60, lookback_days=lookback_days, include_test=include_test,
                      dry_run=dry_run, min_gap_s=poll_gap_minutes * 60)
    except GppyError as exc:
        raise _fail(exc) from None


def backlog(
    obs: str = typer.Option(..., "--obs", help="The unit whose nights to reprocess, e.g. 7DT03."),
    date_from: str = typer.Option(..., "--from", help="First night date, YYYY-MM-DD (inclusive)."),
    date_to: str = typer.Option(..., "--to", help="Last night date, YYYY-MM-DD (inclusive)."),
    root: str = typer.Option(..., "--root", envvar="GPPY_ROOT",
                             help="Storage root holding obsdata/ (s3://bucket or a folder)."),
    namespace: str = typer.Option(submission.NAMESPACE, "--namespace", envvar="GPPY_NAMESPACE",
                                  help="Kubernetes namespace the workflows go to."),
    include_test: bool = typer.Option(False, "--include-test", help="Also submit *_test night folders."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be submitted; submit nothing."),
    kubeconfig: str = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG",
                                   help="kubeconfig to use outside a cluster (inside one, the pod's service account)."),
) -> None:
    """Submit one low-priority night workflow per night of a unit in a date range."""
    from . import watcher

    log.setup()
    try:
        start, end = _day(date_from, "--from"), _day(date_to, "--to")
        api = None if dry_run else watcher.kube_api(kubeconfig)
        decisions = watcher.backlog(root, obs, start, end, api, namespace=namespace,
                                    include_test=include_test, dry_run=dry_run)
    except GppyError as exc:
        raise _fail(exc) from None
    for d in decisions:
        typer.echo(f"{d.action}\t{d.unit}\t{d.night}\t{d.workflow or '-'}")
    typer.echo(f"{sum(d.action in ('submitted', 'would-submit') for d in decisions)} night(s) "
               f"{'would be submitted' if dry_run else 'submitted'}, "
               f"{sum(d.action == 'exists' for d in decisions)} already there")


def register(app: typer.Typer) -> None:
    app.command("watch")(watch)
    app.command("backlog")(backlog)
