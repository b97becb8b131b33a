"""The webhook client of notify: one JSON POST per notification, with an optional bearer
token; DeliveryError when the sink did not take it, never with the URL or the token in it.

Its own module because urllib.request brings ssl, http.client and email (6 MiB), which
notify loads only when SLUICE_NOTIFY_URL is set.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request

from . import __version__
from .errors import SettingsError
from .notify import DeliveryError, Notification, Summary, sink_origin

HTTP_TIMEOUT_S = 5.0


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the bearer token to wherever it points: treat it as a failure."""

    def redirect_request(self, *args, **kwargs):
        return None


class WebhookClient:
    """POST one JSON document per notification, with an optional bearer token."""

    def __init__(self, url: str, token: str = "", host: str = "",
                 timeout: float = HTTP_TIMEOUT_S) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # The URL itself stays out of the message: it may be the secret.
            raise SettingsError("SLUICE_NOTIFY_URL: must be an http:// or https:// URL")
        self.url, self.host, self.timeout = url, host, timeout
        self._headers = {"Content-Type": "application/json",
                         "User-Agent": f"sluice/{__version__}"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        # No proxy from the environment: settings come from SLUICE_* alone.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                   _NoRedirects())

    def __repr__(self) -> str:
        return f"WebhookClient({sink_origin(self.url)})"

    def send(self, notification: Notification | Summary) -> None:
        data = json.dumps(notification.body(self.host)).encode()
        request = urllib.request.Request(self.url, data=data, headers=self._headers,
                                         method="POST")
        # The error is raised outside the except clauses, so that it carries no context:
        # urllib's exceptions hold the full URL.
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                failure = "" if 200 <= response.status < 300 else f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            failure = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            failure = _reason(err)
        if failure:
            raise DeliveryError(failure)


def _reason(err: Exception) -> str:
    """Why a request failed, without the URL (urllib puts it in some messages)."""
    cause = getattr(err, "reason", err)
    if isinstance(cause, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return type(cause).__name__ if isinstance(cause, BaseException) else "request failed"
