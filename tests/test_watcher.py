"""The watcher and the backlog, against a real S3 endpoint (moto_server on 127.0.0.1) and a
Kubernetes API emulator speaking real HTTP, driven by the official kubernetes client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import manifest_checks as checks
import pytest
import typer
from typer.testing import CliRunner

from gppy_stage import storage
from gppy_stage.cluster import watcher, workflow
from gppy_stage.cluster.cli import register

SECRET_HOOK_PATH = "/services/T000/B000/s3cr3t-token-do-not-log"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(handler_cls) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


# --- S3: moto_server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("GPPY_S3_ENDPOINT", raising=False)
    # storage keeps one boto3 client per thread, made on first use: drop one that another test
    # may have pointed at another endpoint
    monkeypatch.setattr(storage._local, "client", None, raising=False)
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def put_raw(root: str, unit: str, night: str, n: int, start: int = 0, size: int = 1000) -> None:
    for i in range(start, start + n):
        key = f"obsdata/{unit}/{night}/{unit}_20250101_03{i:02d}00_M31_r_1x1_60.0s_{i:04d}.fits"
        storage.put_bytes(storage.join(root, key), b"\0" * size, allow_raw=True)


# --- a Kubernetes API emulator ---------------------------------------------------------------


class KubeAPI:
    """Workflows in a dict behind the Kubernetes REST paths the client uses: POST creates (409 when
    the name exists; 422 when the body fails Argo's strict CRD schema, as an API server would), GET
    reads one or lists them. A namespace named "forbidden" answers 403."""

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.creates = 0  # POST attempts
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code, reason, message):
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "reason": reason, "message": message, "code": code})

            def _route(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                # apis/argoproj.io/v1alpha1/namespaces/<ns>/workflows[/<name>]
                if parts[:3] != ["apis", "argoproj.io", "v1alpha1"] or parts[3] != "namespaces" or parts[5] != "workflows":
                    return None
                return parts[4], (parts[6] if len(parts) > 6 else None)

            def do_POST(self):
                route = self._route()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if route is None:
                    return self._status(404, "NotFound", self.path)
                ns, _ = route
                if ns == "forbidden":
                    return self._status(403, "Forbidden", "workflows is forbidden")
                errs = checks.argo_schema_errors(body)
                if errs:
                    return self._status(422, "Invalid", "; ".join(errs))
                with api.lock:
                    api.creates += 1
                    name = body["metadata"].get("name") or body["metadata"]["generateName"] + uuid.uuid4().hex[:5]
                    if (ns, name) in api.objects:
                        return self._status(409, "AlreadyExists", f'workflows.argoproj.io "{name}" already exists')
                    body["metadata"].update(name=name, namespace=ns, uid=str(uuid.uuid4()),
                                            creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                    api.objects[(ns, name)] = body
                self._send(201, body)

            def do_GET(self):
                route = self._route()
                if route is None:
                    return self._status(404, "NotFound", self.path)
                ns, name = route
                with api.lock:
                    if name is None:
                        items = [o for (n, _), o in api.objects.items() if n == ns]
                        return self._send(200, {"apiVersion": "argoproj.io/v1alpha1", "kind": "WorkflowList",
                                                "metadata": {}, "items": items})
                    obj = api.objects.get((ns, name))
                if obj is None:
                    return self._status(404, "NotFound", name)
                self._send(200, obj)

        self.server, self.url = _serve(Handler)

    def names(self, ns: str = "gppy") -> list[str]:
        return sorted(n for (s, n) in self.objects if s == ns)


@pytest.fixture
def kube(tmp_path, monkeypatch):
    api = KubeAPI()
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": api.url}}],
        "users": [{"name": "emu", "user": {"token": "dummy"}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu", "namespace": "gppy"}}],
    }))
    api.kubeconfig = str(cfg)
    monkeypatch.setenv("KUBECONFIG", str(cfg))
    # not inside a pod here, whatever the machine says
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield api
    api.server.shutdown()


@pytest.fixture
def slack(monkeypatch):
    """A webhook receiver on 127.0.0.1; its URL (the secret) is set the way the CronJob sets it."""
    got: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            got.append({"path": self.path, **json.loads(self.rfile.read(int(self.headers["Content-Length"])))})
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    server, url = _serve(Hook)
    monkeypatch.setenv(watcher.SLACK_ENV, url + SECRET_HOOK_PATH)
    yield got
    server.shutdown()


def _poll(root, kube, **kw):
    kw.setdefault("quiet_s", 0)
    return watcher.poll(root, kw.pop("units", ["7DT03"]), watcher.kube_api(kube.kubeconfig), **kw)


def _action(decisions, night):
    return [d.action for d in decisions if d.night == night]


TODAY = time.strftime("%Y-%m-%d", time.gmtime())
# a regular night is only taken once it is over: two days ago always is
DONE = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 2 * 86400))
NIGHT = f"{DONE}_gain2750"


# --- the watcher -----------------------------------------------------------------------------


def test_a_growing_night_is_not_submitted(bucket, kube):
    put_raw(bucket, "7DT03", NIGHT, 3)
    assert _action(_poll(bucket, kube), NIGHT) == ["growing"]  # first sight: nothing to compare with
    for i in range(3):
        put_raw(bucket, "7DT03", NIGHT, 1, start=3 + i)
        assert _action(_poll(bucket, kube), NIGHT) == ["growing"]
    assert kube.creates == 0 and kube.names() == []
    state = json.loads(storage.get_bytes(storage.join(bucket, watcher.STATE_KEY)))
    assert state["nights"][f"7DT03/{NIGHT}"]["count"] == 6


def test_a_stable_night_waits_for_the_quiet_period(bucket, kube):
    put_raw(bucket, "7DT03", NIGHT, 2)
    _poll(bucket, kube, quiet_s=3600)
    assert _action(_poll(bucket, kube, quiet_s=3600), NIGHT) == ["settling"]
    # an hour later with nothing new, it is ready
    assert _action(_poll(bucket, kube, quiet_s=3600, now=time.time() + 3700), NIGHT) == ["submitted"]
    assert kube.creates == 1


def test_a_stable_night_is_submitted_once_across_many_polls(bucket, kube, slack, caplog):
    caplog.set_level("INFO", logger="gppy")
    put_raw(bucket, "7DT03", NIGHT, 4)
    actions = [_action(_poll(bucket, kube), NIGHT) for _ in range(6)]
    assert actions[:2] == [["growing"], ["submitted"]]
    assert all(a == [] for a in actions[2:])  # the marker: the night is not even looked at again
    name = watcher.workflow_name("7DT03", NIGHT)
    assert kube.names() == [name] and kube.creates == 1
    wf = kube.objects[("gppy", name)]
    params = {p["name"]: p.get("value") for p in wf["spec"]["arguments"]["parameters"]}
    assert params == {"obs": "7DT03", "night": NIGHT, "root": bucket}
    assert wf["spec"]["workflowTemplateRef"]["name"] == workflow.TEMPLATE_NAME
    marker = json.loads(storage.get_bytes(watcher.marker_url(bucket, "7DT03", NIGHT)))
    assert marker["workflow"] == name and marker["result"] == "submitted"
    assert len(slack) == 1 and "new night detected: 7DT03 " + NIGHT in slack[0]["text"]
    assert slack[0]["path"] == SECRET_HOOK_PATH
    logged = [f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records]
    assert any(line.startswith("submitted") for line in logged)
    assert not any("s3cr3t-token" in line for line in logged)


def test_two_watchers_racing_submit_once(bucket, kube, slack):
    put_raw(bucket, "7DT03", NIGHT, 3)
    barrier = threading.Barrier(2)
    results: list[list] = [[], []]
    failures = []

    def run(i):
        try:
            api = watcher.kube_api(kube.kubeconfig)
            for _ in range(4):
                barrier.wait(timeout=60)
                results[i] += watcher.poll(bucket, ["7DT03"], api, quiet_s=0)
        except Exception as exc:  # surfaced below: a thread's exception would otherwise vanish
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures
    assert kube.names() == [watcher.workflow_name("7DT03", NIGHT)]
    created = [d for r in results for d in r if d.action == "submitted"]
    assert len(created) == 1 and len(slack) == 1
    # whoever lost the race was told by the API server (409), or saw the winner's marker
    assert kube.creates in (1, 2)


def test_submission_is_idempotent_at_the_api(kube):
    api = watcher.kube_api(kube.kubeconfig)
    body = workflow.night_workflow("7DT03", NIGHT, name=watcher.workflow_name("7DT03", NIGHT))
    assert watcher.submit(api, "gppy", body) == "created"
    assert watcher.submit(api, "gppy", body) == "exists"
    assert kube.creates == 2 and len(kube.names()) == 1
    from gppy_stage.errors import ConfigError

    with pytest.raises(ConfigError, match="403"):
        watcher.submit(api, "forbidden", body)


def test_too_test_and_stray_folders(bucket, kube):
    too, test, old = f"{TODAY}_ToO_gain2750", f"{DONE}_gain2750_test", "2001-01-01_gain2750"
    tonight = f"{TODAY}_gain2750"
    for night in (too, test, old, "not-a-night", tonight):
        put_raw(bucket, "7DT03", night, 2)
    _poll(bucket, kube)
    d = _poll(bucket, kube)
    assert _action(d, too) == ["submitted"] and _action(d, test) == ["skipped-test"]
    # tonight's regular folder is stable but the night is not over (clouds, not dawn): it waits
    assert _action(d, tonight) == ["in-progress"] and watcher.workflow_name("7DT03", tonight) not in kube.names()
    assert _action(d, old) == [] and _action(d, "not-a-night") == []  # beyond the lookback; not a night
    wf = kube.objects[("gppy", watcher.workflow_name("7DT03", too))]
    assert wf["spec"]["priority"] == workflow.WORKFLOW_PRIORITY_TOO
    assert wf["metadata"]["labels"]["gppy.io/too"] == "true"
    # a skipped folder was never observed: with --include-test it settles like any other
    assert _action(_poll(bucket, kube, include_test=True), test) == ["growing"]
    assert _action(_poll(bucket, kube, include_test=True), test) == ["submitted"]


def test_workflow_names_are_dns_safe_and_distinct():
    nights = ["2025-01-01_gain2750", "2025-01-01_ToO_gain2750", "2025-01-01_gain2750_ToO",
              "2025-01-01_gain2750_too", "2025-01-01_gain2750_1x1_test"]
    names = [watcher.workflow_name("7DT03", n) for n in nights]
    assert len(set(names)) == len(names)
    for n in names:
        assert len(n) <= 63 and n == n.lower()
        assert all(c.isalnum() or c == "-" for c in n) and n[0].isalnum() and n[-1].isalnum()
    assert watcher.workflow_name("7DT03", nights[0]) == names[0]  # deterministic


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("version")(lambda: None)
    register(app)
    return app


def test_watch_once_command(bucket, kube, monkeypatch):
    monkeypatch.setenv("GPPY_ROOT", bucket)
    monkeypatch.setenv("GPPY_UNITS", "7DT01,7DT03")
    monkeypatch.setenv("GPPY_QUIET_MINUTES", "0")
    monkeypatch.setenv("GPPY_POLL_GAP_MINUTES", "0")
    put_raw(bucket, "7DT03", NIGHT, 2)
    runner = CliRunner()
    for _ in range(2):
        r = runner.invoke(_cli(), ["watch", "--once"])
        assert r.exit_code == 0, r.output
    assert kube.names() == [watcher.workflow_name("7DT03", NIGHT)]
    r = runner.invoke(_cli(), ["watch", "--once", "--units", ""])
    assert r.exit_code == 78 and "no units" in r.output


# --- backlog ---------------------------------------------------------------------------------


BACKLOG = ["2023-12-31_gain2750", "2024-01-01_gain2750", "2024-02-15_ToO_gain2750", "2024-03-31_gain2750",
           "2024-03-31_gain2750_test", "2024-04-01_gain2750"]
IN_RANGE = ["2024-01-01_gain2750", "2024-02-15_ToO_gain2750", "2024-03-31_gain2750"]


def test_backlog_dry_run_then_submit(bucket, kube):
    for night in BACKLOG:
        put_raw(bucket, "7DT03", night, 1)
    runner = CliRunner()
    args = ["backlog", "--obs", "7DT03", "--from", "2024-01-01", "--to", "2024-03-31", "--root", bucket]
    r = runner.invoke(_cli(), args + ["--dry-run"])
    assert r.exit_code == 0, r.output
    lines = [ln.split("\t") for ln in r.output.splitlines() if ln.startswith("would-submit")]
    assert [ln[2] for ln in lines] == IN_RANGE and kube.creates == 0
    r = runner.invoke(_cli(), args)
    assert r.exit_code == 0, r.output
    assert kube.names() == sorted(watcher.workflow_name("7DT03", n) for n in IN_RANGE)
    for wf in kube.objects.values():
        params = {p["name"]: p.get("value") for p in wf["spec"]["arguments"]["parameters"]}
        assert params["priority-class"] == workflow.PRIORITY_BACKLOG
        assert wf["spec"]["synchronization"]["semaphores"][0]["configMapKeyRef"]["key"] == workflow.SEM_BACKLOG
    # a second run changes nothing
    r = runner.invoke(_cli(), args)
    assert r.exit_code == 0 and "0 night(s) submitted, 3 already there" in r.output
    assert len(kube.objects) == 3


def test_backlog_refuses_a_reversed_range(bucket, kube):
    with pytest.raises(Exception, match="before"):
        watcher.backlog(bucket, "7DT03", date(2024, 3, 1), date(2024, 1, 1), None)


# --- late files and resubmission -------------------------------------------------------------


def _plan_stub(root: str, unit: str, night: str) -> None:
    """The least plan.json a night report is built from (the workflow's plan step writes the real one)."""
    storage.put_bytes(storage.join(root, "runs", unit, night, "plan.json"), json.dumps(
        {"unit": unit, "night": night, "frames": [], "stacks": [], "calsets": [], "quarantine": []}).encode())


def test_late_files_are_reported_once_and_the_night_can_be_resubmitted(bucket, kube, slack, monkeypatch):
    from gppy_stage import report

    put_raw(bucket, "7DT03", NIGHT, 4)
    assert [_action(_poll(bucket, kube), NIGHT) for _ in range(2)] == [["growing"], ["submitted"]]
    put_raw(bucket, "7DT03", NIGHT, 1, start=4)  # arrives after the night went
    late_key = "7DT03_20250101_030400_M31_r_1x1_60.0s_0004.fits"
    assert _action(_poll(bucket, kube), NIGHT) == ["late-files"]
    assert len(slack) == 2 and "late files" in slack[1]["text"] and late_key in slack[1]["text"]
    assert f"gppy watch --resubmit 7DT03 {NIGHT}" in slack[1]["text"]
    record = json.loads(storage.get_bytes(watcher.late_record_url(bucket, "7DT03", NIGHT)))
    assert record["status"] == "failed" and record["files"] == [late_key]
    assert record["submitted"]["count"] == 4 and record["now"]["count"] == 5
    # the night report lists it with the night's failures
    _plan_stub(bucket, "7DT03", NIGHT)
    rep = report.build(report.collect(bucket, "7DT03", NIGHT))
    late = [f for f in rep["failures"] if f["stage"] == "watcher"]
    assert late and late_key in late[0]["reason"] and "resubmit" in late[0]["reason"]
    # said once: a later poll that sees the same folder stays quiet
    assert _action(_poll(bucket, kube), NIGHT) == ["late-files"] and len(slack) == 2
    assert kube.names() == [watcher.workflow_name("7DT03", NIGHT)]

    monkeypatch.setenv("GPPY_ROOT", bucket)
    r = CliRunner().invoke(_cli(), ["watch", "--resubmit", "7DT03", NIGHT])
    assert r.exit_code == 0, r.output
    again = watcher.workflow_name("7DT03", NIGHT, 1)
    assert again.endswith("-r1") and len(again) <= 63
    assert kube.names() == sorted([watcher.workflow_name("7DT03", NIGHT), again])
    params = {p["name"]: p.get("value") for p in kube.objects[("gppy", again)]["spec"]["arguments"]["parameters"]}
    assert params["night"] == NIGHT and params["obs"] == "7DT03"
    marker = json.loads(storage.get_bytes(watcher.marker_url(bucket, "7DT03", NIGHT)))
    assert marker["count"] == 5 and marker["workflow"] == again and "late" not in marker
    rep = report.build(report.collect(bucket, "7DT03", NIGHT))
    assert not [f for f in rep["failures"] if f["stage"] == "watcher"]  # resubmitted: no longer a loss
    assert _action(_poll(bucket, kube), NIGHT) == [] and len(slack) == 3 and "resubmitted" in slack[2]["text"]
    # a typo is a clear config error, not an empty resubmission
    r = CliRunner().invoke(_cli(), ["watch", "--resubmit", "7DT03", "2025-13-45_gain2750"])
    assert r.exit_code == 78 and "date" in r.output
    r = CliRunner().invoke(_cli(), ["watch", "--resubmit", "7DT03", f"{DONE}_ToO_gain2750"])
    assert r.exit_code == 78 and "holds no files" in r.output


def _age_state(root: str, seconds: float) -> None:
    """Move every observation in the watcher's state back in time: the next CronJob run comes
    this much later (the objects' own ages do not matter with --quiet-minutes 0)."""
    url = storage.join(root, watcher.STATE_KEY)
    state = json.loads(storage.get_bytes(url))
    for obs in state["nights"].values():
        obs["polled"] -= seconds
    storage.put_bytes(url, json.dumps(state).encode())


def test_five_racing_watcher_processes_submit_each_stable_night_once(bucket, kube, slack):
    """Real ``gppy watch --once`` processes, five at a time, three rounds a CronJob period apart: a
    night there from the start, one that grows for two rounds and then stops, one that never
    stops growing. Watchers of one round race each other (and read each other's state).
    Before the poll gap, the straggler took a night that had grown since the last round for one
    that had stopped, whenever it read what the others had just written."""
    import os

    stable, grows, forever = NIGHT, f"{DONE}_gain2750_1x1", f"{DONE}_ToO_gain2750"
    put_raw(bucket, "7DT03", stable, 3)
    env = dict(os.environ, GPPY_ROOT=bucket, GPPY_UNITS="7DT03", GPPY_QUIET_MINUTES="0",
               KUBECONFIG=kube.kubeconfig)
    env.pop("GPPY_POLL_GAP_MINUTES", None)  # the default: half the CronJob's period
    submitted_after: list[list[str]] = []
    for rnd in range(3):
        if rnd < 2:
            put_raw(bucket, "7DT03", grows, 2, start=2 * rnd)
        put_raw(bucket, "7DT03", forever, 1, start=rnd)
        procs = [subprocess.Popen(["gppy", "watch", "--once"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(5)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        # and a straggler in the same round (a watcher started by hand a moment after the CronJob's):
        # it reads what the five just wrote, which is no older poll
        late = subprocess.run(["gppy", "watch", "--once"], env=env, capture_output=True, text=True, timeout=300)
        assert all(p.returncode == 0 for p in procs) and late.returncode == 0, outs + [late.stdout + late.stderr]
        submitted_after.append(kube.names())
        _age_state(bucket, 300)
    name = {n: watcher.workflow_name("7DT03", n) for n in (stable, grows, forever)}
    # the stable night goes at the second round (the first only sees it); the growing one only
    # once it has stopped (round 3); the one that never stops, never
    assert submitted_after[0] == [] and submitted_after[1] == [name[stable]], submitted_after
    assert sorted(submitted_after[2]) == sorted([name[stable], name[grows]]), submitted_after
    assert all(name[forever] not in names for names in submitted_after)
    # exactly once: one Slack message per night, from the one watcher whose create succeeded
    assert sorted(m["text"].split(",")[0] for m in slack) == sorted(
        f"new night detected: 7DT03 {n}" for n in (stable, grows))
    for night, count in ((stable, 3), (grows, 4)):
        marker = json.loads(storage.get_bytes(watcher.marker_url(bucket, "7DT03", night)))
        assert marker["count"] == count and marker["workflow"] == name[night] and "late" not in marker
