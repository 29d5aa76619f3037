"""Slack messages: by incoming webhook or by bot token (chat.postMessage).

Configuration comes only from the environment:

- ``SLACK_WEBHOOK_URL``: an incoming webhook (the URL is itself a secret), or
- ``SLACK_BOT_TOKEN`` + ``SLACK_CHANNEL``: ``chat.postMessage`` on ``SLACK_API_URL``
  (default ``https://slack.com/api``; tests point it at 127.0.0.1).

With neither set, ``send`` logs the message it would have sent and returns ``{"sent": False}``.
Neither the token nor the webhook URL ever appears in a log line or an exception: errors name
the method and the HTTP status or Slack's error code only, and the standard library's
``urllib`` is used because it logs nothing of the request (urllib3's debug log would print the
webhook's path). Network faults and HTTP 429/5xx raise RetriableError; a refused request
(bad token, unknown channel) raises ConfigError.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from . import log
from .errors import ConfigError, RetriableError

_log = log.get("notify")
DEFAULT_API = "https://slack.com/api"


@dataclass(frozen=True, repr=False)
class Slack:
    """Where messages go. ``repr`` hides the secrets (a dataclass repr would print them)."""

    webhook_url: str | None = None
    token: str | None = None
    channel: str | None = None
    api_url: str = DEFAULT_API
    timeout: float = 10.0

    def __repr__(self) -> str:
        return f"Slack(mode={self.mode!r}, channel={self.channel!r})"

    @classmethod
    def from_env(cls, env=None, timeout: float = 10.0) -> "Slack":
        env = os.environ if env is None else env
        def value(name: str) -> str | None:
            # Kubernetes secrets made from files often end in a newline: it is not part of the secret
            return (env.get(name) or "").strip() or None

        return cls(webhook_url=value("SLACK_WEBHOOK_URL"), token=value("SLACK_BOT_TOKEN"),
                   channel=value("SLACK_CHANNEL"),
                   api_url=(env.get("SLACK_API_URL") or DEFAULT_API).rstrip("/"), timeout=timeout)

    @property
    def mode(self) -> str:
        if self.webhook_url:
            return "webhook"
        if self.token:
            return "bot"
        return "log"

    def _secrets(self) -> list[str]:
        return [s for s in (self.webhook_url, self.token) if s]

    def redact(self, text: str) -> str:
        for secret in self._secrets():
            text = text.replace(secret, "[redacted]")
        return text

    def send(self, text: str, blocks: list[dict] | None = None) -> dict:
        """Post a message; returns ``{"sent": bool, "mode": ..., ...}``."""
        if self.mode == "log":
            log.event(_log, "slack not configured (SLACK_WEBHOOK_URL or SLACK_BOT_TOKEN): message not sent",
                      text=text)
            return {"sent": False, "mode": "log", "text": text}
        payload: dict = {"text": text}
        if blocks:
            payload["blocks"] = blocks
        self._check_urls()
        if self.mode == "webhook":
            status, body = self._post(self.webhook_url, payload, {}, what="webhook")
            if body.strip() not in (b"ok", b""):
                raise ConfigError(f"slack webhook answered HTTP {status}: {self.redact(_error_code(body)) or 'not ok'}")
            log.event(_log, "slack message sent", mode="webhook", chars=len(text))
            return {"sent": True, "mode": "webhook"}
        if not self.channel:
            raise ConfigError("SLACK_BOT_TOKEN is set but SLACK_CHANNEL is not: say which channel to post to")
        payload["channel"] = self.channel
        status, body = self._post(f"{self.api_url}/chat.postMessage", payload,
                                  {"Authorization": f"Bearer {self.token}"}, what="chat.postMessage")
        try:
            answer = json.loads(body)
        except ValueError:
            raise RetriableError(f"slack chat.postMessage answered HTTP {status} with no JSON") from None
        if not answer.get("ok"):
            error = str(answer.get("error", "unknown error"))
            if error in ("ratelimited", "internal_error", "service_unavailable", "request_timeout", "fatal_error"):
                raise RetriableError(f"slack chat.postMessage failed: {self.redact(error)}")
            raise ConfigError(f"slack chat.postMessage refused the message: {self.redact(error)}")
        log.event(_log, "slack message sent", mode="bot", channel=self.channel, chars=len(text))
        return {"sent": True, "mode": "bot", "channel": self.channel, "ts": answer.get("ts")}

    def _check_urls(self) -> None:
        """Refuse a URL that no retry could ever deliver to (no host, a bad port, another scheme
        such as file://, whitespace): that is a wrong secret, exit 78, not a network fault to retry
        forever. The message never quotes the URL: a webhook URL is itself the secret."""
        url, what = (self.webhook_url, "webhook URL (SLACK_WEBHOOK_URL)") if self.mode == "webhook" else \
            (self.api_url, "API URL (SLACK_API_URL)")
        try:
            parts = urllib.parse.urlsplit(url)
            port_ok = parts.port is None or 0 < parts.port < 65536
        except ValueError:
            port_ok = False
            parts = None
        if parts is None or parts.scheme not in ("https", "http") or not parts.hostname or not port_ok \
                or re.search(r"[\s\x00-\x1f\x7f]", url):
            raise ConfigError(f"slack: the {what} is malformed: it must be http(s)://host/path (check the secret)")

    def _post(self, url: str, payload: dict, headers: dict, *, what: str) -> tuple[int, bytes]:
        try:
            # built inside the try: a malformed URL or token fails here, with the secret in its message
            req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json; charset=utf-8", **headers})
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                detail = _error_code(exc.read()[:200])
            except Exception:  # the body is a courtesy; the status says enough
                detail = ""
            message = f"slack {what} answered HTTP {status}" + (f": {self.redact(detail)}" if detail else "")
            if status == 429 or status >= 500:
                raise RetriableError(message) from None
            raise ConfigError(message) from None
        except (ValueError, http.client.InvalidURL):  # a bad header value, an unknown URL type
            raise ConfigError(f"slack {what}: the webhook URL or token is malformed (check the secret)") from None
        except (urllib.error.URLError, OSError) as exc:
            # the reason (connection refused, timeout) carries no URL; redact all the same
            reason = getattr(exc, "reason", exc)
            raise RetriableError(f"slack {what} unreachable: {self.redact(str(reason))}") from None


def _error_code(body: bytes) -> str:
    """Slack's error code (``invalid_token``, ``no_service``...) from a response body, or "".

    Anything else in a body (an HTML page, a proxy's echo of the request) is left out: it may
    hold what the request carried, secrets included.
    """
    text = body.decode("utf-8", "replace").strip()
    return text if re.fullmatch(r"[a-z0-9_]{1,64}", text) else ""


def send(text: str, blocks: list[dict] | None = None, env=None) -> dict:
    """Send with the environment's configuration."""
    return Slack.from_env(env).send(text, blocks)
