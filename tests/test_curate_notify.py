"""Curate (products, header snapshots, night report) and Slack notifications.

Slack is a real HTTP server on 127.0.0.1 (webhook and chat.postMessage), made to fail on demand:
the token and the webhook URL must never show in an exception or a log line.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from astropy.io import fits

from gppy_stage.errors import ConfigError, RetriableError
from gppy_stage.notify import Slack
from gppy_stage.stages import notify as notify_stage
from gppy_stage.stages.base import Night
from test_stack import GOOD, NIGHT, STACK_FAILED, STACK_GOOD, UNIT, built_night, truth_frames

TOKEN = "xoxb-0000-SECRET-TOKEN-do-not-log"
HOOK_PATH = "/services/T000/B000/SECRETHOOKPATHxyz"


class _Slack(BaseHTTPRequestHandler):
    """Records each request; answers as the test sets ``server.mode``."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                     "json": json.loads(body)})
        mode = self.server.mode
        if mode == "500":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"oops, upstream said: " + TOKEN.encode())  # a careless server echoing the secret
            return
        if self.path.endswith("chat.postMessage"):
            ok = mode == "ok" and self.headers.get("Authorization") == f"Bearer {TOKEN}"
            answer = {"ok": True, "ts": "1700000000.000100"} if ok else {"ok": False, "error": "invalid_auth"}
            data = json.dumps(answer).encode()
        else:
            data = b"ok"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def slack_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slack)
    server.requests, server.mode = [], "ok"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def gppy_logs():
    """Every record of the gppy loggers (and urllib's, were there any), at DEBUG."""
    records: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage() + " " + json.dumps(getattr(record, "fields", {}), default=str))

    handler = H(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("gppy", "urllib3", "urllib")]
    old = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield records
    for lg, level in old:
        lg.removeHandler(handler)
        lg.setLevel(level)


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_webhook_message_delivered(slack_server):
    env = {"SLACK_WEBHOOK_URL": _url(slack_server) + HOOK_PATH}
    out = Slack.from_env(env).send("hello 7DT")
    assert out == {"sent": True, "mode": "webhook"}
    assert slack_server.requests == [{"path": HOOK_PATH, "auth": None, "json": {"text": "hello 7DT"}}]


def test_bot_message_delivered(slack_server):
    env = {"SLACK_BOT_TOKEN": TOKEN, "SLACK_CHANNEL": "#7dt-pipeline", "SLACK_API_URL": _url(slack_server)}
    out = Slack.from_env(env).send("night done")
    assert out["sent"] and out["ts"] == "1700000000.000100"
    req = slack_server.requests[0]
    assert req["path"] == "/chat.postMessage" and req["auth"] == f"Bearer {TOKEN}"
    assert req["json"] == {"text": "night done", "channel": "#7dt-pipeline"}


@pytest.mark.parametrize("mode,error", [("500", RetriableError), ("refuse", ConfigError), ("down", RetriableError)])
def test_failures_never_reveal_secrets(slack_server, gppy_logs, mode, error):
    url = _url(slack_server)
    if mode == "down":
        slack_server.shutdown()
        slack_server.server_close()
    else:
        slack_server.mode = mode if mode == "500" else "bad"
    bot = Slack.from_env({"SLACK_BOT_TOKEN": TOKEN, "SLACK_CHANNEL": "c", "SLACK_API_URL": url}, timeout=3)
    hook = Slack.from_env({"SLACK_WEBHOOK_URL": url + HOOK_PATH}, timeout=3)
    texts = []
    with pytest.raises(error) as err:
        bot.send("x")
    texts.append(str(err.value))
    if mode != "refuse":  # a webhook has no "ok": false; it fails the same ways otherwise
        with pytest.raises(error) as err2:
            hook.send("x")
        texts.append(str(err2.value))
    print(texts)
    everything = " ".join(texts + gppy_logs + [repr(bot), repr(hook)])
    assert TOKEN not in everything and "SECRETHOOKPATH" not in everything
    if mode == "500":
        assert all("HTTP 500" in t and "upstream said" not in t for t in texts)
    if mode == "refuse":
        assert "invalid_auth" in texts[0]


def test_malformed_secrets_are_a_clear_error_that_never_shows_them(slack_server, gppy_logs):
    url = _url(slack_server)
    # a token with a newline inside (a header may not hold one), a webhook URL without a scheme
    bot = Slack.from_env({"SLACK_BOT_TOKEN": TOKEN + "\nX", "SLACK_CHANNEL": "c", "SLACK_API_URL": url}, timeout=3)
    hook = Slack.from_env({"SLACK_WEBHOOK_URL": "hooks.slack.example" + HOOK_PATH}, timeout=3)
    texts = []
    for client in (bot, hook):
        with pytest.raises(ConfigError, match="malformed") as err:
            client.send("x")
        texts.append(str(err.value))
    everything = " ".join(texts + gppy_logs)
    assert TOKEN not in everything and "SECRETHOOKPATH" not in everything
    # the newline a secret made from a file ends with is not part of the secret
    trailing = Slack.from_env({"SLACK_BOT_TOKEN": TOKEN + "\n", "SLACK_CHANNEL": "c", "SLACK_API_URL": url})
    assert trailing.send("ok")["sent"] and slack_server.requests[-1]["auth"] == f"Bearer {TOKEN}"


def test_without_configuration_it_logs(gppy_logs):
    out = Slack.from_env({}).send("would be sent")
    assert out["sent"] is False and any("would be sent" in line for line in gppy_logs)


@pytest.mark.slow
def test_night_report(tmp_path_factory):
    root, records = built_night(str(tmp_path_factory.getbasetemp()))
    rec = records["curate"]["night"]
    assert rec["status"] == "done", rec
    rep = json.loads((root / rec["result"]["report"]).read_text())
    md = (root / rec["result"]["report_md"]).read_text()
    truth = truth_frames(root)
    # frames with their zero points; the failed stack with its reason; the candidate
    frames = {f["id"]: f for f in rep["frames"] if f["filter"] == GOOD}
    assert frames
    for fid, f in frames.items():
        h = fits.getheader(root / f["output"])
        assert f["aperture"] == "APER_1" and f["zp"] == pytest.approx(h["ZP_APER_1"], abs=1e-4)
        assert f["depth"] == pytest.approx(h["UL5_APER_1"], abs=1e-3)
        assert abs(h["ZPTOT"] - truth[fid]["zp"]) < 0.03  # and the frame's photometry is right
    failed = [f for f in rep["failures"] if f["item"] == STACK_FAILED]
    assert failed and failed[0]["stage"] == "stack" and "no usable frame" in failed[0]["reason"]
    assert sum(1 for f in rep["failures"] if f["stage"] == "astrometry") == 3
    stacks = {s["id"]: s for s in rep["stacks"]}
    assert stacks[STACK_GOOD]["ncombine"] == 3 and stacks[STACK_GOOD]["detect"]["n_pass"] >= 1
    assert stacks[STACK_FAILED]["status"] == "quarantined"
    tr = json.loads((root / "truth" / UNIT / NIGHT / "transients.json").read_text())["transient"]
    best = rep["candidates"][0]
    assert abs(best["ra"] - tr["ra"]) * 3600 < 2 and abs(best["dec"] - tr["dec"]) * 3600 < 1
    assert f"| {STACK_GOOD} | 3/3 |" in md and "no usable frame" in md and "## Candidates" in md
    # products in the processed layout, each FITS with its header snapshot
    products = json.loads((root / "runs" / UNIT / NIGHT / "products.json").read_text())["products"]
    assert any(p.endswith("com.fits") for p in products) and any(p.endswith(".cand.ecsv") for p in products)
    assert all(p.startswith("processed/T10779/7DT01/") for p in products)
    for p in products:
        if p.endswith(".fits"):
            snap = (root / (p[:-5] + ".header.txt")).read_text()
            assert snap.startswith("SIMPLE")
    stack_snap = next(p for p in products if p.endswith("com.fits"))
    assert "NCOMBINE=" in (root / (stack_snap[:-5] + ".header.txt")).read_text()


@pytest.mark.slow
def test_notify_stage_message(tmp_path_factory, slack_server, monkeypatch):
    root, _ = built_night(str(tmp_path_factory.getbasetemp()))
    monkeypatch.setenv("SLACK_WEBHOOK_URL", _url(slack_server) + HOOK_PATH)
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    ctx = Night(str(root), UNIT, NIGHT)
    out = notify_stage.run(ctx, "Succeeded")
    assert out["sent"]
    text = slack_server.requests[-1]["json"]["text"]
    print(text)
    assert f"{UNIT} {NIGHT}" in text and "frames 3/6" in text and "stacks 1/2" in text
    assert STACK_GOOD in text and "report.md" in text and str(root / "processed" / "T10779") in text
    assert text.startswith(":warning:")  # succeeded, but with failures
    notify_stage.run(ctx, "Failed")
    assert slack_server.requests[-1]["json"]["text"].startswith(":x:")
    start = notify_stage.notify_start(ctx, {"raw_frames": 34, "frames": 6, "stacks": 2})
    assert start["sent"] and "night started" in slack_server.requests[-1]["json"]["text"]


def test_notify_start_never_fails_the_plan(monkeypatch, tmp_path):
    monkeypatch.setenv("SLACK_WEBHOOK_URL", "http://127.0.0.1:9/nothing-listens-here")
    out = notify_stage.notify_start(Night(str(tmp_path), UNIT, NIGHT), {"frames": 1})
    assert out["sent"] is False and "unreachable" in out["error"]


@pytest.mark.parametrize("hook", ["https:/hooks.slack.example", "https://", "ftp://127.0.0.1", "file:///etc",
                                  "https://hooks.slack.example:99999", "https://hooks slack.example",
                                  "https://[::1"])
def test_malformed_webhook_is_a_config_error_not_retried(hook, gppy_logs):
    # each of these once raised RetriableError (exit 75): Argo would retry a wrong secret forever,
    # and file:// read a local file into the error message
    with pytest.raises(ConfigError, match="malformed") as err:
        Slack.from_env({"SLACK_WEBHOOK_URL": hook + HOOK_PATH}, timeout=3).send("x")
    assert err.value.exit_code == 78
    assert "SECRETHOOKPATH" not in " ".join([str(err.value)] + gppy_logs)


def test_notify_stage_exits_78_on_a_malformed_webhook(tmp_path):
    import os
    import subprocess

    env = dict(os.environ, SLACK_WEBHOOK_URL="https:/hooks.slack.example" + HOOK_PATH)
    env.pop("SLACK_BOT_TOKEN", None)
    proc = subprocess.run(["gppy", "stage", "notify", "--root", str(tmp_path), "--obs", UNIT, "--night", NIGHT,
                           "--status", "Failed"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert "malformed" in proc.stdout + proc.stderr and "SECRETHOOKPATH" not in proc.stdout + proc.stderr
