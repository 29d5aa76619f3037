"""No secret in any output: with the Slack token, the webhook URL and the S3 secret key set (to
distinctive values) and both Slack and S3 failing, a small night is run, notified and pointed at
S3, and every line printed and every byte written (products, FITS headers, sidecars, reports,
results) is searched for them.

The failing server is as careless as one can be: its 500/503 answers echo the request line,
every header (the bot token's ``Authorization: Bearer``, the SigV4 signature) and the body.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gppy_stage.sim import simulate_night

UNIT, NIGHT = "7DT01", "2025-01-01_gain2750"
TOKEN = "xoxb-4242-SECRETBOTTOKEN-7d7e1f"
HOOK_PATH = "/services/T0/B0/SECRETHOOKPATH-a9b8c7"
AWS_SECRET = "SECRETAWSKEY/3c4d5e+f6Zq"


class _Careless(BaseHTTPRequestHandler):
    """Answers every request with an error that echoes the whole request back."""

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        echo = (self.requestline + "\n" + str(self.headers)).encode() + body
        s3 = self.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256")
        code = 503 if s3 else 500
        data = (b"<Error><Code>SlowDown</Code><Message>" + echo + b"</Message></Error>") if s3 else echo
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def careless():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Careless)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _gppy(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gppy_stage.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _leaks(blob: bytes) -> list[str]:
    needles = [TOKEN, HOOK_PATH, "SECRETHOOKPATH", AWS_SECRET, "SECRETBOTTOKEN", "SECRETAWSKEY"]
    return [n for n in needles if n.encode() in blob]


def test_no_secret_in_any_output_or_file(tmp_path, careless):
    server, url = careless
    root = tmp_path / "root"
    simulate_night(root, filters=("m475",), seed=3, n_science=1, reference=False)
    before = {p for p in root.rglob("*") if p.is_file()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "AWS_", "GPPY_S3", "GPPY_SCRATCH"))}
    # the runs' temporary and scratch folders, where this test can search all of them
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)
    env.update(SLACK_WEBHOOK_URL=url + HOOK_PATH, SLACK_BOT_TOKEN=TOKEN, SLACK_CHANNEL="#7dt",
               SLACK_API_URL=url, AWS_SECRET_ACCESS_KEY=AWS_SECRET, AWS_ACCESS_KEY_ID="AKIDTESTING",
               AWS_ENDPOINT_URL=url, AWS_DEFAULT_REGION="us-east-1", GPPY_S3_RETRIES="2",
               GPPY_S3_READ_ATTEMPTS="1")  # failing faster changes nothing of what is said
    runs = []
    # the night, its start message (plan) and its exit handler (notify) through the webhook
    runs.append(_gppy(["night", "run", "--root", str(root), "--obs", UNIT, "--workers", "1"], env))
    # the bot token's way (no webhook)
    bot = {k: v for k, v in env.items() if k != "SLACK_WEBHOOK_URL"}
    runs.append(_gppy(["stage", "notify", "--root", str(root), "--obs", UNIT, "--night", NIGHT,
                       "--status", "Failed"], bot))
    # S3 failing: a stage and the watcher against the bucket
    runs.append(_gppy(["stage", "plan", "--root", "s3://gppy-secrets/root", "--obs", UNIT, "--night", NIGHT], env))
    runs.append(_gppy(["watch", "--once", "--dry-run", "--root", "s3://gppy-secrets/root", "--units", UNIT], env))

    codes = [r.returncode for r in runs]
    text = "\n".join(r.stdout + r.stderr for r in runs)
    print(codes, text[-3000:])
    # every run failed the documented way (no bug, no traceback) and the secrets were in play:
    # the token and the signed S3 requests reached the server
    assert all(c in (0, 75) for c in codes[:2]) and codes[2:] == [75, 75], codes
    assert "Traceback" not in text
    assert any(s["headers"].get("Authorization") == f"Bearer {TOKEN}" for s in server.seen)
    assert any(s["path"].startswith(HOOK_PATH) for s in server.seen)
    assert any(s["headers"].get("Authorization", "").startswith("AWS4-HMAC-SHA256") for s in server.seen)
    assert (root / "runs" / UNIT / NIGHT / "report.md").is_file() or any(
        p.name.startswith("report") for p in (root / "runs" / UNIT / NIGHT).rglob("*"))

    assert _leaks(text.encode()) == []
    written = [p for p in root.rglob("*") if p.is_file() and p not in before]
    assert any(p.suffix == ".fits" for p in written) and any(p.suffix == ".json" for p in written)
    leaked = {str(p.relative_to(root)): found for p in written if (found := _leaks(p.read_bytes()))}
    assert leaked == {}
    # the scratch folders and anything else a run left in the temporary directory
    left = {str(p.relative_to(tmp)): found for p in tmp.rglob("*") if p.is_file() and (found := _leaks(p.read_bytes()))}
    assert left == {}
